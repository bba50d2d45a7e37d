"""Monitoring a real broker: /metrics scraped during a small end-to-end run, /livez, /readyz."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Dict, Tuple

from prometheus_client.parser import text_string_to_metric_families

from .helpers import EXIT_OK, start_all, wait_all


def _get(broker, path: str) -> Tuple[int, str]:
    try:
        with urllib.request.urlopen("http://127.0.0.1:%d%s" % (broker.metrics_port, path), timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _scrape(broker) -> Dict[Tuple[str, Tuple[Tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of the broker's /metrics."""
    status, text = _get(broker, "/metrics")
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_count_a_real_run(broker, vms, tmp_path, cluster, diag):
    """Four real agents contextualize a cluster; the scrape says so: one context, four nodes ok,
    four new enrollments, one refused anonymous request, journal syncs, view requests and
    enrollment-to-ok times - and no label that names a node or an address."""
    assert _get(broker, "/livez") == (200, "ok\n") and _get(broker, "/readyz") == (200, "ok\n")
    before = _scrape(broker)
    assert before[("ctxd_contexts", ())] == 0
    nodes = vms()
    ctx = broker.create(cluster.path, tmp_path / "out")
    assert wait_all(start_all(nodes, ctx)) == {vm.label: EXIT_OK for vm in nodes}
    request = urllib.request.Request(broker.url + "/v1/contexts")
    try:
        import ssl
        urllib.request.urlopen(request, context=ssl.create_default_context(cafile=str(broker.ca_path)), timeout=10)
    except urllib.error.HTTPError as e:
        assert e.code == 401
    metrics = _scrape(broker)
    diag.add("metrics", lambda: json.dumps({"%s%s" % k: v for k, v in metrics.items()}, indent=1))

    def value(name, **labels):
        return metrics.get((name, tuple(sorted(labels.items()))), 0.0)

    assert value("ctxd_contexts") == 1
    assert value("ctxd_nodes", state="ok") == 4
    assert value("ctxd_nodes", state="error") == value("ctxd_nodes", state="revoked") == 0
    assert value("ctxd_enrollments_total", outcome="new") == 4
    assert value("ctxd_requests_total", route="enroll", status="201") == 4
    assert value("ctxd_requests_total", route="create_context", status="201") == 1
    assert value("ctxd_requests_total", route="list_contexts", status="401") == 1
    assert value("ctxd_auth_failures_total", kind="none") == 1
    assert value("ctxd_refusals_total", code="unauthorized") == 1
    assert value("ctxd_request_seconds_count", route="get_view") >= 4
    assert value("ctxd_node_ok_seconds_count") == 4
    assert value("ctxd_journal_syncs_total") >= 1 and value("ctxd_journal_records_total") >= 1 + 4 * 2   # create; enroll, ok
    assert value("ctxd_journal_sync_seconds_count") == value("ctxd_journal_syncs_total")
    assert value("ctxd_journal_bytes") > 0
    assert value("ctxd_ready") == 1 and value("ctxd_waiters") == 0
    node_ids = [n["id"] for n in broker.status(ctx.cid)["nodes"]]
    for (_, labels), _ in metrics.items():
        for _, label in labels:
            assert label not in node_ids and not label.startswith("127."), label
