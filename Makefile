# Two commands do all set-up: `make demo` (the main job) and `make test` (the suite).
# Both create/reuse .venv, install the pinned CPU torch (never a CUDA build), the rest,
# and build the extension in place.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH_SPEC ?= torch==2.13.0
NATIVE_SOURCES := $(wildcard csrc/*.cpp csrc/*.h csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu csrc/*/*.cuh)

.PHONY: setup test lint cuda-check triton-aot-check demo bench-smoke clean

setup: $(VENV)/.installed $(VENV)/.built

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -r requirements.txt
	touch $@

$(VENV)/.built: $(VENV)/.installed setup.py $(NATIVE_SOURCES)
	MAX_JOBS=$${MAX_JOBS:-2} $(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

cuda-check:
	bash tools/check_cuda_sources.sh

# Compile every Triton kernel variant for sm_90 on the CPU (ptxas ships with triton).
triton-aot-check: setup
	$(PY) python/triton_aot_check.py > $(VENV)/triton_aot_check.log 2>&1 || \
		(grep -E "^FAIL|failed to compile" $(VENV)/triton_aot_check.log; exit 1)
	tail -n 1 $(VENV)/triton_aot_check.log

test: setup lint cuda-check triton-aot-check
	$(PY) -m pytest -q tests

bench-smoke: setup
	bash benchmarks/run_smoke.sh

demo: setup
	$(VENV)/bin/otq demo

clean:
	rm -rf build *.egg-info otq_kernels/_C*.so $(VENV)/.built
