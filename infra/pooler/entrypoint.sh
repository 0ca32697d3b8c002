#!/bin/bash
# The pooler task's processes: PgBouncer, the admin port forwarder and the sync loop.
# The task ends when any of them ends (ECS starts a new one). Locally:
# tests/test_pooler_prod.py runs this script with Debian's PgBouncer.
set -euo pipefail

STATE=${INSTAPG_POOLER_STATE_DIR:-/var/run/instapg-pooler}
export INSTAPG_POOLER_STATE_DIR=$STATE
PY=${INSTAPG_PYTHON:-python3}

"$PY" -m tools.pooler.config >/dev/null
# The tenants before PgBouncer starts, so it never serves an empty list; if the host is
# unreachable now, PgBouncer starts with none and the loop fills them in when it is back.
"$PY" -m tools.pooler.sync --once || true

# PgBouncer needs neither password (its files hold verifiers only).
env -u PGPASSWORD -u INSTAPG_POOLER_ADMIN_PASSWORD -u INSTAPG_POOLER_TLS_KEY_PEM \
    pgbouncer "$STATE/pgbouncer.ini" &
env -u PGPASSWORD -u INSTAPG_POOLER_ADMIN_PASSWORD -u INSTAPG_POOLER_TLS_KEY_PEM \
    "$PY" -m tools.pooler.adminport &
env -u INSTAPG_POOLER_TLS_KEY_PEM "$PY" -m tools.pooler.sync &

stop() { kill -TERM $(jobs -p) 2>/dev/null || true; }
trap stop TERM INT
status=0
wait -n || status=$?
stop
wait || true
exit "$status"
