"""OpenAPI-driven fuzzing of a real broker: schemathesis against docs/openapi.yaml.

A real ``twistd -n --pidfile= ctxd`` serves HTTPS on loopback (tests/e2e/helpers.py
BrokerProcess); every request is verified against its generated CA. For every operation of
the spec, three campaigns of generated requests, each with the credential the
operation needs (the site admin, the owning deployer, the join or the node token):

- ``generated``: everything generated from the spec (ids mostly name nothing);
- ``existing``: path parameters of a live context, node, group, data item and
  deployer (a fresh world per operation, so destructive operations start from a
  live object), body and query generated;
- ``negative``: the same live objects, with bodies and queries that violate the
  spec (for operations that have either); ``negative-path``: path parameters that
  violate it (for operations that have any).

Checks on every response: no 5xx (not_a_server_error), the status is declared, the
content type, headers and body conform to the declared response, and requests the
spec calls invalid are rejected (negative_data_rejection). Failures are collected
over all campaigns (with a curl command reproducing each, tokens masked) and fail
the test together.

Bounded for CI: CTXD_FUZZ_EXAMPLES (default 25) examples per campaign. ``make fuzz``
runs a long campaign (CTXD_FUZZ_EXAMPLES=1000). CTXD_FUZZ_TRACE=1 prints every
request and its answer.
"""

import os
import time
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pytest

# The fuzzer is a PyPI-only test tool: the suite on Debian 12's own libraries runs without it.
schemathesis = pytest.importorskip("schemathesis")
import requests  # noqa: E402 (schemathesis brings it)
from ctxd.api import ROUTES
from e2e import helpers
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.core.result import Ok
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

SPEC = Path(__file__).resolve().parents[1] / "docs" / "openapi.yaml"
EXAMPLES = int(os.environ.get("CTXD_FUZZ_EXAMPLES", "25"))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
NEGATIVE_CHECKS = CHECKS + [negative_data_rejection]
TIMEOUT = 15  # seconds for one request: no request may wait longer (long-poll waits are pinned to 0)
LONG_POLLS = ("{nid}/view", "{cid}/progress")
TRACE = bool(os.environ.get("CTXD_FUZZ_TRACE"))  # print every request and its answer
# What the broker's log must never show, whatever it was sent.
LOG_ALARMS = ("Traceback", "Unhandled Error", "unexpected error", "#critical]", "#error]")


class FuzzBroker(helpers.BrokerProcess):
    """The e2e broker, with the enrollment rate limit raised so enroll is fuzzed, not throttled."""

    def argv(self) -> List[str]:
        return super().argv() + ["--enroll-rate-per-source", "1000000", "--enroll-rate-per-token", "1000000"]


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    missing = helpers.components_missing()
    assert missing is None, missing
    b = FuzzBroker(tmp_path_factory.mktemp("fuzz"))
    try:
        b.start()
        yield b
    finally:
        b.kill()


class Live:
    """Plain requests to the broker, to build the objects the campaigns aim at."""

    def __init__(self, broker: helpers.BrokerProcess) -> None:
        self.url = broker.url
        self.ca = str(broker.ca_path)
        self.admin = (broker.state_dir / "admin.token").read_text().strip()
        self.session = requests.Session()
        # REQUESTS_CA_BUNDLE and the like would override a session's verify: ignore the
        # environment, and name the broker's CA on every request.
        self.session.trust_env = False
        self.session.verify = self.ca
        self.worlds = 0

    def call(self, method: str, path: str, token: Optional[str], body: Any = None, expect: int = 200) -> Any:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        r = self.session.request(method, self.url + path, json=body, headers=headers, timeout=TIMEOUT,
                                 verify=self.ca)
        assert r.status_code == expect, (method, path, r.status_code, r.text[:300])
        return r.json()

    def world(self) -> Tuple[Dict[str, str], Dict[str, Optional[str]]]:
        """A new deployer and context with two enrolled nodes: (path parameters, credential per auth kind)."""
        self.worlds += 1
        n = self.worlds
        owner = self.call("POST", "/v1/users", self.admin, {"name": f"fuzz-owner-{n}"}, expect=201)["token"]
        target = self.call("POST", "/v1/users", self.admin, {"name": f"fuzz-target-{n}"}, expect=201)
        created = self.call("POST", "/v1/contexts", owner, {
            "name": f"fuzz world {n}",
            "open_for_injection": True,
            "expires_in": 3600,
            "groups": [
                {"name": "head", "quantity": 1, "source_check": False, "provides": ["master"], "requires": [{"role": "worker"}],
                 "data": ["gridmap"]},
                {"name": "compute", "quantity": 2000, "source_check": False, "provides": ["worker"],
                 "requires": [{"role": "master", "ready": True}], "all_identities": True},
            ],
            "data": {"gridmap": [{"b64": "aGVsbG8K"}]},
        }, expect=201)
        cid = created["context"]["id"]
        joins = {g: b["join_token"] for g, b in created["bootstraps"].items()}
        nodes = []
        for i, group in enumerate(("head", "compute"), 1):
            identity = {"hostname": f"w{n}n{i}", "fqdn": f"w{n}n{i}.fuzz.test", "primary_ip": f"10.77.{n % 250}.{i}"}
            nodes.append(self.call("POST", f"/v1/contexts/{cid}/enroll", joins[group],
                                   {"instance_key": f"fuzz-world-{n:06d}-node-{i}", "identity": identity},
                                   expect=201))
        params = {"cid": cid, "nid": nodes[1]["node_id"], "group": "compute", "name": "gridmap",
                  "user": target["name"]}
        credentials = {"none": None, "site-admin": self.admin, "deployer": owner, "owner": owner,
                       "join": joins["compute"], "node": nodes[1]["node_token"]}
        return params, credentials


def test_fuzz_openapi(broker):
    started = time.monotonic()
    live = Live(broker)
    schema = schemathesis.openapi.from_path(str(SPEC))
    operations = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), f"schemathesis cannot use an operation of the spec: {result.err()}"
        operations.append(result.ok())
    assert len(operations) == len(ROUTES), "the spec and the route table differ (see tests/test_openapi.py)"

    examples = Counter()  # campaign -> examples run
    statuses: Dict[str, Counter] = {}  # operation label -> status counts
    failures: Dict[Tuple[str, str, str], str] = {}  # (operation, campaign, failure title) -> first report
    nothing_to_negate: List[str] = []

    def campaign(operation, auth: str, name: str, mode: GenerationMode, credential: Optional[str],
                 path_parameters: Optional[Dict[str, str]], checks) -> None:
        headers = {"Authorization": f"Bearer {credential}"} if credential else None
        query = {"wait": 0} if operation.path.endswith(LONG_POLLS) else None
        strategy = operation.as_strategy(generation_mode=mode, headers=headers, path_parameters=path_parameters,
                                         query=query)
        label = f"{operation.method.upper()} {operation.path}"

        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=False,
                  suppress_health_check=list(HealthCheck))
        @given(case=strategy)
        def run(case) -> None:
            examples[name] += 1
            try:
                response = case.call(base_url=live.url, session=live.session, timeout=TIMEOUT, verify=live.ca)
            except requests.RequestException as e:  # the broker cut or never answered a request
                failures.setdefault((label, name, type(e).__name__), f"{case.as_curl_command(base_url=live.url)}\n{e}")
                return
            statuses.setdefault(label, Counter())[response.status_code] += 1
            if TRACE:
                print(f"[{name}] {case.method} {response.request.url} -> {response.status_code} {response.text[:160]}")
            try:
                case.validate_response(response, checks=checks)
            except FailureGroup as group:
                for failure in group.exceptions:
                    failures.setdefault((label, name, failure.title), str(group)[:3000])

        run()

    for operation in operations:
        auth = operation.definition.raw["x-ctxd-token"]
        # Every campaign of this operation aims at the objects of one new world.
        params, credentials = live.world()
        names = [p.name for p in operation.path_parameters]
        fixed = {p: params[p] for p in names}
        generated_credential = credentials["site-admin"] if auth in ("deployer", "owner") else credentials[auth]
        campaign(operation, auth, "generated", GenerationMode.POSITIVE, generated_credential, None, CHECKS)
        campaign(operation, auth, "existing", GenerationMode.POSITIVE, credentials[auth], fixed, CHECKS)
        raw = operation.definition.raw
        if "requestBody" in raw or any(p.get("in") == "query" for p in raw.get("parameters", [])):
            campaign(operation, auth, "negative", GenerationMode.NEGATIVE, credentials[auth], fixed, NEGATIVE_CHECKS)
        else:  # no body, no query, fixed path and credential: nothing can be made invalid
            nothing_to_negate.append(f"{operation.method.upper()} {operation.path}")
        if names:
            campaign(operation, auth, "negative-path", GenerationMode.NEGATIVE, credentials[auth], None,
                     NEGATIVE_CHECKS)

    assert broker.proc.poll() is None, "the broker died during the fuzz run\n" + helpers.tail(broker.log())
    alarms = [line for line in broker.log().splitlines() if any(a in line for a in LOG_ALARMS)]
    elapsed = time.monotonic() - started
    total = sum(examples.values())
    print(f"\nfuzz: {total} examples ({', '.join(f'{k} {v}' for k, v in examples.items())}) over "
          f"{len(operations)} operations, {EXAMPLES} per campaign, {elapsed:.1f} s, {len(failures)} failures")
    print(f"  no negative campaign (no body or query to make invalid): {', '.join(nothing_to_negate)}")
    for label, counts in statuses.items():
        print(f"  {label:55} " + " ".join(f"{s}x{c}" for s, c in sorted(counts.items())))
    server_errors = sum(c for counts in statuses.values() for s, c in counts.items() if s >= 500)
    report = "\n\n".join(f"== {label} [{name}] {title}\n{text}" for (label, name, title), text in failures.items())
    assert not failures and not server_errors and not alarms, (
        f"{len(failures)} distinct failures, {server_errors} server errors, {len(alarms)} alarming log lines "
        f"{alarms[:5]}:\n{report}"
    )
