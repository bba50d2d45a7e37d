"""ctxctl for elastic clusters (issue 13): scale, node remove, extend, the group lease in the
cluster file, and what status shows of target sizes, departed nodes and the expiry.

Argument checks, durations, the cluster file and the status rendering need no broker. The
commands themselves run against the real broker through tests/test_cli_args.py's Deployment
(the real API over an in-memory journal, one Clock), in TestAgainstTheBrokersElasticRoutes:
those need the broker's scale/remove/leave/extend routes.
"""

import json

import pytest
from support import torque_cluster
from test_cli_args import CID, T0, Deployment, utc

from ctxd import rules
from ctxd.ctxctl import main as cli
from ctxd.ctxctl import render
from ctxd.ctxctl.cluster import ClusterFileError, parse_cluster_text, parse_duration
from ctxd.ctxctl.main import parse_args

NID = "Tm9kZS1pZC0xMjM0NTY3OD"  # a well-formed node id, for tests that never reach a broker
OTHER = "T3RoZXItbm9kZS0xMjM0NT"
DAY = 86400


@pytest.fixture
def broker():
    """A fresh real broker, its clock at T0."""
    return Deployment()


# ------------------------------------------------------------------ durations

@pytest.mark.parametrize("text, seconds", [
    ("45s", 45), ("90m", 5400), ("12h", 43200), ("30d", 30 * DAY), ("600", 600), ("0", 0), ("007m", 420),
])
def test_durations_are_a_number_and_one_unit(text, seconds):
    """A duration is seconds, or a number with one unit s, m, h or d."""
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", [
    "", "m", "1h30m", "-5", "+5", "5 m", " 5m", "5m ", "1.5h", "10M", "10w", "1e3", "\u0661\u0660",
    "1" * 13,
])
def test_other_durations_are_refused(text):
    """Signs, fractions, spaces, other units, two units and non-ASCII digits are not durations."""
    with pytest.raises(ValueError, match=r"is not a duration: a number of seconds, or a number with a unit"):
        parse_duration(text)


def test_a_duration_is_a_string():
    """parse_duration refuses a number that is not text (the cluster file reader handles integers)."""
    with pytest.raises(ValueError):
        parse_duration(600)  # type: ignore[arg-type]


@pytest.mark.parametrize("seconds, text", [(600, "10m"), (5400, "90m"), (86400, "1d"), (45, "45s"),
                                           (3600, "1h"), (2 * DAY + 3600, "49h"), (0, "0s")])
def test_durations_print_as_they_are_read(seconds, text):
    """render.duration writes the largest unit that is exact, so parse_duration reads it back."""
    assert render.duration(seconds) == text
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("seconds, text", [(7 * DAY, "7d"), (7 * DAY - 1, "6d 23h"), (250, "4m 10s"),
                                           (3600 + 59, "1h"), (45.9, "45s"), (0, "0s"), (-3, "0s")])
def test_spans_show_two_units_rounded_down(seconds, text):
    """A remaining time shows its two largest units, rounded down (never negative)."""
    assert render.span(seconds) == text


# ------------------------------------------------------------------ arguments

def usage_error(argv, capsys, monkeypatch):
    """Run ctxctl with ``argv`` that must be refused by argparse: (exit code, stderr)."""
    monkeypatch.setattr(cli, "resolve_settings", lambda *a: pytest.fail("settings were resolved"))
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    captured = capsys.readouterr()
    assert captured.out == ""
    return info.value.code, captured.err


@pytest.mark.parametrize("argv, message", [
    (["scale", CID, "compute", "-1"], "scale: argument N: '-1' is not a number of nodes (0 to 100000)"),
    (["scale", CID, "compute", "3.5"], "'3.5' is not a number of nodes"),
    (["scale", CID, "compute", ""], "'' is not a number of nodes"),
    (["scale", CID, "compute", "\u0663"], "is not a number of nodes"),
    (["scale", CID, "compute", "100001"], "'100001': a group has at most 100000 nodes"),
    (["scale", CID, "a/b", "3"], "'a/b' is not a valid group name"),
    (["scale", "sh/ort", "compute", "3"], "'sh/ort' is not a context id"),
    (["scale", CID, "compute"], "the following arguments are required: N"),
    (["extend", CID, "--expires-in", "3x"], "extend: argument --expires-in: '3x' is not a duration"),
    (["extend", CID, "--expires-in", "1h30m"], "'1h30m' is not a duration"),
    (["extend", CID, "--expires-in", "59"], "'59': a context lives from 60s to 365d from now"),
    (["extend", CID, "--expires-in", "366d"], "'366d': a context lives from 60s to 365d from now"),
    (["extend", CID], "the following arguments are required: --expires-in"),
    (["extend", "../x", "--expires-in", "1d"], "is not a context id"),
    (["node", "remove", CID, "bad node!"], "node remove: argument NODE: 'bad node!' is not a node id"),
    (["node", "remove", CID, NID, "x"], "'x' is not a node id"),
    (["node", "remove", CID], "the following arguments are required: NODE"),
    (["node", "remove", CID, NID, OTHER, NID], f"node remove: node {NID} is given twice"),
])
def test_bad_arguments_are_one_usage_line(argv, message, capsys, monkeypatch):
    """A bad count, duration, name or id is a usage error: exit 2 and ONE 'ctxctl: error:' line
    naming it, found before settings or network."""
    code, err = usage_error(argv, capsys, monkeypatch)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("ctxctl: error: ") and message in err, err
    assert "Traceback" not in err and "internal error" not in err


def test_usage_errors_point_to_the_commands_help(capsys, monkeypatch):
    """The one line ends by naming the --help that shows the usage."""
    code, err = usage_error(["scale", CID, "compute", "x"], capsys, monkeypatch)
    assert (code, err.rstrip("\n").endswith("(see ctxctl scale --help)")) == (2, True)


@pytest.mark.parametrize("argv, expected", [
    (["scale", CID, "compute", "0"], {"command_key": "scale", "group": "compute", "quantity": 0}),
    (["scale", CID, "compute", "100000"], {"quantity": rules.MAX_QUANTITY}),
    (["extend", CID, "--expires-in", "30d"], {"command_key": "extend", "expires_in": 30 * DAY}),
    (["extend", CID, "--expires-in", "60"], {"expires_in": 60}),
    (["extend", CID, "--expires-in", "365d"], {"expires_in": rules.MAX_EXPIRES_IN}),
    (["node", "remove", CID, NID, OTHER], {"command_key": "node remove", "nodes": [NID, OTHER], "shrink": False}),
    (["node", "remove", CID, NID, "--shrink"], {"nodes": [NID], "shrink": True}),
])
def test_good_arguments(argv, expected):
    """Counts, durations and node lists as the commands receive them."""
    args = vars(parse_args(argv))
    assert {key: args[key] for key in expected} == expected and args["context"] == CID


# ------------------------------------------------------------------ the cluster file

CLUSTER = """\
name = "elastic"
[[group]]
name = "head"
quantity = 1
provides = ["master"]
[[group]]
name = "compute"
quantity = 2
requires = [{ role = "master", ready = true }]
"""


def with_lease(value):
    return CLUSTER + f"lease = {value}\n"


@pytest.mark.parametrize("value, seconds", [
    ('"10m"', 600), ('"90s"', 90), ('"2h"', 7200), ('"30d"', rules.MAX_LEASE), ('"10"', 10), ("10", 10),
    ("2_592_000", rules.MAX_LEASE),
])
def test_a_groups_lease_is_sent_in_seconds(value, seconds):
    """lease = "10m" (or an integer of seconds) becomes the group's "lease" in the create body."""
    body = parse_cluster_text(with_lease(value))
    assert body["groups"][1]["lease"] == seconds
    assert "lease" not in body["groups"][0]


def test_no_lease_sends_no_key():
    """A file without leases gives the same body as before leases (an older broker accepts it)."""
    body = parse_cluster_text(CLUSTER)
    assert all("lease" not in g for g in body["groups"])


@pytest.mark.parametrize("value, problem", [
    ('"10 minutes"', "'10 minutes' is not a duration: a number of seconds, or a number with a unit s, m, h "
                     "or d, e.g. \"90s\", \"10m\", \"12h\", \"30d\" (group 'compute')"),
    ('"1h30m"', "'1h30m' is not a duration"),
    ('""', "'' is not a duration"),
    ('"5s"', "the lease of group 'compute' must be from 10 s to 30 days, not '5s'"),
    ("9", "the lease of group 'compute' must be from 10 s to 30 days, not 9"),
    ("0", "must be from 10 s to 30 days, not 0"),
    ("-60", "must be from 10 s to 30 days, not -60"),
    ('"31d"', "must be from 10 s to 30 days, not '31d'"),
    ("2592001", "must be from 10 s to 30 days, not 2592001"),
    ("true", 'must be a duration such as "10m" or an integer of seconds (group \'compute\')'),
    ("1.5", 'must be a duration such as "10m" or an integer of seconds'),
    ('["10m"]', 'must be a duration such as "10m" or an integer of seconds'),
])
def test_bad_leases_are_one_line_naming_the_group(value, problem):
    """A lease that is not a duration, or outside 10 s .. 30 days, names the field and the group."""
    with pytest.raises(ClusterFileError) as info:
        parse_cluster_text(with_lease(value), label="c.toml")
    message = str(info.value)
    assert message.startswith("c.toml: group[1].lease: ") and problem in message and "\n" not in message


def test_unknown_group_keys_list_lease():
    """A misspelled key lists lease among the keys a group may have."""
    with pytest.raises(ClusterFileError, match=r"group\[1\]\.leese: unknown key \(allowed: .*source_check, lease, watch\)"):
        parse_cluster_text(CLUSTER + 'leese = "10m"\n')


# ------------------------------------------------------------------ status rendering

NOW = T0 + 3600


def node(n, group, state="ok", departed=None, **fields):
    """A node of a status as the broker writes it."""
    return dict({
        "id": f"node{n:02d}-" + "x" * 15, "group": group, "state": state,
        "revoked": departed is not None, "departed": departed, "departed_at": NOW - 60 * n if departed else None,
        "watching": False, "last_seen": None, "error": None, "log_tail": "",
        "identity": {"hostname": f"node{n}", "fqdn": f"node{n}.cluster.test", "primary_ip": f"10.9.0.{n}",
                     "interfaces": [], "ssh_host_keys": [], "source_address": f"10.9.0.{n}"},
        "enrolled_at": T0, "contextualizing_at": T0, "ok_at": T0 + 1, "error_at": None,
    }, **fields)


def elastic_status(**fields):
    """An elastic cluster's status: compute scaled to 4, with a 10-minute lease; three members
    (one watching, one failed), four departed for each reason, one slot empty."""
    return dict({
        "id": CID, "name": "elastic", "revision": 40, "created": T0, "expires": T0 + 30 * DAY,
        "locked": True, "open_for_injection": False, "owner": None, "domain": None,
        "counts": {"expected": 5, "enrolled": 4, "contextualizing": 0, "ok": 3, "error": 1},
        "complete": False, "all_ok": False, "error_present": True,
        "groups": [
            {"name": "head", "quantity": 1, "enrolled": 1, "departed": 0, "lease": None},
            {"name": "compute", "quantity": 4, "enrolled": 3, "departed": 4, "lease": 600},
        ],
        "data": {},
        "nodes": [
            node(1, "head"),
            node(2, "compute", departed="removed"),
            node(3, "compute", watching=True, last_seen=NOW - 12),
            node(4, "compute", departed="left"),
            node(5, "compute", departed="lost", watching=True, last_seen=NOW - 900),
            node(6, "compute", state="error", error={"exit_code": 4, "message": "script 1-ipandhost/x exited 3"}),
            node(7, "compute", departed="revoked"),
            node(8, "compute", watching=True),
        ],
    }, **fields)


def test_status_shows_target_sizes_members_departures_and_leases():
    """The group table: the target size (quantity), members, departed count and lease of each group."""
    lines = render.status_table(elastic_status(), now=NOW)
    assert [line.split() for line in lines[1:4]] == [
        ["GROUP", "TARGET", "MEMBERS", "DEPARTED", "LEASE"],
        ["head", "1", "1", "0", "-"],
        ["compute", "4", "3", "4", "10m"],
    ]


def test_status_lists_departed_nodes_apart_with_their_reasons():
    """Members and empty slots are in one table, departed nodes in another with why and when they
    left: removed, left, lost, revoked."""
    lines = render.status_table(elastic_status(), now=NOW)
    members = lines.index(next(line for line in lines if line.startswith("GROUP  ") and "STATE" in line))
    departed = lines.index(next(line for line in lines if line.split()[4:] == ["DEPARTED", "AT"]))
    member_rows = [line.split() for line in lines[members + 1:departed]]
    assert [row[1][:6] for row in member_rows if row[1] != "-"] == ["node01", "node03", "node06", "node08"]
    assert [row[:5] for row in member_rows if row[1] == "-"] == [["compute", "-", "-", "-", "not"]]
    assert member_rows[1][4:] == ["ok", "watching,", "seen", "12s", "ago"]
    assert member_rows[2][4:] == ["error", "script", "1-ipandhost/x", "exited", "3"]
    assert member_rows[3][4:] == ["ok", "watching"]
    gone = [line.split() for line in lines[departed + 1:-1]]
    assert [(row[0], row[1][:6], row[2], row[3], row[4]) for row in gone] == [
        ("compute", "node02", "node2", "10.9.0.2", "removed"),
        ("compute", "node04", "node4", "10.9.0.4", "left"),
        ("compute", "node05", "node5", "10.9.0.5", "lost"),
        ("compute", "node07", "node7", "10.9.0.7", "revoked"),
    ]
    assert " ".join(gone[2][5:]) == utc(NOW - 300)
    assert lines[-1] == "5 expected, 4 enrolled, 0 contextualizing, 3 ok, 1 error; complete: no, all_ok: no"


def test_status_shows_the_expiry_and_the_time_left():
    """The header gives the expiry as a UTC time and how far off it is, or how long ago it passed."""
    header = render.status_table(elastic_status(), now=NOW)[0]
    assert header == f"context elastic ({CID}), revision 40, locked, expires {utc(T0 + 30 * DAY)} (in 29d 23h)"
    header = render.status_table(elastic_status(expires=NOW - 125), now=NOW)[0]
    assert header.endswith(f"expires {utc(NOW - 125)} (expired 2m 5s ago)")
    assert render.status_table(elastic_status())[0].endswith(f"expires {utc(T0 + 30 * DAY)}")


def test_status_of_a_broker_before_elastic_clusters():
    """A status without departures, departed counts or leases (revoked: true only) still shows a
    revoked node as departed and counts the groups from the nodes."""
    status = elastic_status()
    for g in status["groups"]:
        del g["departed"], g["lease"]
    for n in status["nodes"]:
        for key in ("departed", "departed_at", "watching", "last_seen"):
            del n[key]
    lines = render.status_table(status, now=NOW)
    assert lines[3].split() == ["compute", "4", "3", "4", "-"]
    gone = [line.split() for line in lines if line.split()[4:5] in (["revoked"], ["DEPARTED"])]
    assert [row[4:] for row in gone] == [["DEPARTED", "AT"]] + [["revoked", "-"]] * 4


def test_status_makes_hostile_departure_fields_harmless():
    """A departure reason the broker should never send is shown printable, the node still departed."""
    status = elastic_status()
    status["nodes"][1]["departed"] = "\x1b]0;pwned\x07"
    status["groups"][1]["lease"] = "10m"
    status["nodes"][2]["last_seen"] = "yesterday"
    text = "\n".join(render.status_table(status, now=NOW))
    assert "\x1b" not in text and "?]0;pwned?" in text
    assert "watching, seen" not in text.split("node03")[1].splitlines()[0]


def test_reports_of_departed_nodes(tmp_path):
    """wait's report files mark departed nodes .departed with the reason, not .pending or .ok."""
    render.write_reports(elastic_status(), str(tmp_path))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert sum(name.endswith(".departed") for name in names) == 4
    assert "compute-node5-node05-xxxxxxxxxxxxxxx.departed" in names
    text = (tmp_path / "compute-node5-node05-xxxxxxxxxxxxxxx.departed").read_text()
    assert "departed: lost\n" in text and f"departed_at: {utc(NOW - 300)}\n" in text


# ------------------------------------------------------------------ against the real broker

class TestAgainstTheBrokersElasticRoutes:
    """ctxctl scale / node remove / extend (and status) against the real broker's routes
    (POST .../groups/{group}/scale, .../nodes/{nid}/remove, .../nodes/{nid}/leave, .../extend)."""

    def sent(self, broker):
        """The (method, path, JSON body) of ctxctl's requests."""
        return [(method, path, json.loads(body) if body else None) for method, path, body, _ in broker.spy.requests]

    def computes(self, broker, cid, joins, ns):
        """VMs ``ns`` enroll in compute; their node ids."""
        return [broker.enroll(cid, joins["compute"], n) for n in ns]

    def test_scale_up_lets_more_vms_join(self, broker):
        """scale raises the target: the join token enrolls VMs up to it, status shows the new target."""
        cid, joins, nodes = broker.head_ok()
        self.computes(broker, cid, joins, (2, 3, 4))
        assert broker.api.enroll(cid, joins["compute"], 5)[0] == 409  # enrollment_full
        code, out, err = broker.run(["scale", cid, "compute", "5"])
        assert (code, out) == (0, "")
        group = next(g for g in broker.status(cid)["groups"] if g["name"] == "compute")
        assert err == (f"group compute of context {cid}: target 5, members 3; its join token enrolls "
                       f"2 more until {utc(group['join_token_expires'])}\n")
        assert self.sent(broker) == [("POST", f"/v1/contexts/{cid}/groups/compute/scale", {"quantity": 5})]
        assert (group["quantity"], group["enrolled"]) == (5, 3)
        assert broker.api.enroll(cid, joins["compute"], 5)[0] == 201
        code, out, _ = broker.run(["status", cid])
        assert ["compute", "5", "4", "0", "-"] in [line.split() for line in out.splitlines()]
        assert out.splitlines()[-1].startswith("6 expected, 5 enrolled,")

    def test_scale_below_the_members_is_refused(self, broker):
        """Lowering a group below its members is the broker's 409, said in one line; nothing changes."""
        cid, joins, nodes = broker.head_ok()
        self.computes(broker, cid, joins, (2, 3))
        code, out, err = broker.run(["scale", cid, "compute", "1"])
        assert (code, out, err.count("\n")) == (1, "", 1)
        assert err.startswith("ctxctl: error: broker: ") and err.endswith("(scale_below_members, HTTP 409)\n")
        assert "node remove" in err
        assert [g["quantity"] for g in broker.status(cid)["groups"]] == [1, 3]
        code, out, err = broker.run(["scale", cid, "nosuch", "2"])
        assert (code, err.endswith("(not_found, HTTP 404)\n")) == (1, True)

    def test_node_remove_shrink_lowers_the_target(self, broker):
        """node remove --shrink: each node departs (removed), its credential stops working, and the
        group's target drops by one per node."""
        cid, joins, nodes = broker.head_ok()
        n2, n3, n4 = self.computes(broker, cid, joins, (2, 3, 4))
        code, out, err = broker.run(["node", "remove", cid, n2, n3, "--shrink"])
        assert (code, out) == (0, "")
        assert err.splitlines() == [
            f"node {n2} of context {cid}: removed; the target of group compute is now 2",
            f"node {n3} of context {cid}: removed; the target of group compute is now 1",
        ]
        assert self.sent(broker) == [("POST", f"/v1/contexts/{cid}/nodes/{nid}/remove", {"shrink": True})
                                     for nid in (n2, n3)]
        status = broker.status(cid)
        assert [g["quantity"] for g in status["groups"]] == [1, 1]
        assert {n["id"]: n["departed"] for n in status["nodes"]} == {nodes[1]: None, n2: "removed",
                                                                     n3: "removed", n4: None}
        code, answer = broker.api.call("POST", f"/v1/contexts/{cid}/nodes/{n2}/report", broker.node_tokens[n2],
                                       {"state": "contextualizing"})
        assert code == 401, answer
        code, out, _ = broker.run(["status", cid])
        rows = [line.split() for line in out.splitlines()]
        assert ["compute", "1", "1", "2", "-"] in rows
        assert [row[4] for row in rows if row[1] in (n2, n3)] == ["removed", "removed"]

    def test_node_remove_frees_the_slot(self, broker):
        """Without --shrink the target stays and a new VM may take the removed node's slot."""
        cid, joins, nodes = broker.head_ok()
        n2, _, _ = self.computes(broker, cid, joins, (2, 3, 4))
        code, out, err = broker.run(["node", "remove", cid, n2])
        assert (code, err) == (0, f"node {n2} of context {cid}: removed; the target of group compute stays 3 "
                                  "(a new VM may take the slot)\n")
        assert self.sent(broker) == [("POST", f"/v1/contexts/{cid}/nodes/{n2}/remove", {"shrink": False})]
        assert broker.api.enroll(cid, joins["compute"], 5)[0] == 201

    def test_node_remove_stops_at_the_first_error(self, broker):
        """Several nodes: one request each, in order; the first refusal ends it in one line naming
        the node and those not tried, which stay members."""
        cid, joins, nodes = broker.head_ok()
        n2, n3, n4 = self.computes(broker, cid, joins, (2, 3, 4))
        assert broker.run(["node", "remove", cid, n2])[0] == 0
        code, out, err = broker.run(["node", "remove", cid, n3, n2, n4])
        assert (code, out) == (1, "")
        lines = err.splitlines()
        assert lines[0] == (f"node {n3} of context {cid}: removed; the target of group compute stays 3 "
                            "(a new VM may take the slot)")
        assert lines[1].startswith(f"ctxctl: error: node {n2}: broker: ")
        assert lines[1].endswith(f"(already_departed, HTTP 409); not tried: {n4}") and len(lines) == 2
        assert {n["id"]: n["departed"] for n in broker.status(cid)["nodes"]}[n4] is None
        code, out, err = broker.run(["node", "remove", cid, n2])
        assert (code, err.startswith("ctxctl: error: broker: ")) == (1, True)  # one node: the broker's line alone

    def test_status_shows_every_kind_of_departure(self, broker):
        """A node removed, one that left by itself (its own leave request) and one revoked are each
        listed apart from the members with their reason; the group counts them."""
        cid, joins, nodes = broker.head_ok()
        n2, n3, n4 = self.computes(broker, cid, joins, (2, 3, 4))
        assert broker.run(["node", "remove", cid, n2])[0] == 0
        broker.call("POST", f"/v1/contexts/{cid}/nodes/{n3}/leave", {}, token=broker.node_tokens[n3])
        assert broker.run(["node", "revoke", cid, n4])[0] == 0
        code, out, _ = broker.run(["status", cid])
        rows = [line.split() for line in out.splitlines()]
        departed = {row[1]: row[4:] for row in rows if row[1:2] in ([n2], [n3], [n4])}
        assert departed == {n2: ["removed", *utc(T0).split()], n3: ["left", *utc(T0).split()],
                            n4: ["revoked", *utc(T0).split()]}
        assert ["compute", "3", "0", "3", "-"] in rows
        assert sum(1 for line in out.splitlines() if line.split()[-2:] == ["not", "enrolled"]) == 3

    def test_extend_sets_the_expiry_from_now(self, broker):
        """extend --expires-in D: the context expires D from now (longer or shorter), as status shows."""
        cid, _ = broker.create(torque_cluster())
        code, out, err = broker.run(["extend", cid, "--expires-in", "30d"])
        assert (code, out) == (0, "")
        assert err == f"context {cid} expires {utc(T0 + 30 * DAY)} (in 30d)\n"
        assert self.sent(broker) == [("POST", f"/v1/contexts/{cid}/extend", {"expires_in": 30 * DAY})]
        assert broker.status(cid)["expires"] == T0 + 30 * DAY
        broker.clock.advance(3600)
        code, out, err = broker.run(["extend", cid, "--expires-in", "90m"])
        assert (code, err) == (0, f"context {cid} expires {utc(T0 + 3600 + 5400)} (in 1h 30m)\n")
        code, out, _ = broker.run(["status", cid])
        assert out.splitlines()[0].endswith(f"expires {utc(T0 + 3600 + 5400)} (in 1h 30m)")

    def test_commands_on_a_missing_context(self, broker):
        """Each command on a context that does not exist is the broker's 404 in one line."""
        missing = "A" * 22
        for argv in (["scale", missing, "compute", "2"], ["node", "remove", missing, NID],
                     ["extend", missing, "--expires-in", "1d"]):
            code, out, err = broker.run(argv)
            assert (code, out, err) == (1, "", "ctxctl: error: broker: no such context (not_found, HTTP 404)\n")

    def test_lease_from_the_cluster_file_reaches_the_broker(self, broker, tmp_path, monkeypatch):
        """create sends a group's lease in seconds; the broker keeps it and status shows it."""
        from ctxd.ctxctl import commands
        monkeypatch.setattr(commands, "load_agent_source", lambda: "print('agent')\n")
        path = tmp_path / "cluster.toml"
        path.write_text(with_lease('"10m"'))
        code, out, err = broker.run(["create", str(path), "--out", str(tmp_path / "boot")])
        assert code == 0, err
        cid = out.strip()
        assert [g.get("lease") for g in broker.status(cid)["groups"]] == [None, 600]
        code, out, _ = broker.run(["status", cid])
        assert ["compute", "2", "0", "0", "10m"] in [line.split() for line in out.splitlines()]


def test_watch_follows_the_lease_unless_said():
    """A leased group watches by default; watch may be set on any group; a leased group cannot opt out."""
    leased = with_lease('"10m"')
    body = parse_cluster_text(leased)
    # Not sent when not given: the broker's default (watch with a lease) applies, and an older broker
    # without the key still accepts the body.
    assert [("lease" in g, g.get("watch")) for g in body["groups"]] == [(False, None), (True, None)]
    body = parse_cluster_text(leased.replace('name = "head"\n', 'name = "head"\nwatch = true\n', 1))
    assert body["groups"][0]["watch"] is True
    with pytest.raises(ClusterFileError, match=r"group\[1\]\.watch: group 'compute' has a lease: its agents must watch"):
        parse_cluster_text(leased + "watch = false\n")
    with pytest.raises(ClusterFileError, match=r"group\[1\]\.watch"):
        parse_cluster_text(CLUSTER + 'watch = "yes"\n')
