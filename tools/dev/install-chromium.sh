#!/bin/sh
# Debian's chromium and chromium-driver for the browser test (tests/test_claim_page.py).
# Skipped when both are present; CI runs as root on a fresh machine, so apt-get works there.
set -e
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
	exit 0
fi
if [ "$(id -u)" != 0 ]; then
	echo "install-chromium: not root; install chromium and chromium-driver yourself (the browser test is skipped without them)" >&2
	exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
	echo "install-chromium: no apt-get here; install chromium and chromedriver yourself (the browser test is skipped without them)" >&2
	exit 0
fi
export DEBIAN_FRONTEND=noninteractive
# Other apt users (another make test) may hold the lock: wait for it rather than fail.
apt-get -o DPkg::Lock::Timeout=600 update -qq
apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
