# lexi-gguf: `make demo` and `make test` both set up .venv/ (with the patched runtime) first.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
LEXI    := $(VENV)/bin/lexi-gguf
BACKEND ?= cpu
STAMP   := $(VENV)/.lexi-setup-$(BACKEND)
# the torch build on disk for CPU machines; a bare `torch` requirement would pull a multi-GB CUDA build
TORCH   ?= torch==2.13.0

.PHONY: setup runtime demo test bench clean distclean

setup: $(STAMP)

$(STAMP): pyproject.toml patches/pin.toml patches/*.patch lexi_gguf/runtime/build.py
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q "$(TORCH)"
	$(VPY) -m pip install -q -e ".[test]"
	$(LEXI) build-runtime --backend $(BACKEND)
	$(LEXI) doctor >/dev/null
	touch $@

runtime: setup   ## rebuild/reinstall the patched runtime (cached by version, patch hash, backend)
	$(LEXI) build-runtime --backend $(BACKEND)

demo: setup
	$(VPY) scripts/demo.py

test: setup
	$(VPY) -m pytest -q

bench: setup
	$(VPY) bench/bench_runtime.py
	$(VPY) bench/bench_profile.py

clean:
	rm -rf out build .pytest_cache

distclean: clean
	rm -rf $(VENV)
