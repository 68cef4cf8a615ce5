"""The benches: one script per study (`python bench/bench_NAME.py [--quick]`), the helpers they share
(`_common`: argparse basics, machine, provenance, saving JSON and PNG), the bench models they build
(`models`) and the bench-only tools that are not part of the package (`loadgen`, `widen`, `pin`).

Results land in bench/results/<kind>[-<variant>]-<machine id>.json (+ .png); `lexi-gguf report`
renders every file there into docs/results.md. `make bench` runs every bench's quick mode.
"""
