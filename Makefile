# Two commands do all set-up: `make demo` (the main job) and `make test` (the suite).
# Both create/reuse .venv, install the pinned CPU torch (never a CUDA build), the rest,
# and build the extension in place.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH_SPEC ?= torch==2.13.0
NATIVE_SOURCES := $(wildcard csrc/*.cpp csrc/*.h csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu csrc/*/*.cuh)

.PHONY: setup test lint cuda-check triton-aot-check triton-min-check demo bench-smoke clean

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

# The same compile check and the Triton tests against the oldest triton we support
# (pyproject's `triton>=`, the GPU image's version), installed beside the venv's own.
# numpy < 2.4: triton 3.6's interpreter takes a shape-(1,) array as an index, which 2.4 refuses.
TRITON_MIN ?= 3.6.0
TRITON_MIN_DIR := $(VENV)/triton-$(TRITON_MIN)
$(TRITON_MIN_DIR)/.installed: $(VENV)/.installed
	rm -rf $(TRITON_MIN_DIR)
	$(PIP) install -q --no-deps --target $(TRITON_MIN_DIR) "triton==$(TRITON_MIN)" "numpy<2.4"
	touch $@

triton-min-check: setup $(TRITON_MIN_DIR)/.installed
	PYTHONPATH=$(TRITON_MIN_DIR) $(PY) python/triton_aot_check.py > $(TRITON_MIN_DIR)/aot_check.log 2>&1 || \
		(grep -E "^FAIL|failed to compile" $(TRITON_MIN_DIR)/aot_check.log; exit 1)
	tail -n 1 $(TRITON_MIN_DIR)/aot_check.log
	PYTHONPATH=$(TRITON_MIN_DIR) OTQ_EXPECT_TRITON=$(TRITON_MIN) TRITON_INTERPRET=1 $(PY) -m pytest -q -p no:cacheprovider \
		tests/test_triton_min.py tests/backends/test_triton_*.py tests/backends/test_device.py \
		tests/test_ops.py tests/test_nn.py tests/test_autograd.py

test: setup lint cuda-check triton-aot-check triton-min-check
	OTQ_EXPECT_NATIVE=1 $(PY) -m pytest -q tests

bench-smoke: setup
	bash benchmarks/run_smoke.sh

demo: setup
	$(VENV)/bin/otq demo

clean:
	rm -rf build *.egg-info otq_kernels/_C*.so $(VENV)/.built
