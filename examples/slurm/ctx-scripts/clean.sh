#!/bin/sh
# First script of every run: forget what an earlier run recorded, so a node
# removed from the context does not linger in slurm.conf.
set -eu
rm -rf /etc/slurm/ctx
install -d -m 0755 /etc/slurm/ctx /etc/slurm/ctx/nodes
