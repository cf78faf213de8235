# Two entry points (see README): `make main` and `make test`. Both set up .venv first.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
PYTEST_ARGS ?= -n 2 -q

.PHONY: setup main test clean

setup: $(STAMP)

$(STAMP): setup.py
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test,data]'
	touch $(STAMP)

main: setup
	$(VENV)/bin/moe-jax smoke

test: setup
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS) tests

clean:
	rm -rf $(VENV) *.egg-info
