#!/bin/sh
# First script of an initial run (first boot, or the first run after a
# reboot; never in a watch-mode change run): forget what an earlier run
# recorded, so a node removed from the context does not linger in slurm.conf.
set -eu
. "$(dirname "$0")/lib/slurm.sh"
[ "$(ctx_event)" = initial ] || exit 0
rm -rf "$CTX_DIR"
install -d -m 0755 "$CTX_DIR" "$CTX_DIR/nodes"
