#!/bin/sh
# Debian's pgbouncer (1.18 on Debian 12) for the pooler tests and make dev (tools/dev/pgbouncer.py).
# Skipped when present; CI runs as root on a fresh machine, so apt-get works there.
set -e
if command -v pgbouncer >/dev/null 2>&1 || [ -x /usr/sbin/pgbouncer ]; then
	exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
	echo "install-pgbouncer: install pgbouncer (Debian) yourself; the pooler tests are skipped without it" >&2
	exit 0
fi
export DEBIAN_FRONTEND=noninteractive
# Other apt users (another make test) may hold the lock: wait for it rather than fail.
apt-get -o DPkg::Lock::Timeout=600 update -qq
# The package's service is not wanted: the project starts its own process per host.
apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends pgbouncer >/dev/null
