# megatron-resonance: `make install`, `make test`, `make demo`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.13.0 first: pip takes the CPU wheel on disk instead of a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
OUT ?= outputs/demo

.PHONY: install test lint demo test-megatron-core-0.15 compat posgen-small posgen-paper gpu-check gpu-wheels clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -e ".[hf,test]"
	touch $@

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

# ruff (pinned in setup.py's test extra: another release formats differently) checks and formats the Python.
LINT_PATHS = megatron_resonance tests tools pretrain finetune benchmarks
lint: install
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)

demo: install
	$(PY) tools/run_demo.py --out $(OUT)

# megatron-core's supported window (megatron_resonance/megatron/compat.py; README "megatron-core versions").
# MCORE_TESTS: the tests run on another release than .venv's: every workaround in compat.py and the
# megatron-core surfaces this package uses -- the window check and the faked-release fixes (test_compat), the
# checkpoint writer queue and Adam step restore (test_checkpointing), context-parallel attention and model
# (megatron/test_context_parallel), the pretrain entry point with mock data, save, exact resume and TP=2's
# losses = DP's (training/test_loop), loading at other layouts (test_checkpoint_layouts), our layers against
# megatron's at TP/SP/PP/VPP (test_parallel_equivalence), the datasets' C++ helpers under gloo, and the
# Hugging Face <-> Megatron round trip (conversion/test_roundtrip). MCORE_TESTS=tests: the whole suite.
MCORE_TESTS ?= tests/megatron/test_compat.py tests/megatron/test_checkpointing.py \
	tests/megatron/test_context_parallel.py tests/training/test_loop.py tests/training/test_checkpoint_layouts.py \
	tests/megatron/test_parallel_equivalence.py tests/data/test_datasets.py::test_build_gpt_datasets_under_gloo \
	tests/conversion/test_roundtrip.py

# 0.15.x next to .venv's 0.16.x: VENV_MCORE_015 is a venv of .venv's Python that sees .venv's packages (a .pth
# line) with megatron-core 0.15.x and the numpy < 2 it requires installed over them (90 MB, seconds).
MCORE_015 ?= 0.15.3
VENV_MCORE_015 ?= .venv-mcore-0.15
PURELIB = -c 'import sysconfig; print(sysconfig.get_path("purelib"))'
test-megatron-core-0.15: $(VENV_MCORE_015)/.installed
	$(VENV_MCORE_015)/bin/python -m pytest $(PYTEST_ARGS) $(MCORE_TESTS)

$(VENV_MCORE_015)/.installed: $(VENV)/.installed
	rm -rf $(VENV_MCORE_015)
	$(PY) -m venv --without-pip $(VENV_MCORE_015)
	echo "import site; site.addsitedir('$$($(PY) $(PURELIB))')" > "$$($(VENV_MCORE_015)/bin/python $(PURELIB))/_venv_base.pth"
	$(PY) -m pip install --no-deps --target "$$($(VENV_MCORE_015)/bin/python $(PURELIB))" \
		"megatron-core==$(MCORE_015)" "numpy<2"
	touch $@

# The newest release (Python >= 3.12) in VENV_COMPAT, built once: COMPAT_PYTHON, PyPI's torch (the CUDA build:
# no CPU wheel for Python 3.12 is reachable; 2.7 GB of wheels, 4.7 GB installed) and this package with its
# dependencies. Each run installs megatron-core MCORE_NEWEST there (nothing when it is), imports the package
# and runs MCORE_TESTS.
MCORE_NEWEST ?= 0.19.2
VENV_COMPAT ?= .venv-compat
COMPAT_PYTHON ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) python3.12)
compat: $(VENV_COMPAT)/.installed
	$(VENV_COMPAT)/bin/python -m pip install -q "megatron-core==$(MCORE_NEWEST)"
	$(VENV_COMPAT)/bin/python -c "import megatron.core, megatron_resonance.megatron; print('megatron-core', megatron.core.__version__)"
	$(VENV_COMPAT)/bin/python -m pytest $(PYTEST_ARGS) $(MCORE_TESTS)

$(VENV_COMPAT)/.installed: setup.py
	rm -rf $(VENV_COMPAT)
	$(COMPAT_PYTHON) -m venv $(VENV_COMPAT)
	$(VENV_COMPAT)/bin/python -m pip install "$(TORCH_SPEC)"
	$(VENV_COMPAT)/bin/python -m pip install -e ".[hf,test]"
	touch $@

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
	rm -rf $(VENV) $(VENV_MCORE_015) $(VENV_COMPAT) build *.egg-info .pytest_cache
