# HseShop: `make run` starts the whole shop locally, `make test` runs every test.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Rewritten after each successful install, so the venv is rebuilt only when a requirements file changes.
INSTALLED := $(VENV)/.installed

.PHONY: venv run test bench clean

venv: $(INSTALLED)

$(INSTALLED): requirements/base.txt requirements/dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements/dev.txt
	touch $@

run: venv
	$(PY) -m devstack run

test: venv
	$(PY) -m pytest

bench: venv
	$(PY) -m bench

clean:
	rm -rf $(VENV) .run .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
