"""Fixtures of the end-to-end tests: a running broker, namespace hosts, diagnostics."""

from __future__ import annotations

import pytest

from . import helpers, netns


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "e2e_rep_" + rep.when, rep)


def pytest_terminal_summary(terminalreporter):
    timings = [(r.nodeid, v) for r in terminalreporter.getreports("passed")
               for k, v in r.user_properties if k == "e2e_timing"]
    if timings:
        terminalreporter.section("ctxd e2e timings")
        for nodeid, text in timings:
            terminalreporter.write_line("%s: %s" % (nodeid, text))


@pytest.fixture(autouse=True)
def _components_present():
    reason = helpers.components_missing()
    if reason:
        pytest.skip(reason)


@pytest.fixture
def diag(request):
    """Diagnostics (logs, records) printed to the report if the test fails."""
    d = helpers.Diagnostics()
    yield d
    failed = any(getattr(getattr(request.node, "e2e_rep_" + when, None), "failed", False)
                 for when in ("setup", "call"))
    if failed:
        print("\n===== e2e diagnostics =====\n" + d.dump())


@pytest.fixture
def timing(request):
    """timing(text): shown in the 'ctxd e2e timings' summary section."""
    def record(text: str) -> None:
        print(text)
        request.node.user_properties.append(("e2e_timing", text))
    return record


@pytest.fixture
def broker(tmp_path, diag):
    """A real ``twistd -n ctxd`` on a free loopback port, killed at teardown."""
    yield from helpers.running_broker(tmp_path, diag)


@pytest.fixture
def vms(tmp_path, diag):
    """make(behaviour=None): head + 3 computes on loopback, killed at teardown."""
    made = []

    def make(behaviour=None):
        vms = helpers.loopback_vms(tmp_path / "vms", behaviour)
        for vm in vms:
            diag.add_file("agent log of %s" % vm.label, vm.log_path)
            diag.add_file("records of %s" % vm.label, vm.record, lines=40)
        made.extend(vms)
        return vms

    try:
        yield make
    finally:
        for vm in made:
            vm.kill()


@pytest.fixture
def netlab(tmp_path):
    """A private bridge and namespace hosts; everything removed at teardown."""
    reason = netns.unavailable_reason()
    if reason:
        pytest.skip(reason)
    lab = netns.NetLab(tmp_path)
    try:
        lab.setup()
        yield lab
    finally:
        lab.close()


@pytest.fixture
def cluster(tmp_path):
    """The issue's torque cluster file (head x1, compute x3) and its grid-mapfile."""
    return helpers.torque_cluster(tmp_path / "cluster")
