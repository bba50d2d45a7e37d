#!/bin/sh
# Make VENV: a virtualenv over Debian 12's own python3 and library packages (python3-twisted
# 22.4 and friends, as a head host installs them), with ctxd itself installed from this tree
# and nothing else from PyPI. Installs the packages with apt when root and they are missing.
# Exit 3 (and say why) when this is not a Debian 12 machine we may install on.
set -eu
case $1 in /*) VENV=$1 ;; *) VENV=$PWD/$1 ;; esac   # shebangs need it absolute
. "$(dirname "$0")/need.sh"
need test-debian python3-twisted python3-treq python3-openssl python3-service-identity \
    python3-cryptography python3-prometheus-client python3-pytest python3-hypothesis python3-yaml \
    python3-venv zopfli

rm -rf "$VENV"
/usr/bin/python3 -m venv --system-site-packages "$VENV"
"$VENV/bin/pip" install -q --no-deps --no-build-isolation -e . --config-settings editable_mode=compat
# Debian's twistd is /usr/bin/twistd3; the tests look for twistd beside their python.
printf '#!%s\nimport sys\nfrom twisted.scripts.twistd import run\nsys.exit(run())\n' "$VENV/bin/python" > "$VENV/bin/twistd"
chmod +x "$VENV/bin/twistd"
