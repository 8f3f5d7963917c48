# Two commands on a machine with only Python 3.11+: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test bench migrate clean-var token help

help:
	@echo "make run    - the whole service (embedded PostgreSQL/Redis unless DATABASE_URL/REDIS_URL are set)"
	@echo "make test   - the whole test suite against real PostgreSQL, Redis and Celery workers"
	@echo "make bench  - benchmarks (prints tables with ratios against in-run baselines)"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m devenv.run

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m bench

migrate: $(STAMP)
	$(PY) -m devenv.run --migrate-only

clean-var:
	rm -rf var
