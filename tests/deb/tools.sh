#!/bin/sh
# What `make test-package` needs on the host: the Debian build tools (debhelper, dh-python) to
# build the packages, lintian to check them, debootstrap to make a fresh Debian 12 system and
# systemd-nspawn to boot it with systemd as its init. Installs them with apt when root and they
# are missing. Exit 3 (and say why) when the package tests cannot run here.
set -eu
. "$(dirname "$0")/need.sh"
if [ "$(id -u)" != 0 ]; then
    echo "test-package: skipped, booting a Debian system container needs root" >&2
    exit 3
fi
need test-package debhelper dh-python python3-all python3-setuptools debootstrap systemd-container lintian
