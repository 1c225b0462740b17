# Two commands do all the set-up: `make run` (the main job) and `make test` (the test suite).
# The virtual environment lives in .venv and is created on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DATA ?= data/synthetic-imagenet
RUNS ?= runs
# GPUs on this machine (0 without a working NVIDIA driver)
NGPU := $(shell nvidia-smi -L 2>/dev/null | grep -c '^GPU')

RUN_DIR := $(RUNS)/make-run-$(shell date +%Y%m%d-%H%M%S)

ifeq ($(NGPU),0)
  # No GPU: DDP over gloo with two processes, DALI's CPU operators, small images
  NPROC ?= 2
  RUN_FLAGS ?= --loader dali-cpu --image-size 64 --batch-size 16 --dali-threads 1
  RUN_ENV := OMP_NUM_THREADS=1
  # the harness in one process, its CPU loader set (dali-cpu, torchvision: benchmarks/plan.py), on the same cores
  BENCH_NPROC ?= 1
  BENCH_FLAGS ?= --image-size 64 --batch-size 16
else
  # Every local GPU, the DALI GPU pipeline (nvJPEG + hardware decoder), NCCL; batch 32 per GPU keeps
  # 5 steps per epoch on 8 GPUs with the 1,280-image built-in set (the benchmark harness measures speed)
  NPROC ?= $(NGPU)
  RUN_FLAGS ?= --loader dali --image-size 224 --batch-size 32
  RUN_ENV :=
  BENCH_NPROC ?= $(NGPU)
  BENCH_FLAGS ?= --image-size 224 --batch-size 32
endif

.PHONY: run test test-fast data venv clean

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install -e '.[test]'
	# the DALI wheel built for torch's CUDA major version (a CUDA 12 DALI beside a CUDA 13 torch fails on the GPU)
	$(PY) -m pipelines.dali_wheel --unwanted | xargs -r $(PY) -m pip uninstall -y
	$(PY) -m pip install "$$($(PY) -m pipelines.dali_wheel)"
	touch $@

venv: $(VENV)/.installed

$(DATA)/train: | $(VENV)/.installed
	$(PY) -m tools.make_dataset --out $(DATA) --classes 10 --train-per-class 128 --val-per-class 25 --seed 0

data: $(DATA)/train

# The main job: a short DDP training run, then the benchmark harness on the same data (its report
# says whether the loader or the model is the bottleneck). Both write into one run folder.
run: $(VENV)/.installed $(DATA)/train
	$(RUN_ENV) $(VENV)/bin/torchrun --standalone --nproc-per-node $(NPROC) -m rn50.train \
	    --data $(DATA) --out $(RUN_DIR) --preset smoke $(RUN_FLAGS)
	$(VENV)/bin/torchrun --standalone --nproc-per-node $(BENCH_NPROC) -m benchmarks.run \
	    --data $(DATA) --out $(RUN_DIR)/bench $(BENCH_FLAGS)
	@echo "training run and benchmark report in $(RUN_DIR) (report: $(RUN_DIR)/bench/report.md)"

# The suite runs on TEST_WORKERS pytest-xdist processes, each taking whole files (the files that read the
# shared runs count as one: tests/conftest.py's scheduler), so a fixture is built once: much of a test's time is commands
# starting and real waits (rendezvous, timeouts), which a second worker fills (docs/testing.md has the
# figures). More on a larger machine: make test TEST_WORKERS=8; TEST_WORKERS=0 runs it in one process
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# Every tier: CI's command
test: $(VENV)/.installed
	$(PYTEST) tests

# The edit-test loop: unit and component tests without the slow ones (under 2 minutes on 2 cores)
test-fast: $(VENV)/.installed
	$(PYTEST) tests/unit tests/component -m "not slow"

clean:
	rm -rf $(VENV) $(DATA) *.egg-info
