# megatron-resonance: `make install`, `make test`, `make demo`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.13.0 first: pip takes the CPU wheel on disk instead of a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
OUT ?= outputs/demo

.PHONY: install test lint demo clean

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

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
