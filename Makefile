# Two entry points that do all set-up themselves on a fresh machine:
#   make demo   - creates .venv, installs, builds the demo study if missing, opens the explorer
#   make test   - creates .venv, installs with test extras, lints (ruff, import contracts), runs every test
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint quick bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

PORT ?= 8501
STUDY ?=

demo: $(VENV)/.installed
	$(VENV)/bin/msif app --port $(PORT) $(if $(STUDY),--study $(STUDY))

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

test: lint
	$(PY) -m pytest -n 2 --dist loadfile --no-loadscope-reorder

quick: $(VENV)/.installed
	$(PY) -m pytest -m "not slow" -q

bench: $(VENV)/.installed
	$(PY) benchmarks/engine_speed.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
