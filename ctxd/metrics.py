"""What ctxd tells the site's monitoring: Prometheus metrics, and liveness and readiness.

:class:`Metrics` holds the counters and histograms the broker updates as it works, and
reads the rest (contexts, nodes by state, waiters, connections, the journal) from the
broker when scraped. No metric has a per-node or per-address label: a 10,000-node cluster
makes no more series than a 4-node one. :func:`monitoring_site` serves ``/metrics``,
``/livez`` and ``/readyz`` in plain HTTP for a loopback listener (``--metrics-listen``);
docs/operations.md lists every metric with a scrape configuration and alert rules.
"""

from typing import Any, Callable, Iterator, Optional

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from twisted.web import resource, server

# Seconds: a request is answered in milliseconds; a long-poll waits up to a minute.
REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
JOURNAL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
NODE_OK_BUCKETS = (1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)


class Metrics:
    """The broker's metrics, in their own registry (nothing global)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("ctxd_requests", "HTTP requests answered, by route and status.",
                                ["route", "status"], registry=r)
        self.request_seconds = Histogram("ctxd_request_seconds", "Time to answer a request, long-polls "
                                         "included, by route.", ["route"], buckets=REQUEST_BUCKETS, registry=r)
        self.enrollments = Counter("ctxd_enrollments", "Enrollment attempts by outcome: new, again (a known "
                                   "instance), or the refusal's error code.", ["outcome"], registry=r)
        self.refusals = Counter("ctxd_refusals", "Requests refused, by error code.", ["code"], registry=r)
        self.auth_failures = Counter("ctxd_auth_failures", "Requests refused for their credential, by the kind "
                                     "presented: none, malformed, or a token prefix.", ["kind"], registry=r)
        self.journal_append_seconds = Histogram("ctxd_journal_append_seconds", "From a change's append to its "
                                                "being durable.", buckets=JOURNAL_BUCKETS, registry=r)
        self.journal_sync_seconds = Histogram("ctxd_journal_sync_seconds", "One write and fdatasync of the "
                                              "journal.", buckets=JOURNAL_BUCKETS, registry=r)
        self.node_ok_seconds = Histogram("ctxd_node_ok_seconds", "From a node's enrollment to its first ok "
                                         "report.", buckets=NODE_OK_BUCKETS, registry=r)
        self.broker: Any = None
        self.connections: Callable[[], int] = lambda: 0

    def watch(self, broker: Any, connections: Callable[[], int]) -> None:
        """Read the broker's state (and open connections) at every scrape."""
        self.broker = broker
        self.connections = connections
        self.registry.register(_StateCollector(self))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _StateCollector:
    """Gauges read from the broker when scraped (nothing to keep up to date)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Any]:
        broker = self.metrics.broker
        model = broker.model
        yield _gauge("ctxd_contexts", "Contexts held.", len(model.contexts))
        nodes = GaugeMetricFamily("ctxd_nodes", "Nodes of all contexts, by state (revoked nodes apart).",
                                  labels=["state"])
        totals = {"enrolled": 0, "contextualizing": 0, "ok": 0, "error": 0}
        revoked = 0
        for ctx in model.contexts.values():
            for state, count in ctx.counts.items():
                totals[state] += count
            revoked += len(ctx.nodes) - ctx.members
        for state, count in totals.items():
            nodes.add_metric([state], count)
        nodes.add_metric(["revoked"], revoked)
        yield nodes
        yield _gauge("ctxd_deployers", "Deployer credentials that are not revoked.",
                     sum(1 for u in model.users.values() if u.revoked_at is None))
        yield _gauge("ctxd_waiters", "Long-polls waiting for a node's view or a context's progress to change.",
                     broker.waiter_count())
        yield _gauge("ctxd_connections", "Open client connections.", self.metrics.connections())
        journal = broker.journal
        yield _counter("ctxd_journal_records", "Records made durable since start.", journal.records_synced)
        yield _counter("ctxd_journal_syncs", "Journal writes with fdatasync since start.", journal.syncs)
        yield _counter("ctxd_journal_compactions", "Journal compactions since start.", journal.compactions)
        yield _gauge("ctxd_journal_bytes", "Size of the live journal file.", journal.size)
        yield _gauge("ctxd_ready", "1 when the broker takes changes (its journal works), else 0.",
                     1 if broker.ready() else 0)


def _gauge(name: str, text: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, text, value=value)


def _counter(name: str, text: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, text, value=value)


class Monitoring(resource.Resource):
    """``/metrics``, ``/livez`` and ``/readyz``, for a loopback listener."""

    isLeaf = True

    def __init__(self, metrics: Metrics, ready: Callable[[], bool]) -> None:
        super().__init__()
        self.metrics = metrics
        self.ready = ready

    def render_GET(self, request: server.Request) -> bytes:
        request.setHeader("cache-control", "no-store")
        if request.path == b"/metrics":
            request.setHeader("content-type", CONTENT_TYPE_LATEST)
            return self.metrics.exposition()
        request.setHeader("content-type", "text/plain; charset=utf-8")
        if request.path == b"/livez":
            return b"ok\n"
        if request.path == b"/readyz":
            if self.ready():
                return b"ok\n"
            request.setResponseCode(503)
            return b"not ready: the journal failed or the broker is stopping\n"
        request.setResponseCode(404)
        return b"not found: /metrics, /livez, /readyz\n"


class QuietSite(server.Site):
    """A Site that writes no access log: a scraper polling every few seconds, or 10,000
    agents long-polling, would fill the broker's log with lines that say nothing (the
    ctxd_requests metric counts them; the audit log has what matters for security)."""

    def log(self, request) -> None:
        pass


class MonitoringSite(QuietSite):
    noisy = False


def monitoring_site(metrics: Metrics, ready: Callable[[], bool], timeout: Optional[int] = 60) -> server.Site:
    site = MonitoringSite(Monitoring(metrics, ready), timeout=timeout)
    site.displayTracebacks = False
    return site
