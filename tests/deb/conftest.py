"""Fixtures of the package tests: the built packages, an upgrade of them, a booted machine.

They run from ``make test-package`` (which builds the packages into build/deb/ and sets
CTXD_DEB_DIR) and are skipped, saying why, anywhere else.
"""

from __future__ import annotations

import email.utils
import os
import shutil
import subprocess
from pathlib import Path
from typing import Dict, List

import pytest

from tests.e2e.helpers import tail

from . import machine as machines

VERSION = "0.1.0"
UPGRADE = "0.1.1"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "pkg_rep_" + rep.when, rep)


def _debs(directory: Path, version: str) -> List[Path]:
    found = [directory / ("%s_%s_all.deb" % (name, version)) for name in ("ctxd", "ctxd-agent")]
    missing = [str(p) for p in found if not p.exists()]
    assert not missing, "not built: %s" % ", ".join(missing)
    return found


def _build_upgrade(source: Path, workdir: Path) -> Path:
    """The same source as a newer Debian version (a new changelog entry), built into WORKDIR."""
    tree = workdir / "ctxd"
    shutil.copytree(source, tree, symlinks=True)     # dpkg-buildpackage cleans the last build's files
    changelog = tree / "debian" / "changelog"
    entry = ("ctxd (%s) bookworm; urgency=medium\n\n"
             "  * Package test: the same code as a newer version, to upgrade to.\n\n"
             " -- ctxd developers <ctxd-devel@ctxd.example.org>  %s\n\n" % (UPGRADE, email.utils.formatdate()))
    changelog.write_text(entry + changelog.read_text())
    done = subprocess.run(["dpkg-buildpackage", "-us", "-uc", "-b"], cwd=tree, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, "building %s failed:\n%s" % (UPGRADE, tail(done.stdout + done.stderr))
    return workdir


@pytest.fixture(scope="session")
def debs(tmp_path_factory) -> Dict[str, List[Path]]:
    """{version: [ctxd deb, ctxd-agent deb]} for the built version and its upgrade."""
    given = os.environ.get("CTXD_DEB_DIR")
    if not given:
        pytest.skip("package tests run from `make test-package` (it builds the packages)")
    reason = machines.unavailable_reason()
    if reason:
        pytest.skip(reason)
    built = Path(given)
    upgrade = _build_upgrade(built / "ctxd", tmp_path_factory.mktemp("upgrade"))
    return {VERSION: _debs(built, VERSION), UPGRADE: _debs(upgrade, UPGRADE)}


@pytest.fixture(scope="module")
def machine(tmp_path_factory, debs):
    """A freshly booted Debian 12 machine holding the packages in /root/debs/, not installed."""
    m = machines.Machine(tmp_path_factory.mktemp("machine"))
    m.make_root()
    inside = {version: [m.copy_in(p, "/root/debs/" + p.name) for p in paths]
              for version, paths in debs.items()}
    m.download(*inside[VERSION])          # the upgrade has the same dependencies
    m.boot()
    try:
        yield m
    finally:
        m.stop()


@pytest.fixture(autouse=True)
def _machine_diagnostics(request):
    """On failure, print ctxd's journal and the machine's console."""
    yield
    failed = any(getattr(getattr(request.node, "pkg_rep_" + when, None), "failed", False)
                 for when in ("setup", "call"))
    m = request.node.funcargs.get("machine")
    if failed and m is not None and m.init_pid is not None:
        journal = m.run("journalctl", "--no-pager", "-u", "ctxd", "-n", "80", check=False).stdout
        print("\n===== journalctl -u ctxd =====\n%s\n===== console =====\n%s" % (journal, m.console_log()))
