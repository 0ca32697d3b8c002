#!/bin/sh
# node and the `pg` driver for the client tests on the pooled string (tests/test_pooler_clients.py).
# node from Debian's package when absent (as install-chromium.sh does); `pg` from the npm registry into
# a cache folder (NODE_PG_DIR, default ~/.cache/instapg/node-pg), pinned. Skipped when present.
set -e
DIR="${NODE_PG_DIR:-${HOME}/.cache/instapg/node-pg}"
PG_VERSION=8.16.3
if ! command -v node >/dev/null 2>&1; then
	if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
		echo "install-node-pg: install node and npm yourself (Debian: apt-get install nodejs npm)" >&2
		exit 1
	fi
	export DEBIAN_FRONTEND=noninteractive
	apt-get -o DPkg::Lock::Timeout=600 update -qq
	apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends nodejs npm >/dev/null
fi
if [ -f "$DIR/node_modules/pg/package.json" ] && grep -q "\"version\": \"$PG_VERSION\"" "$DIR/node_modules/pg/package.json"; then
	exit 0
fi
mkdir -p "$DIR"
npm install --silent --no-audit --no-fund --prefix "$DIR" "pg@$PG_VERSION" >/dev/null
