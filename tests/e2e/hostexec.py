"""Exec a program as if on another host: own hostname and own /etc/hosts.

Run as ``unshare --uts --mount --propagation private python hostexec.py
--hostname NAME [--etc-hosts FILE] -- PROGRAM ARGS...``: it bind-mounts FILE
over /etc/hosts (private mount namespace, so nothing outside sees it), sets
the hostname (private UTS namespace) and replaces itself with PROGRAM.  No
shell is involved anywhere.
"""

import argparse
import os
import socket
import subprocess
import sys


def main(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--hostname", required=True)
    parser.add_argument("--etc-hosts")
    parser.add_argument("program", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    program = args.program[1:] if args.program[:1] == ["--"] else args.program
    if not program:
        parser.error("no program given")
    if args.etc_hosts:
        subprocess.run(["mount", "--bind", args.etc_hosts, "/etc/hosts"], check=True)
    socket.sethostname(args.hostname)
    os.execvp(program[0], program)  # PATH lookup only, no shell


if __name__ == "__main__":
    main(sys.argv[1:])
