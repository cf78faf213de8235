# Two entry points (see README): `make main` and `make test`. Both set up .venv first.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
PYTEST_ARGS ?= -n 2 -q

.PHONY: setup data main test test-fast lint clean

setup: $(STAMP)

$(STAMP): setup.py constraints.txt
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -c constraints.txt -e '.[test,data,hf]'
	touch $(STAMP)

# The offline corpus, the 8K and 1K vocabularies and their token caches (idempotent: seconds when built).
data: setup
	$(VENV)/bin/moe-jax data build
	$(VENV)/bin/moe-jax data build --vocab_size 1024

# DeepSeekMoE, GShard and Dense base proxies, 300 steps each on the offline corpus, held-out bits/byte side by side.
main: data
	$(VENV)/bin/moe-jax quickstart

test: setup
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS) tests

# Everyday tier: everything but the tests marked slow (pyproject.toml lists the markers).
test-fast: setup
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS) -m "not slow" tests

# Lint and format check (settings in pyproject.toml). `$(VENV)/bin/ruff format .` applies the format.
# lint-imports checks that imports run one way (the layers in pyproject.toml's [tool.importlinter]).
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) *.egg-info
