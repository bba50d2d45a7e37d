"""The man pages the Debian package installs (docs/man/) name every option, command and exit
status the programs have: a new option without its line in the man page fails here."""

import argparse
import re
import subprocess
import sys
from pathlib import Path

from ctxd.ctxctl.main import build_parser

REPO = Path(__file__).resolve().parents[1]


def _text(name: str) -> str:
    """The man page's source with roff's escaped hyphens made plain."""
    return (REPO / "docs" / "man" / name).read_text().replace("\\-", "-")


def _options(parser: argparse.ArgumentParser):
    return {option for action in parser._actions for option in action.option_strings
            if option.startswith("--") and option != "--help"}


def test_ctxctl_page_names_every_option_and_command():
    page = _text("ctxctl.1")
    parser = build_parser()
    missing = {o for o in _options(parser) if o not in page}
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    missing |= {c for c in commands if not re.search(r"^\.(B|BI) %s\b" % re.escape(c), page, re.M)}
    assert not missing, "docs/man/ctxctl.1 lacks %s" % sorted(missing)


def test_ctxagent_page_names_every_option_and_exit_status():
    page = _text("ctxagent.8")
    usage = subprocess.run([sys.executable, str(REPO / "ctxagent.py"), "--help"], capture_output=True,
                           text=True, check=True).stdout
    missing = {o for o in re.findall(r"(--[a-z][a-z-]+)", usage) if o != "--help" and o not in page}
    codes = re.findall(r"^\s+(\d+)\s+\S", usage.split("exit codes:")[1], re.M)
    assert codes, usage
    missing |= {"exit %s" % c for c in codes if not re.search(r"^\.B %s$" % c, page, re.M)}
    assert not missing, "docs/man/ctxagent.8 lacks %s" % sorted(missing)
