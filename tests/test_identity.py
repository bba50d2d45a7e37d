"""A node speaks only for itself: names, addresses and keys are each one node's; its
address is where it speaks from; its names lie in the context's domain; a revoked node
leaves every view. (The same with real processes: tests/e2e/test_impostor.py.)"""

import copy
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import ADMIN_TOKEN, Client, identity, instance_key, result_of, torque, torque_cluster

import ctxagent
from ctxd import rules, validate
from ctxd.errors import RequestError
from ctxd.model import SITE_ADMIN, Model

HEAD, C2, C3 = 1, 2, 3


def nodes_of(client):
    """A torque context with the head and one compute enrolled: (cid, joins, {n: (nid, token)})."""
    cid, created = client.create()
    joins = {g: b["join_token"] for g, b in created["bootstraps"].items()}
    nodes = {}
    for n, group in ((HEAD, "head"), (C2, "compute")):
        status, enrolled = client.enroll(cid, joins[group], n)
        assert status == 201, enrolled
        nodes[n] = (enrolled["node_id"], enrolled["node_token"])
    return cid, joins, nodes


def status(client, cid):
    return client.call("GET", f"/v1/contexts/{cid}", ADMIN_TOKEN)[1]


def view(client, cid, node):
    nid, token = node
    return client.call("GET", f"/v1/contexts/{cid}/nodes/{nid}/view", token)[1]


def head_claims():
    """Each thing of the head's identity a compute may try to claim, as (what, identity changes)."""
    head = identity(HEAD)
    return [
        ("hostname", {"hostname": head["hostname"]}),
        ("hostname in other case", {"hostname": head["hostname"].upper()}),
        ("fqdn", {"fqdn": head["fqdn"]}),
        ("fqdn as hostname", {"hostname": "other", "fqdn": head["hostname"]}),
        ("hostname as fqdn", {"hostname": head["fqdn"].split(".")[0], "fqdn": "other.cluster.test"}),
        ("primary_ip", {"primary_ip": head["primary_ip"]}),
        ("head's primary among its interfaces", {"interfaces": [{"name": "eth1", "ipv4": [head["primary_ip"]]}]}),
        ("ssh host key", {"ssh_host_keys": head["ssh_host_keys"]}),
    ]


@pytest.mark.parametrize("what, changes", head_claims(), ids=[w for w, _ in head_claims()])
def test_a_node_cannot_claim_another_nodes_names_address_or_key(what, changes):
    """Enrolling, or re-reporting, with anything the head holds is 409 identity_conflict naming
    the field, and changes nothing: not the journal, not the status, not any view."""
    client = Client()
    cid, joins, nodes = nodes_of(client)
    before = (copy.deepcopy(client.journal.records), status(client, cid), view(client, cid, nodes[HEAD]))
    claim = dict(identity(C3), **changes)
    code, answer = client.enroll(cid, joins["compute"], C3, **changes)
    assert (code, answer["error"]) == (409, "identity_conflict"), answer
    assert "another node" in answer["message"] and "ctxd_" not in answer["message"]
    nid, token = nodes[C2]
    code, answer = client.call("PUT", f"/v1/contexts/{cid}/nodes/{nid}/identity", token, claim,
                               source=claim["primary_ip"])
    assert (code, answer["error"]) == (409, "identity_conflict"), answer
    assert (client.journal.records, status(client, cid), view(client, cid, nodes[HEAD])) == before


def test_a_node_may_repeat_and_change_its_own_identity():
    """Re-enrolling and re-reporting one's own identity is fine; a name a node gave up is free again."""
    client = Client()
    cid, joins, nodes = nodes_of(client)
    code, again = client.enroll(cid, joins["compute"], C2)  # the same instance: its own claims
    assert code == 200
    nid, token = again["node_id"], again["node_token"]
    renamed = dict(identity(C2), hostname="renamed", fqdn="renamed.cluster.test")
    assert client.call("PUT", f"/v1/contexts/{cid}/nodes/{nid}/identity", token, renamed,
                       source=renamed["primary_ip"])[0] == 200
    # node2's old names are free: a third node may take them.
    code, answer = client.enroll(cid, joins["compute"], C3, hostname="node2", fqdn="node2.cluster.test")
    assert code == 201, answer


def test_addresses_every_vm_has_do_not_break_a_cluster():
    """A container bridge (172.17.0.1) and link-local addresses on every VM are never anyone's:
    the cluster assembles and no view offers them as a peer's address."""
    client = Client()
    shared = [{"name": "docker0", "ipv4": ["172.17.0.1"], "ipv6": ["fe80::42:acff:fe11:1"]},
              {"name": "eth0", "ipv4": [], "ipv6": ["fe80::1"]}]
    cid, created = client.create()
    joins = {g: b["join_token"] for g, b in created["bootstraps"].items()}
    for n, group in ((1, "head"), (2, "compute"), (3, "compute"), (4, "compute")):
        ifaces = [{"name": "eth0", "ipv4": [f"10.9.0.{n}"], "ipv6": []}] + shared
        assert client.enroll(cid, joins[group], n, interfaces=ifaces)[0] == 201
    peers = status(client, cid)["nodes"]
    assert sorted(n["identity"]["primary_ip"] for n in peers) == [f"10.9.0.{n}" for n in (1, 2, 3, 4)]
    # ... and such an address is refused as a primary one.
    for address in ("fe80::1", "169.254.1.1", "0.0.0.0", "224.0.0.1"):
        with pytest.raises(RequestError, match="cannot be a peer's address"):
            validate.identity(dict(identity(5), primary_ip=address))


def test_primary_address_must_be_where_the_node_speaks_from():
    """By default a node's primary_ip is the request's source address; the refusal says how to
    turn the check off for VMs behind NAT; an IPv4-mapped source counts as its IPv4 address."""
    client = Client()
    cid, created = client.create()
    join = created["bootstraps"]["head"]["join_token"]
    code, answer = client.enroll(cid, join, HEAD, source="192.0.2.50")
    assert (code, answer["error"]) == (403, "identity_refused")
    assert "192.0.2.50" in answer["message"] and "source_check = false" in answer["message"]
    assert client.journal.records[1:] == []
    assert client.enroll(cid, join, HEAD, source="::ffff:10.9.0.1")[0] == 201
    nat, created = client.create(torque_cluster(source_check=False))
    assert client.enroll(nat, created["bootstraps"]["head"]["join_token"], HEAD, source="192.0.2.50")[0] == 201
    assert status(client, nat)["nodes"][0]["identity"]["source_address"] == "192.0.2.50"


def test_fqdn_must_lie_in_the_declared_domain():
    """With a domain, an fqdn outside it is 403 identity_refused; inside it (any case) is fine."""
    client = Client()
    body = dict(torque_cluster(), domain="Cluster.Test")
    cid, created = client.create(body)
    assert status(client, cid)["domain"] == "cluster.test"
    join = created["bootstraps"]["compute"]["join_token"]
    code, answer = client.enroll(cid, join, C2, fqdn="nfs.site.example")
    assert (code, answer["error"]) == (403, "identity_refused") and "cluster.test" in answer["message"]
    code, answer = client.enroll(cid, join, C2, fqdn="evilcluster.test")
    assert code == 403, answer
    assert client.enroll(cid, join, C2, fqdn="NODE2.cluster.TEST")[0] == 201


def test_replay_applies_the_rule_to_an_old_journal():
    """A journal written before the rule (two nodes claiming one name) replays without the conflict:
    the later claim is not applied, as the request would be refused today."""
    client = Client()
    cid, joins, nodes = nodes_of(client)
    records = copy.deepcopy(client.journal.records)
    impostor = dict(records[-1], node="X" * 22, instance_hash="f" * 64, token_hash="e" * 64,
                    identity=dict(identity(C3), hostname="node1", fqdn="node1.cluster.test"))
    replayed = Model()
    for record in records + [impostor]:
        replayed.apply(record)
    node = replayed.contexts[cid].nodes["X" * 22]
    assert node.identity == {} and node.public == {}
    head = replayed.contexts[cid].nodes[nodes[HEAD][0]]
    compute_view = replayed.view(replayed.contexts[cid].nodes[nodes[C2][0]])
    assert [p["hostname"] for p in compute_view["all_identities"]] == ["node1", "node2"]
    assert head.identity["hostname"] == "node1"


def test_revoked_node_leaves_every_view_and_frees_its_slot(tmp_path):
    """Revoking a node removes it from its peers' next views (their revision moves, waiters wake),
    frees its slot for a replacement, keeps its instance out, and is audited."""
    from ctxd.audit import AuditLog

    client = Client()
    client.broker.audit = AuditLog(str(tmp_path / "audit.log"), client.clock.seconds)
    cid, joins, nodes = torque(client)
    head_view = view(client, cid, nodes[1])
    victim = nodes[4][0]
    assert victim in [p["node_id"] for p in head_view["roles"]["torqueslave"]["providers"]]
    pending = client.call_deferred("GET", f"/v1/contexts/{cid}/nodes/{nodes[1][0]}/view?since="
                                   f"{head_view['revision']}&wait=30", nodes[1][1])
    client.stub.flush()
    assert client.call("POST", f"/v1/contexts/{cid}/nodes/{victim}/revoke", ADMIN_TOKEN, {})[0] == 200
    code, woken = result_of(pending)
    assert code == 200 and woken["revision"] > head_view["revision"]
    assert victim not in [p["node_id"] for p in woken["roles"]["torqueslave"]["providers"]]
    assert woken["complete"] is False  # one compute short now
    compute_view = view(client, cid, nodes[2])
    assert victim not in [p["node_id"] for p in compute_view["all_identities"]]
    summary = status(client, cid)
    assert summary["counts"]["enrolled"] == 3 and summary["complete"] is False
    assert [n["revoked"] for n in summary["nodes"] if n["id"] == victim] == [True]
    # The slot is free: a replacement enrolls (it may take the revoked node's names); the revoked
    # instance may not come back.
    assert client.enroll(cid, joins["compute"], 9, hostname="node4", fqdn="node4.cluster.test")[0] == 201
    assert client.enroll(cid, joins["compute"], 4)[0] == 403
    audit = [json.loads(line) for line in (tmp_path / "audit.log").read_text().splitlines()]
    assert any(e["action"] == "revoke_node" and e["outcome"] == 200 and victim in e["object"] for e in audit)


def test_identity_size_is_bounded_and_a_full_group_is_refused_first():
    """An identity over its budget is 400; a full group answers 409 before the identity is read."""
    client = Client()
    cid, created = client.create()
    join = created["bootstraps"]["head"]["join_token"]
    fat = [{"name": f"e{i}", "ipv4": [f"10.{i}.{j}.1" for j in range(64)]} for i in range(64)]
    code, answer = client.enroll(cid, join, HEAD, interfaces=fat)
    assert code == 400 and f"more than the {rules.MAX_IDENTITY}" in answer["message"]
    assert client.enroll(cid, join, HEAD)[0] == 201
    code, answer = client.enroll(cid, join, 7, primary_ip="not an address")
    assert (code, answer["error"]) == (409, "enrollment_full")


# -- what the broker accepts, every agent accepts ------------------------------

labels = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9-]{0,20}", fullmatch=True)
keys = st.builds(lambda kind, key, tail: f"{kind} {key}{tail}", st.sampled_from(rules.SSH_KEY_TYPES),
                 st.one_of(st.from_regex(r"[A-Za-z0-9+/]{1,100}={0,2}", fullmatch=True),
                           st.integers(3900, 4100).map(lambda n: "A" * n)),   # around the size limit
                 st.sampled_from(["", "", " root@host"]))
plausible = st.fixed_dictionaries({
    "hostname": labels,
    "fqdn": st.lists(labels, min_size=1, max_size=4).map(".".join).map(lambda f: f + "." if len(f) % 7 == 0 else f),
    "primary_ip": st.ip_addresses().map(str),
    "interfaces": st.lists(st.fixed_dictionaries({
        "name": st.from_regex(r"[a-z][a-z0-9.@:-]{0,15}", fullmatch=True),
        "ipv4": st.lists(st.ip_addresses(v=4).map(str), max_size=3),
        "ipv6": st.lists(st.ip_addresses(v=6).map(str), max_size=3)}), max_size=3),
    "ssh_host_keys": st.lists(keys, max_size=3),
})
# Values at the edges of what either side accepts, put into one field of a plausible identity.
EDGES = {
    "hostname": st.one_of(st.text(max_size=70), st.sampled_from(["a" * 63, "a" * 64, "-a", "a-", "1", "ÄB"])),
    "fqdn": st.one_of(st.text(max_size=40), st.from_regex(r"[0-9]{1,3}(\.[0-9]{1,3}){0,3}\.?", fullmatch=True),
                      st.sampled_from(["a." * 126 + "ab", "a." * 125 + "abc", "a.1b", "a.b1", "a..b", "a.b."])),
    "primary_ip": st.one_of(st.text(max_size=45), st.sampled_from(["fe80::1%eth0", "::ffff:10.0.0.1", "01.2.3.4"])),
    "ssh_host_keys": st.lists(st.one_of(keys, st.text(max_size=50),
                                        st.sampled_from(["ssh-dss AAAA", "ssh-ed25519 AAAA==="])), max_size=2),
}
claimed = st.one_of(plausible, st.builds(
    lambda ident, field, data: dict(ident, **{field: data.draw(EDGES[field])}),
    plausible, st.sampled_from(sorted(EDGES)), st.data()))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(claimed)
def test_what_the_broker_accepts_every_agent_accepts(value):
    """Any identity the broker stores passes the agent's checks, as its own identity and as a peer's."""
    try:
        stored = validate.identity(value)
    except RequestError:
        return
    cid, me, peer = "C" * 22, "M" * 22, "P" * 22
    other = {"hostname": "other", "fqdn": "other.example", "primary_ip": "192.0.2.99", "interfaces": [],
             "ssh_host_keys": []}
    public = {"node_id": peer, "group": "g", "hostname": stored["hostname"], "fqdn": stored["fqdn"],
              "ip": stored["primary_ip"], "ssh_host_keys": stored["ssh_host_keys"]}
    for self_identity, peers in ((stored, []), (other, [public])):
        raw = {"context_id": cid, "node_id": me, "revision": 1, "complete": True, "waiting_for": [],
               "self": self_identity, "roles": {"r": {"ready": False, "providers": peers}}, "data": {},
               "all_identities": peers}
        ctxagent.validate_view(raw, cid, me)


def test_model_refuses_conflicts_without_http():
    """The rule lives in the model: prepare_identity refuses another node's name whatever the caller."""
    model = Model()
    record, joins = model.prepare_create(torque_cluster(), 1.0)
    model.apply(record)
    cid = record["ctx"]
    enrolled = []
    for n, group in ((1, "head"), (2, "compute")):
        ident = identity(n)
        rec, _, _ = model.prepare_enroll(cid, group, {"instance_key": instance_key(n), "identity": ident},
                                         ident["primary_ip"], 2.0)
        model.apply(rec)
        enrolled.append(rec["node"])
    with pytest.raises(RequestError) as info:
        model.prepare_identity(cid, enrolled[1], dict(identity(2), fqdn="NODE1.cluster.test"), "10.9.0.2", 3.0)
    assert info.value.code == "identity_conflict" and "node1.cluster.test" in info.value.message
    assert SITE_ADMIN.may_see(model.contexts[cid])


_OCTETS = st.one_of(st.integers(0, 999).map(str), st.sampled_from(["", "0", "00", "01", "007", "255", "256", "1e1", "٣"]))


@settings(max_examples=2000, deadline=None)
@given(st.lists(_OCTETS, min_size=3, max_size=5).map(".".join))
def test_the_ipv4_fast_path_answers_as_ipaddress_does(text):
    """validate.ip's dotted-quad shortcut gives what ipaddress gives: the same canonical text,
    or the same refusal (leading zeros, octets above 255, Unicode digits, 3 or 5 parts)."""
    import ipaddress
    try:
        expected = str(ipaddress.ip_address(text))
    except ValueError:
        expected = None
    try:
        got = validate.ip(text, "f")
    except RequestError:
        got = None
    assert got == expected
