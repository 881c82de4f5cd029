# Two commands a fresh machine needs: `make serve` and `make test` (both install first).
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0

.PHONY: install serve test lint typecheck unit bench chromium

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned resolve would pull a multi-GB build we do not want
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

serve: install
	$(VENV)/bin/ditcache serve

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: install
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

unit: install chromium
	$(VENV)/bin/pytest -q

test: lint typecheck unit

bench: install
	$(PY) -m benchmarks.engine
