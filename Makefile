# Two entry points that do all set-up themselves on a fresh machine:
#   make demo   - creates .venv, installs, builds the demo study if missing, opens the explorer
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

PORT ?= 8501

demo: $(VENV)/.installed
	$(VENV)/bin/msif app --study $(STUDY) --port $(PORT)

test: $(VENV)/.installed
	$(PY) -m pytest

bench: $(VENV)/.installed
	$(PY) benchmarks/engine_speed.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
