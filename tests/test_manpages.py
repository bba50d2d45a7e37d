"""The man pages the Debian package installs (docs/man/) name every option, command and exit
status the programs have: a new option without its line in the man page fails here.

ctxctl's man page and shell completion are generated from its argparse definitions (`make
cli-docs`: argparse-manpage and shtab); the committed files must be what the generators make now.
"""

import argparse
import importlib.metadata
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ctxd.ctxctl.main import EPILOG, build_parser

REPO = Path(__file__).resolve().parents[1]
#: What `make cli-docs` writes: committed, and installed by the Debian package.
GENERATED = ("docs/man/ctxctl.1", "etc/bash-completion/ctxctl", "etc/zsh/_ctxctl")


def _text(name: str) -> str:
    """The man page's source with roff's escaped hyphens made plain."""
    return (REPO / "docs" / "man" / name).read_text().replace("\\-", "-")


def _options(parser: argparse.ArgumentParser):
    return {option for action in parser._actions for option in action.option_strings
            if option.startswith("--") and option != "--help"}


def _commands(parser: argparse.ArgumentParser, name: str = "ctxctl"):
    """(``ctxctl user add``, its parser) for every command, at any depth."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command, sub in action.choices.items():
                yield f"{name} {command}", sub
                yield from _commands(sub, f"{name} {command}")


def _shown_options(parser: argparse.ArgumentParser):
    return {option for action in parser._actions if action.help != argparse.SUPPRESS
            for option in action.option_strings if option.startswith("--") and option != "--help"}


def test_ctxctl_page_names_every_option_and_command():
    """Every command of ctxctl has its subsection, every option its line (whichever generator
    version made the page: this runs where argparse-manpage is not installed too)."""
    page = _text("ctxctl.1")
    parser = build_parser()
    missing = {o for o in _options(parser) if o not in page}
    for name, command in _commands(parser):
        if not re.search(r"^\.SS \\fB%s\\fR$" % re.escape(name), page, re.M):
            missing.add(name)
        missing |= {f"{name} {o}" for o in _shown_options(command) if o not in page}
    assert not missing, "docs/man/ctxctl.1 lacks %s: run make cli-docs" % sorted(missing)


def test_ctxctl_page_has_the_exit_codes_of_the_help():
    """The exit codes --help lists are the man page's EXIT STATUS (docs/man/ctxctl.1.include)."""
    codes = re.findall(r"^  (\d)  ", EPILOG.split("exit codes:")[1], re.M)
    section = _text("ctxctl.1").split(".SH EXIT STATUS")[1].split(".SH ")[0]
    assert codes and re.findall(r"^\.B (\d)$", section, re.M) == codes


def _made_with(path: Path) -> str:
    """The generator versions a generated file's header names: "shtab X, argparse-manpage Y, Python Z"."""
    head = path.read_text().splitlines()[:2]
    found = [re.search(r"\((shtab [^)]*)\): do not edit$", line) for line in head]
    assert any(found), f"{path} has no 'made by make cli-docs (...)' line"
    return next(m.group(1) for m in found if m)


def _installed() -> str:
    try:
        import shtab  # noqa: F401 - a build-time tool (the test extras)

        manpage = importlib.metadata.version("argparse-manpage")
    except (ImportError, importlib.metadata.PackageNotFoundError):
        pytest.skip("shtab or argparse-manpage is not installed in this virtualenv (pip install -e '.[test]')")
    return "shtab %s, argparse-manpage %s, Python %d.%d" % (shtab.__version__, manpage, *sys.version_info[:2])


def test_generated_ctxctl_files_are_what_the_generators_make_now(tmp_path):
    """docs/man/ctxctl.1 and the bash and zsh completions are what `make cli-docs` makes from the
    argparse definitions now (skipped where the generators, or the versions that made the
    committed files, are not installed: their output differs from version to version)."""
    installed = _installed()
    made_with = {_made_with(REPO / name) for name in GENERATED}
    assert len(made_with) == 1, f"the generated files come from different runs: {made_with}"
    if made_with != {installed}:
        pytest.skip(f"the committed files were made with {made_with.pop()}; this virtualenv has {installed}")
    if shutil.which("make") is None:
        pytest.skip("no make")
    done = subprocess.run(["make", "-s", "-C", str(REPO), "cli-docs", f"CLI_DOCS_PYTHON={sys.executable}",
                           f"CLI_DOCS_DIR={tmp_path}"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    stale = [name for name in GENERATED if (tmp_path / name).read_text() != (REPO / name).read_text()]
    assert not stale, f"{stale} differ from what the generators make now: run make cli-docs and commit them"


def test_the_debian_package_installs_the_completions_and_the_page():
    """debian/ctxd.install puts the committed completions where bash-completion and zsh look;
    debian/ctxd.manpages installs the generated page."""
    lines = (REPO / "debian" / "ctxd.install").read_text().splitlines()
    assert "etc/bash-completion/ctxctl usr/share/bash-completion/completions" in lines
    assert "etc/zsh/_ctxctl usr/share/zsh/vendor-completions" in lines
    assert "docs/man/ctxctl.1" in (REPO / "debian" / "ctxd.manpages").read_text().split()


def test_ctxagent_page_names_every_option_and_exit_status():
    page = _text("ctxagent.8")
    usage = subprocess.run([sys.executable, str(REPO / "ctxagent.py"), "--help"], capture_output=True,
                           text=True, check=True).stdout
    missing = {o for o in re.findall(r"(--[a-z][a-z-]+)", usage) if o != "--help" and o not in page}
    codes = re.findall(r"^\s+(\d+)\s+\S", usage.split("exit codes:")[1], re.M)
    assert codes, usage
    missing |= {"exit %s" % c for c in codes if not re.search(r"^\.B %s$" % c, page, re.M)}
    assert not missing, "docs/man/ctxagent.8 lacks %s" % sorted(missing)
