# megatron-resonance: `make install`, `make test`, `make demo`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.13.0 first: pip takes the CPU wheel on disk instead of a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
OUT ?= outputs/demo

.PHONY: install test lint demo posgen-small posgen-paper gpu-check gpu-wheels clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -e ".[hf,test]"
	touch $@

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check megatron_resonance tests tools pretrain finetune benchmarks

demo: install
	$(PY) tools/run_demo.py --out $(OUT)

# PosGen presets: run (or resume) in runs/posgen_<preset>, then copy the report to benchmarks/results/.
# WORKERS concurrent processes: the CPU cores shared out, or cells sharing one GPU. PROTOCOL=reference follows
# the paper's reference code (docs/posgen.md) and writes to runs/ and benchmarks/results/posgen_<preset>_reference.
WORKERS ?= 2
PROTOCOL ?= clean
POSGEN_SUFFIX = $(if $(filter clean,$(PROTOCOL)),,_$(PROTOCOL))
posgen-small posgen-paper: posgen-%: install
	$(PY) tools/posgen_benchmark.py --preset $* --protocol $(PROTOCOL) --workers $(WORKERS) --out runs/posgen_$*$(POSGEN_SUFFIX)
	mkdir -p benchmarks/results/posgen_$*$(POSGEN_SUFFIX)
	cp runs/posgen_$*$(POSGEN_SUFFIX)/report.md runs/posgen_$*$(POSGEN_SUFFIX)/report.json \
		runs/posgen_$*$(POSGEN_SUFFIX)/position_*.png benchmarks/results/posgen_$*$(POSGEN_SUFFIX)/

# The GPU checks in one command (tools/gpu_check.py; README "On a GPU"): on a CUDA machine with the Python that
# has torch (GPU_PYTHON), no .venv. OUT=dir is required; DRY_RUN=1 checks the bundle and the plan anywhere;
# WORK=dir keeps the scratch files. megatron-core comes from .whl/ (make gpu-wheels, where PyPI is reachable).
GPU_PYTHON ?= python3
GPU_CHECK_ARGS = $(if $(filter-out file,$(origin OUT)),--out "$(OUT)") $(if $(WORK),--workdir "$(WORK)") \
	$(if $(filter-out 0 no false,$(DRY_RUN)),--dry-run)
gpu-check:
	$(GPU_PYTHON) tools/gpu_check.py $(GPU_CHECK_ARGS)

gpu-wheels:
	$(PYTHON) tools/gpu_wheels.py fetch

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
