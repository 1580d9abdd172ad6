# Two entry points that do all set-up themselves on a fresh machine:
#   make demo   - creates .venv, installs, builds the demo study, traces its demo questions
#   make test   - creates .venv, installs with test extras, runs the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

STUDY ?= studies/demo

demo: $(VENV)/.installed
	$(VENV)/bin/msif build-demo --out $(STUDY)
	$(VENV)/bin/msif query --study $(STUDY) --prompts-file $(STUDY)/world/demo_prompts.jsonl --top-k 5

test: $(VENV)/.installed
	$(PY) -m pytest

bench: $(VENV)/.installed
	$(PY) benchmarks/engine_speed.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
