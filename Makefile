# Two commands a fresh machine needs: `make serve` and `make test` (both install first).
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0

.PHONY: install install-ray serve test lint typecheck unit bench chromium redis

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned resolve would pull a multi-GB build we do not want
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# The tests also need the ray extra (Ray Serve, the Redis client); `make serve` does not. torch stays pinned.
$(VENV)/.installed-ray: $(VENV)/.installed
	$(PY) -m pip install -q torch==$(TORCH_VERSION) -e '.[dev,ray]'
	touch $@

install-ray: $(VENV)/.installed-ray

serve: install
	$(VENV)/bin/ditcache serve

lint: install-ray
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: install-ray
	$(VENV)/bin/mypy

# The page tests drive Debian's Chromium (never a browser downloaded by Playwright); installed when
# missing, which needs root and apt-get. Without it they are skipped, saying why.
chromium:
	@if ! command -v chromium >/dev/null 2>&1; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; \
		else \
			echo "chromium is missing and cannot be installed here (needs root and apt-get)"; \
		fi; \
	fi

# The Redis job store's tests run against a real redis-server (Debian's), installed when missing as root;
# without it they are skipped, saying why.
redis:
	@if ! command -v redis-server >/dev/null 2>&1; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server; \
		else \
			echo "redis-server is missing and cannot be installed here (needs root and apt-get)"; \
		fi; \
	fi

unit: install-ray chromium redis
	$(VENV)/bin/pytest -q

test: lint typecheck unit

bench: install
	$(PY) -m benchmarks.engine
