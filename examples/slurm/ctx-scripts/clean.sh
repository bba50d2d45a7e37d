#!/bin/sh
# First script of every run: forget what an earlier run recorded, so a node
# removed from the context does not linger in slurm.conf.
set -eu
. "$(dirname "$0")/lib/slurm.sh"
rm -rf "$CTX_DIR"
install -d -m 0755 "$CTX_DIR" "$CTX_DIR/nodes"
