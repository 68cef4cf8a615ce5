# lexi-gguf: `make demo` and `make test` both set up .venv/ (with the patched runtime) first.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
LEXI    := $(VENV)/bin/lexi-gguf
BACKEND ?= cpu
STAMP   := $(VENV)/.lexi-setup-$(BACKEND)
# the torch build on disk for CPU machines; a bare `torch` requirement would pull a multi-GB CUDA build.
# --no-compile: byte-compiling every file of torch and transformers took ~20 s of a cold set-up; Python
# compiles the few modules it imports on first use
TORCH   ?= torch==2.13.0

.PHONY: setup runtime demo test test-vulkan docs report bench clean distclean

setup: $(STAMP)

$(STAMP): pyproject.toml patches/pin.toml patches/*.patch patches/backend/*.patch lexi_gguf/runtime/build.py
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q --no-compile "$(TORCH)"
	$(VPY) -m pip install -q --no-compile -e ".[test]"
	$(LEXI) build-runtime --backend $(BACKEND) $(RUNTIME_ARGS)
	$(LEXI) doctor >/dev/null
	touch $@

runtime: setup   ## rebuild/reinstall the patched runtime (cached by version, patch hash, backend)
	$(LEXI) build-runtime --backend $(BACKEND)

demo: setup
	$(VPY) scripts/demo.py

test: setup
	$(VPY) -m pytest -q

# the Vulkan backend's tests (tests/vulkan_offload.py: per-layer k with every layer on the device, against the same
# build's CPU backend) on the first Vulkan device: where there is no GPU, Mesa's lavapipe (software, on the CPU; the
# set-up installs it as root with apt-get, else names the packages). Opt-in: the Vulkan build compiles ggml's shaders
# (~25 min on 2 cores), too long for `make test`. Its own venv, .venv-vulkan (the Vulkan runtime without llama.cpp's
# tools), so that .venv keeps the CPU runtime `make test` uses; the result goes to bench/results/vulkan-<machine>.json
# and docs/results.md. VULKAN_ARGS: --quick (the tiny model only, results to out/bench-quick/), --force
VK_VENV := .venv-vulkan
test-vulkan:
	$(MAKE) setup VENV=$(VK_VENV) BACKEND=vulkan RUNTIME_ARGS=--no-tools
	GGML_VK_VISIBLE_DEVICES=$${GGML_VK_VISIBLE_DEVICES-0} $(VK_VENV)/bin/python bench/vulkan_tests.py $(VULKAN_ARGS)
	$(VK_VENV)/bin/python -m lexi_gguf.cli report

# docs/architectures.md: the per-architecture tests, then the table rendered from their results
ARCH_TESTS := stage1_matches_transformers_moe_block or convert_and_apply_every_arch or per_layer_k_matches_transformers
docs: setup
	mkdir -p out
	$(VPY) -m pytest -q tests/test_profile.py tests/test_archs.py tests/test_runtime.py -k "$(ARCH_TESTS)" \
		--arch-results out/arch-results.json
	$(VPY) -m lexi_gguf.testbeds.archdoc out/arch-results.json -o docs/architectures.md
	$(LEXI) report

# docs/results.md from bench/results/*.json (every measured number in the docs; tests/test_report.py
# checks it is current). Needs only the package, not the runtime: no set-up of its own
report:
	$(if $(wildcard $(VPY)),$(VPY),$(PY)) -m lexi_gguf.cli report

# every bench's quick mode (minutes each: small sizes, one repetition); results go to out/bench-quick/,
# never bench/results/. A full run is `python bench/bench_NAME.py` (see its docstring); `make report`
# renders bench/results/*.json into docs/results.md
BENCHES := $(sort $(wildcard bench/bench_*.py))
bench: setup
	@failed=""; for b in $(BENCHES); do echo "== $$b --quick"; \
		$(VPY) $$b --quick || failed="$$failed $$b"; done; \
	if [ -n "$$failed" ]; then echo "bench: failed:$$failed"; exit 1; fi

# what bench/gpu_check.sh carries to a lent CUDA machine (out/gpu-check/), then the same script on this
# CPU: the trimmed source built here and the fidelity check run on it (minutes: a llama.cpp build).
# docs/backends.md; the suite checks the trimming and the layout only (tests/test_gpu_check.py)
gpu-check-prepare: setup
	$(VPY) bench/gpu_check_prepare.py
	bash bench/gpu_check.sh --cpu

clean:
	rm -rf out build .pytest_cache

distclean: clean
	rm -rf $(VENV) .venv-vulkan
