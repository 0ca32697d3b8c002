#!/bin/sh
# Debian's libossp-uuid16, which the uuid-ossp extension of the local Postgres links (tools/pgserver.py).
# Skipped when present; CI runs as root on a fresh machine, so apt-get works there.
set -e
if ldconfig -p 2>/dev/null | grep -q 'libossp-uuid\.so\.16'; then
	exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
	echo "install-pg-libs: install libossp-uuid16 (Debian) yourself; without it tenants cannot create uuid-ossp locally" >&2
	exit 0
fi
export DEBIAN_FRONTEND=noninteractive
# Other apt users (another make test) may hold the lock: wait for it rather than fail.
apt-get -o DPkg::Lock::Timeout=600 update -qq
apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends libossp-uuid16 >/dev/null
