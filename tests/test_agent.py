"""Unit tests of ctxagent.py's pure functions and of its plan executor (no network)."""

import base64
import datetime
import fcntl
import gzip
import json
import logging
import os
import re
import socket
import ssl
import stat
import sys
import threading
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ctxagent  # noqa: E402

# The agent uses no library of ctxd's: `make test-debian` leaves these tests to `test-pypi`.
pytestmark = pytest.mark.agent

CID = "Q2x1c3Rlci1pZC0xMjM0NT"
NID = "Tm9kZS1pZC0wMDAwMDAwMD"
HEAD_ID = "SGVhZC1ub2RlLWlkLTAwMD"
COMPUTE_ID = "Q29tcHV0ZS1ub2RlLTAwMD"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHZ0ZXN0a2V5"


def key_of(n):
    """Node N's own host key (every node of a context has its own)."""
    return KEY[:-4] + "%04d" % n


@pytest.fixture(scope="module")
def ca_pem():
    """A real self-signed CA certificate, so the TLS context can load it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, u"test CA")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


@pytest.fixture
def bootstrap(ca_pem):
    return {"ctxd_bootstrap": 1, "url": "https://ctxd.example.org:8443", "context_id": CID,
            "group": "compute", "join_token": "ctxd_join_" + "a" * 43, "ca_pem": ca_pem}


def user_data(obj):
    encoded = base64.b64encode(json.dumps(obj).encode()).decode()
    return ("#cloud-config\nwrite_files: []\n# ctxd-bootstrap: %s\nruncmd: []\n" % encoded).encode()


# ---------------------------------------------------------------------------
# Bootstrap

def test_bootstrap_raw_json(bootstrap):
    """A raw bootstrap JSON document is accepted as is."""
    assert ctxagent.parse_bootstrap(json.dumps(bootstrap).encode()) == bootstrap


def test_bootstrap_in_user_data(bootstrap):
    """The bootstrap is found in a #cloud-config document's marker line."""
    assert ctxagent.parse_bootstrap(user_data(bootstrap)) == bootstrap


@pytest.mark.parametrize("wrap", [lambda b: json.dumps(b).encode(), user_data])
def test_bootstrap_gzip(bootstrap, wrap):
    """Gzip-compressed raw JSON and gzip-compressed user-data are both accepted."""
    assert ctxagent.parse_bootstrap(gzip.compress(wrap(bootstrap))) == bootstrap


@pytest.mark.parametrize("content", [
    None, b"", b"  \n", b"#cloud-config\nruncmd: [ls]\n", b"#!/bin/sh\necho hi\n",
    gzip.compress(b"#cloud-config\n"), b"#cloud-config\nruncmd: ['# ctxd-bootstrap: e30']\n",
    b'{"ignition": {"version": "3.4.0"}}', b"{}",
])
def test_no_bootstrap(content):
    """No content, empty content and user-data without the marker mean 'no bootstrap'."""
    assert ctxagent.parse_bootstrap(content) is None


def test_missing_bootstrap_file(tmp_path):
    """A named bootstrap file that does not exist is a configuration error; cloud-init's saved
    user-data missing (an instance without user-data) reads as no content at all."""
    options = ctxagent.parse_args(["--bootstrap", str(tmp_path / "absent"),
                                   "--cloud-init-user-data", str(tmp_path / "absent")])
    with pytest.raises(ctxagent.ConfigError, match="does not exist"):
        ctxagent.read_bootstrap_source(options.bootstrap, options)
    assert ctxagent.read_bootstrap_source("cloud-init", options) is None


@pytest.mark.parametrize("content", [
    b"{not json",
    b"#cloud-config\n# ctxd-bootstrap: AAAA!!!!\n",    # not base64
    b"#cloud-config\n# ctxd-bootstrap: BASE64(JSON)\n",
    b"#cloud-config\n# ctxd-bootstrap:\n",             # empty
    b"#cloud-config\n# ctxd-bootstrap: e30\n",         # base64 of "{}": fields missing
    b"#cloud-config\n# ctxd-bootstrap: AB\n",          # base64 of a non-JSON byte
    b"#cloud-config\n# ctxd-bootstrap: A\n",           # impossible base64 length
    b"\x1f\x8b\x08\x00garbage",
    b"[]",
    b'{"ctxd_bootstrap": null}',                         # ours, by its key, but invalid
    b'{"ctxd_bootstrap": 1}',
])
def test_corrupt_bootstrap(content):
    """Bad JSON, bad base64 and bad gzip are errors (exit 1), not 'no bootstrap'."""
    with pytest.raises(ctxagent.InputError):
        ctxagent.parse_bootstrap(content)


@pytest.mark.parametrize("field, value", [
    ("ctxd_bootstrap", 2), ("ctxd_bootstrap", True), ("ctxd_bootstrap", None),
    ("url", "http://ctxd.example.org"), ("url", "https://"), ("url", "https://h:99999"),
    ("url", "https://user@h/"), ("url", 5),
    ("context_id", "short"), ("context_id", "Q2x1c3Rlci1pZC0xMjM0N/"), ("context_id", None),
    ("group", "../x"), ("group", ""), ("join_token", "ctxd_node_abc"),
    ("join_token", "ctxd_join_a b"), ("join_token", None),
    ("ca_pem", "not a certificate"),
    ("ca_pem", "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"),
])
def test_invalid_bootstrap_field(bootstrap, field, value):
    """Each missing or invalid bootstrap field is rejected, naming the field."""
    bootstrap[field] = value
    with pytest.raises(ctxagent.InputError) as info:
        ctxagent.parse_bootstrap(json.dumps(bootstrap).encode())
    assert field in str(info.value)


def test_tls_context_is_strict(ca_pem):
    """The broker context verifies certificates and host names, TLS 1.2 at least."""
    import ssl
    context = ctxagent.make_tls_context(ca_pem)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert len(context.get_ca_certs()) == 1


# ---------------------------------------------------------------------------
# Identity

def identity(**changes):
    obj = {"hostname": "node-3", "fqdn": "node-3.cluster.example.org", "primary_ip": "10.1.0.5",
           "interfaces": [{"name": "eth0", "ipv4": ["10.1.0.5"], "ipv6": ["fd00::5"]},
                          {"name": "eth1", "ipv4": [], "ipv6": ["fd01::5"]},
                          {"name": "dummy0", "ipv4": [], "ipv6": []}],
           "ssh_host_keys": [KEY]}
    obj.update(changes)
    return obj


def test_valid_identity():
    """A well-formed identity validates to the same values."""
    checked = ctxagent.validate_identity(identity())
    assert (checked.hostname, checked.fqdn, checked.primary_ip) == (
        "node-3", "node-3.cluster.example.org", "10.1.0.5")
    assert checked.interfaces[0] == ("eth0", ("10.1.0.5",), ("fd00::5",))
    assert checked.ssh_host_keys == (KEY,)


def test_identity_ip_is_canonical():
    """Addresses are passed on in canonical form."""
    checked = ctxagent.validate_identity(identity(primary_ip="FD00:0:0::0005"))
    assert checked.primary_ip == "fd00::5"


@pytest.mark.parametrize("field, value", [
    ("hostname", "node_3"), ("hostname", "-node"), ("hostname", "a" * 64), ("hostname", "a.b"),
    ("hostname", None), ("fqdn", "a..b"), ("fqdn", "a." + "b" * 300), ("fqdn", "10.0.0.1"),
    ("fqdn", "x\ny"), ("primary_ip", "fe80::1%eth0"), ("primary_ip", "10.0.0.256"),
    ("primary_ip", "host"), ("primary_ip", 167772161),
    ("interfaces", [{"name": "../eth0", "ipv4": [], "ipv6": []}]),
    ("interfaces", [{"name": "eth0", "ipv4": ["fd00::1"], "ipv6": ["nope"]}]),
    ("interfaces", [{"name": "eth%d" % i} for i in range(65)]),
    ("ssh_host_keys", ["ssh-dss AAAA"]), ("ssh_host_keys", [KEY + " comment"]),
    ("ssh_host_keys", [KEY + "\nssh-rsa AAAA"]), ("ssh_host_keys", KEY),
])
def test_invalid_identity(field, value):
    """Each invalid identity field is rejected with a message naming it."""
    with pytest.raises(ctxagent.InputError) as info:
        ctxagent.validate_identity(identity(**{field: value}))
    assert field in str(info.value)


def test_parse_ip_addr_output():
    """`ip -o addr show` output yields non-loopback interfaces without link-local IPv6."""
    text = (
        "1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever preferred_lft forever\n"
        "1: lo    inet6 ::1/128 scope host \\       valid_lft forever preferred_lft forever\n"
        "4: eth0    inet 192.0.2.2/24 brd 192.0.2.255 scope global eth0\\       valid_lft forever\n"
        "4: eth0    inet 192.0.2.9/24 brd 192.0.2.255 scope global secondary eth0:1\\ x\n"
        "4: eth0    inet6 fd00::2/64 scope global nodad \\       valid_lft forever\n"
        "4: eth0    inet6 fe80::fc:ff:fe00:1/64 scope link \\       valid_lft forever\n"
        "5: veth1@if6    inet 10.9.0.1 peer 10.9.0.2/32 scope global veth1\\ x\n"
        "7: wg0    inet6 fe80::1/64 scope link \\ x\n")
    assert ctxagent.group_addresses(ctxagent.parse_ip_addr(text)) == [
        {"name": "eth0", "ipv4": ["192.0.2.2", "192.0.2.9"], "ipv6": ["fd00::2"]},
        {"name": "veth1", "ipv4": ["10.9.0.1"], "ipv6": []}]


def test_ssh_host_keys_read_without_comments(tmp_path):
    """Host keys are read as their first two fields; an invalid file is skipped."""
    (tmp_path / "ssh_host_ed25519_key.pub").write_text(KEY + " root@node-3\n")
    (tmp_path / "ssh_host_rsa_key.pub").write_text("garbage\n")
    (tmp_path / "ssh_host_ed25519_key").write_text("PRIVATE\n")
    assert ctxagent.read_ssh_host_keys(str(tmp_path)) == [KEY]


# ---------------------------------------------------------------------------
# View validation and plan

def peer(nid, n, group="compute", **changes):
    obj = {"node_id": nid, "group": group, "hostname": "node-%d" % n,
           "fqdn": "node-%d.cluster.example.org" % n, "ip": "10.1.0.%d" % n,
           "ssh_host_keys": [KEY if nid == NID else key_of(n)]}
    obj.update(changes)
    return obj


def sample_view(**changes):
    """A complete view for a compute node that requires 'torquemaster' and 'gridmap'."""
    view = {
        "context_id": CID, "context_name": "torque-demo", "node_id": NID, "group": "compute",
        "revision": 17, "complete": True, "locked": True, "state": "contextualizing",
        "waiting_for": [], "self": identity(),
        "roles": {
            "zmaster": {"ready": False, "satisfied": True, "expected": 1,
                        "providers": [peer(HEAD_ID, 1, "head")]},
            "torquemaster": {"ready": True, "satisfied": True, "expected": 1,
                             "providers": [peer(HEAD_ID, 1, "head"), peer(COMPUTE_ID, 2)]}},
        "data": {"gridmap": [{"b64": base64.b64encode(b"/DC=x user1\n").decode()},
                             {"b64": base64.b64encode(b"\x00\x01binary").decode()}]},
        "all_identities": [peer(HEAD_ID, 1, "head"), peer(COMPUTE_ID, 2),
                           peer(NID, 5, ip="10.1.0.5", hostname="node-3",
                                fqdn="node-3.cluster.example.org")],
    }
    view.update(changes)
    return view


def scripts(plan):
    return [(a.target,) + a.args for a in plan if a.kind == ctxagent.SCRIPT]


def test_plan_for_sample_view():
    """The plan lists every script with its exact argv, in the documented order."""
    view = ctxagent.validate_view(sample_view(), CID, NID)
    plan = ctxagent.plan_actions(view, "/state")
    h1 = ("10.1.0.1", "node-1", "node-1.cluster.example.org")
    c2 = ("10.1.0.2", "node-2", "node-2.cluster.example.org")
    me = ("node-3", "node-3.cluster.example.org")
    assert scripts(plan) == [
        ("clean.sh",),
        ("0-etchosts.sh", "10.1.0.5") + me, ("0-etchosts.sh",) + h1, ("0-etchosts.sh",) + c2,
        ("1-ipandhost/torquemaster",) + h1, ("1-ipandhost/torquemaster",) + c2,
        ("1-ipandhost/zmaster",) + h1,
        ("2-thishost/eth0", "10.1.0.5") + me, ("2-thishost/eth1", "fd01::5") + me,
        ("3-data/gridmap", "/state/data/gridmap/0"), ("3-data/gridmap", "/state/data/gridmap/1"),
        ("4-restarts/torquemaster",), ("4-restarts/zmaster",),
        ("5-thishost-finalize/eth0", "10.1.0.5") + me,
        ("5-thishost-finalize/eth1", "fd01::5") + me,
    ]
    files = [(a.target, a.content) for a in plan if a.kind == ctxagent.FILE]
    assert files == [("/state/data/gridmap/0", b"/DC=x user1\n"),
                     ("/state/data/gridmap/1", b"\x00\x01binary")]
    blocks = {a.target: a.args for a in plan if a.kind == ctxagent.BLOCK}
    assert blocks["hosts"] == ("10.1.0.5 node-3.cluster.example.org node-3",
                               "10.1.0.1 node-1.cluster.example.org node-1",
                               "10.1.0.2 node-2.cluster.example.org node-2")
    assert blocks["known_hosts"] == (
        "node-1.cluster.example.org,node-1,10.1.0.1 " + key_of(1),
        "node-2.cluster.example.org,node-2,10.1.0.2 " + key_of(2),
        "node-3.cluster.example.org,node-3,10.1.0.5 " + KEY)


def test_plan_minimal_view():
    """A view with no roles, data or all_identities only maps this host."""
    view = ctxagent.validate_view(sample_view(roles={}, data={}, all_identities=None), CID, NID)
    plan = ctxagent.plan_actions(view, "/state")
    assert [s[0] for s in scripts(plan)] == [
        "clean.sh", "0-etchosts.sh", "2-thishost/eth0", "2-thishost/eth1",
        "5-thishost-finalize/eth0", "5-thishost-finalize/eth1"]
    assert {a.target: a.args for a in plan if a.kind == ctxagent.BLOCK}["known_hosts"] == ()


def test_view_for_another_node_is_rejected():
    """A view naming another context or node is refused."""
    with pytest.raises(ctxagent.InputError):
        ctxagent.validate_view(sample_view(), CID, COMPUTE_ID)
    with pytest.raises(ctxagent.InputError):
        ctxagent.validate_view(sample_view(context_id=NID), CID, NID)


HOSTILE = ["../x", ".hidden", ".", "..", "a\x00b", "a\nb", ";rm -rf /", "$(x)", "`x`",
           "a b", "a/b", "x" * 100000, ""]
HOSTILE_IPS = ["fe80::1%eth0", "10.0.0.1; rm -rf /", "not-an-ip", "10.0.0.1\n", " 10.0.0.1",
               "$(x)", "1" * 100000, ""]


def hostile_views():
    """(label, view) pairs, each with one hostile value somewhere."""
    def role_providers(**changes):
        return {"torquemaster": {"providers": [peer(HEAD_ID, 1, "head", **changes)]}}
    for bad in HOSTILE:
        yield "role " + repr(bad)[:20], sample_view(roles={bad: {"providers": []}})
        yield "data " + repr(bad)[:20], sample_view(data={bad: [{"b64": "eA=="}]})
        yield "hostname " + repr(bad)[:20], sample_view(roles=role_providers(hostname=bad))
        yield "fqdn " + repr(bad)[:20], sample_view(roles=role_providers(fqdn=bad))
        yield "group " + repr(bad)[:20], sample_view(all_identities=[peer(HEAD_ID, 1, bad)])
        yield "iface " + repr(bad)[:20], sample_view(
            self=identity(interfaces=[{"name": bad, "ipv4": ["10.1.0.5"]}]))
        yield "self hostname " + repr(bad)[:20], sample_view(self=identity(hostname=bad))
    for bad in HOSTILE_IPS:
        yield "ip " + repr(bad)[:20], sample_view(roles=role_providers(ip=bad))
        yield "self ip " + repr(bad)[:20], sample_view(self=identity(primary_ip=bad))
        yield "iface ip " + repr(bad)[:20], sample_view(
            self=identity(interfaces=[{"name": "eth0", "ipv4": [bad]}]))
    yield "key newline", sample_view(roles=role_providers(ssh_host_keys=[KEY + "\nx"]))
    yield "node id", sample_view(roles=role_providers(node_id="../../../etc/passwd"))
    yield "data b64", sample_view(data={"gridmap": [{"b64": "not base64!"}]})
    yield "data value", sample_view(data={"gridmap": ["eA=="]})
    yield "revision", sample_view(revision="17")
    yield "complete", sample_view(complete="yes")
    yield "roles list", sample_view(roles=[])
    yield "not an object", ["view"]


HOSTILE_VIEWS = list(hostile_views())


def make_script(path, body=""):
    """An executable python script at PATH appending its argv (and CTX_* env) to $RECORD."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "#!%s\nimport json, os, sys\n"
        "with open(os.environ['RECORD'], 'a') as f:\n"
        "    f.write(json.dumps([os.path.relpath(sys.argv[0], os.environ['SCRIPTS'])]"
        " + sys.argv[1:]) + '\\n')\n%s" % (sys.executable, body))
    path.chmod(0o755)
    return path


ALL_SCRIPTS = ["clean.sh", "0-etchosts.sh", "1-ipandhost/torquemaster", "1-ipandhost/zmaster",
               "2-thishost/eth0", "2-thishost/eth1", "3-data/gridmap", "4-restarts/torquemaster",
               "4-restarts/zmaster", "5-thishost-finalize/eth0", "5-thishost-finalize/eth1",
               "problem.sh"]


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A scripts dir with a recording script for every phase, a state dir and system files."""
    scripts_dir = tmp_path / "scripts"
    for name in ALL_SCRIPTS:
        make_script(scripts_dir / name)
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (tmp_path / "hosts").write_text("127.0.0.1 localhost\n")
    monkeypatch.setenv("RECORD", str(tmp_path / "record"))
    monkeypatch.setenv("SCRIPTS", str(scripts_dir))
    paths = ctxagent.Paths(str(scripts_dir), str(state), str(tmp_path / "hosts"),
                           str(tmp_path / "known_hosts"))
    return tmp_path, paths


def recorded(tmp_path):
    record = tmp_path / "record"
    if not record.exists():
        return []
    return [json.loads(line) for line in record.read_text().splitlines()]


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def snapshot(root):
    """Every path below ROOT with its mode and content."""
    result = {}
    for directory, _, names in os.walk(str(root)):
        for name in [""] + names:
            path = os.path.join(directory, name)
            st = os.lstat(path)
            result[path] = (st.st_mode, read_bytes(path) if stat.S_ISREG(st.st_mode) else None)
    return result


@pytest.mark.parametrize("label, view", HOSTILE_VIEWS, ids=[label for label, _ in HOSTILE_VIEWS])
def test_hostile_view_runs_and_writes_nothing(site, label, view):
    """A view with a hostile name or address is refused before any file or script."""
    tmp_path, paths = site
    before = snapshot(tmp_path)
    with pytest.raises(ctxagent.InputError):
        ctxagent.apply_view(view, CID, NID, paths, 10)
    assert snapshot(tmp_path) == before
    assert recorded(tmp_path) == []


def test_incomplete_view_is_not_applied(site):
    """An incomplete view is never acted upon."""
    tmp_path, paths = site
    with pytest.raises(ctxagent.InputError):
        ctxagent.apply_view(sample_view(complete=False), CID, NID, paths, 10)
    assert recorded(tmp_path) == []


# ---------------------------------------------------------------------------
# Managed blocks

def block(cid, *lines):
    return "".join(["# BEGIN ctxd (context %s)\n" % cid] + [l + "\n" for l in lines]
                   + ["# END ctxd (context %s)\n" % cid])


def test_managed_file_keeps_bytes_and_mode(tmp_path):
    """Updating a managed file keeps non-UTF-8 bytes and the file's mode."""
    hosts = tmp_path / "hosts"
    hosts.write_bytes(b"127.0.0.1 caf\xe9\n")
    hosts.chmod(0o644)
    ctxagent.update_managed_file(str(hosts), CID, ["10.0.0.1 a.b a"])
    assert hosts.read_bytes() == b"127.0.0.1 caf\xe9\n" + block(CID, "10.0.0.1 a.b a").encode()
    assert stat.S_IMODE(hosts.stat().st_mode) == 0o644


def test_managed_file_not_created_for_nothing(tmp_path):
    """No lines and no file: no empty file is created."""
    ctxagent.update_managed_file(str(tmp_path / "known_hosts"), CID, [])
    assert os.listdir(str(tmp_path)) == []


# ---------------------------------------------------------------------------
# Files

def test_atomic_write_permissions_and_no_leftovers(tmp_path):
    """atomic_write creates 0600 files, replaces old content, leaves no temp file."""
    target = tmp_path / "secret"
    target.write_text("old")
    target.chmod(0o644)
    ctxagent.atomic_write(str(target), b"new")
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert os.listdir(str(tmp_path)) == ["secret"]


def test_atomic_write_replaces_symlink_not_target(tmp_path):
    """A symlink planted at the path is replaced; the file it pointed to is untouched."""
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "link").symlink_to(victim)
    ctxagent.atomic_write(str(tmp_path / "link"), b"data")
    assert victim.read_text() == "precious"
    assert not (tmp_path / "link").is_symlink()


def test_read_file_does_not_follow_symlinks(tmp_path):
    """Secrets are read without following a symlink."""
    (tmp_path / "target").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "target")
    with pytest.raises(OSError):
        ctxagent.read_file(str(tmp_path / "link"), 10)
    assert ctxagent.read_file(str(tmp_path / "absent"), 10) is None


def test_private_dirs(tmp_path):
    """State and data directories are made 0700 at every level."""
    state = ctxagent.make_private_dir(str(tmp_path / "state"))
    ctxagent.make_private_tree(state, os.path.join(state, "data", "gridmap"))
    for path in (state, os.path.join(state, "data"), os.path.join(state, "data", "gridmap")):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o700


# ---------------------------------------------------------------------------
# Executing a plan

def test_apply_view_runs_scripts_and_writes_files(site):
    """A complete view runs every script once with the planned argv, in order, with CTX_* set."""
    tmp_path, paths = site
    # one script also records its environment
    make_script(tmp_path / "scripts" / "clean.sh",
                "with open(os.environ['RECORD'] + '.env', 'w') as f:\n"
                "    json.dump({k: v for k, v in os.environ.items() if k.startswith('CTX_')}, f)\n")
    ctxagent.apply_view(sample_view(), CID, NID, paths, 10)

    plan = ctxagent.plan_actions(ctxagent.validate_view(sample_view(), CID, NID), paths.state_dir)
    assert [tuple(r) for r in recorded(tmp_path)] == scripts(plan)
    view_path = os.path.join(paths.state_dir, "view.json")
    assert json.loads((tmp_path / "record.env").read_text()) == {
        "CTX_VIEW": view_path, "CTX_CONTEXT_ID": CID, "CTX_NODE_ID": NID,
        "CTX_EVENT": "initial", "CTX_JOINED": "", "CTX_DEPARTED": ""}
    assert json.loads(read_bytes(view_path)) == sample_view()
    assert stat.S_IMODE(os.stat(view_path).st_mode) == 0o600
    data0 = os.path.join(paths.state_dir, "data", "gridmap", "0")
    assert read_bytes(data0) == b"/DC=x user1\n"
    assert stat.S_IMODE(os.stat(data0).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(data0)).st_mode) == 0o700
    hosts = (tmp_path / "hosts").read_text()
    assert hosts.startswith("127.0.0.1 localhost\n# BEGIN ctxd (context %s)\n" % CID)
    assert "10.1.0.1 node-1.cluster.example.org node-1\n" in hosts
    assert "node-2.cluster.example.org,node-2,10.1.0.2 %s\n" % key_of(2) in (
        tmp_path / "known_hosts").read_text()


def test_apply_view_twice_is_idempotent(site):
    """A re-run re-applies the actions and leaves the managed files unchanged."""
    tmp_path, paths = site
    ctxagent.apply_view(sample_view(), CID, NID, paths, 10)
    first = [(tmp_path / n).read_text() for n in ("hosts", "known_hosts")]
    runs = len(recorded(tmp_path))
    ctxagent.apply_view(sample_view(), CID, NID, paths, 10)
    assert [(tmp_path / n).read_text() for n in ("hosts", "known_hosts")] == first
    assert len(recorded(tmp_path)) == 2 * runs


def test_failing_script_stops_the_run(site, caplog):
    """A script exiting non-zero stops the run (exit 4), logs its stderr and runs problem.sh."""
    tmp_path, paths = site
    caplog.set_level(logging.INFO, logger="ctxagent")
    make_script(tmp_path / "scripts" / "1-ipandhost" / "torquemaster",
                "sys.stderr.write('torque is unhappy\\n')\nsys.exit(3)\n")
    with pytest.raises(ctxagent.ActionError) as info:
        ctxagent.apply_view(sample_view(), CID, NID, paths, 10)
    assert str(info.value) == "script 1-ipandhost/torquemaster exited 3"
    assert info.value.exit_code == ctxagent.EXIT_ACTION
    ran = [r[0] for r in recorded(tmp_path)]
    assert ran[-2:] == ["1-ipandhost/torquemaster", "problem.sh"]
    assert "1-ipandhost/zmaster" not in ran and "4-restarts/zmaster" not in ran
    assert "torque is unhappy" in caplog.text


def test_script_timeout(site):
    """A script running past the script timeout is killed and fails the run."""
    tmp_path, paths = site
    make_script(tmp_path / "scripts" / "clean.sh", "import time\ntime.sleep(30)\n")
    with pytest.raises(ctxagent.ActionError) as info:
        ctxagent.apply_view(sample_view(), CID, NID, paths, 0.5)
    assert "clean.sh timed out" in str(info.value)


def alive(pid):
    """Whether PID is a running process (a zombie is not)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture
def daemons():
    """A list to add the pids of background processes to; each is killed afterwards."""
    pids = []
    yield pids
    for pid in pids:
        try:
            os.kill(pid, 9)
        except OSError:
            pass


def shell_script(path, body):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)


@pytest.mark.parametrize("start", ["sleep 30 &", "nohup sleep 30 &", "setsid sleep 30 &"])
def test_script_leaving_a_daemon_returns_at_once(site, daemons, caplog, start):
    """A script that exits leaving a daemon on its stdout/stderr returns at once; the daemon lives on."""
    tmp_path, paths = site
    caplog.set_level(logging.INFO, logger="ctxagent")
    pidfile = tmp_path / "daemon.pid"
    shell_script(tmp_path / "scripts" / "4-restarts" / "zmaster",
                 "%s\necho $! > %s\necho daemon started\necho oops >&2\n" % (start, pidfile))
    began = time.monotonic()
    ctxagent.run_script(paths, "4-restarts/zmaster", (), dict(os.environ), 20)
    assert time.monotonic() - began < 2
    daemons.append(int(pidfile.read_text()))
    time.sleep(0.2)
    assert alive(daemons[0])
    assert "4-restarts/zmaster: daemon started" in caplog.text
    assert "4-restarts/zmaster: oops" in caplog.text


def test_script_timeout_kills_its_process_group(site, daemons):
    """A script past the timeout is killed with what it started, and fails the run with exit 4."""
    tmp_path, paths = site
    pidfile = tmp_path / "pids"
    shell_script(tmp_path / "scripts" / "clean.sh",
                 "sleep 30 &\necho $! $$ > %s\nsleep 30\n" % pidfile)
    began = time.monotonic()
    with pytest.raises(ctxagent.ActionError) as info:
        ctxagent.run_script(paths, "clean.sh", (), dict(os.environ), 1)
    assert time.monotonic() - began < 5
    assert info.value.exit_code == ctxagent.EXIT_ACTION
    assert str(info.value) == "script clean.sh timed out after 1 s"
    daemons.extend(int(pid) for pid in pidfile.read_text().split())
    for _ in range(50):
        if not any(alive(pid) for pid in daemons):
            break
        time.sleep(0.05)
    assert not any(alive(pid) for pid in daemons)


def test_script_output_file_is_private_and_per_script(site):
    """STATE/script.out is made 0600 even if it was not, and holds only the last script's output."""
    tmp_path, paths = site
    out = tmp_path / "state" / "script.out"
    out.write_text("an older, longer output\n")
    out.chmod(0o644)
    shell_script(tmp_path / "scripts" / "clean.sh", "echo new\n")
    ctxagent.run_script(paths, "clean.sh", (), dict(os.environ), 10)
    assert out.read_text() == "new\n"
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


def test_absent_scripts_are_skipped(site):
    """Scripts that do not exist are skipped; the managed blocks are written anyway."""
    tmp_path, paths = site
    paths = paths._replace(scripts_dir=str(tmp_path / "no-scripts"))
    ctxagent.apply_view(sample_view(), CID, NID, paths, 10)
    assert recorded(tmp_path) == []
    assert "# BEGIN ctxd" in (tmp_path / "hosts").read_text()


def test_non_executable_script_is_a_config_error(site):
    """A present but non-executable script is exit 2, naming it, before anything runs."""
    tmp_path, paths = site
    (tmp_path / "scripts" / "4-restarts" / "zmaster").chmod(0o644)
    before = snapshot(tmp_path)
    with pytest.raises(ctxagent.ConfigError) as info:
        ctxagent.apply_view(sample_view(), CID, NID, paths, 10)
    assert "4-restarts/zmaster" in str(info.value)
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------------
# Logging, exit codes, command line

def test_redactor_removes_tokens():
    """Tokens and registered secrets never survive formatting."""
    formatter = ctxagent.Redactor()
    formatter.secrets.add("instance-secret-value")
    record = logging.LogRecord("ctxagent", logging.INFO, __file__, 1,
                               "t=%s k=%s", ("ctxd_join_abc-DEF_123", "instance-secret-value"), None)
    text = formatter.format(record)
    assert "abc-DEF_123" not in text and "instance-secret-value" not in text
    assert "ctxd_join_<redacted>" in text


def test_exit_codes():
    """Each failure kind maps to its documented exit code."""
    assert [ctxagent.exit_code_for(e) for e in (
        ctxagent.InputError(), ctxagent.ConfigError(), ctxagent.EnvironmentFailure(),
        ctxagent.ActionError(), ctxagent.IncompleteError(), ctxagent.RefusedError(),
        AssertionError(), KeyError())] == [1, 2, 3, 4, 5, 6, 42, 97]


def test_help_documents_exit_codes(capsys):
    """--help exits 0 and lists the exit codes."""
    assert ctxagent.main(["--help"]) == 0
    out = capsys.readouterr().out
    for code in (0, 1, 2, 3, 4, 5, 6, 42, 97):
        assert re.search(r"^ +%d +\w" % code, out.split("exit codes:")[1], re.MULTILINE)


def test_bad_arguments_exit_2(tmp_path):
    """Invalid options are usage errors (exit 2)."""
    for argv in (["--bootstrap", "x", "--address", "fe80::1%eth0"],
                 ["--bootstrap", "x", "--hostname", "a_b"], ["--bootstrap", "x", "--poll-wait", "301"],
                 ["--bootstrap", "x", "--timeout", "0"], []):
        assert ctxagent.main(argv) == 2


def test_main_without_bootstrap_exits_0_and_writes_nothing(tmp_path):
    """No bootstrap (no user-data, none in it) is exit 0 and leaves no state directory behind."""
    state = tmp_path / "state"
    assert ctxagent.main(["--bootstrap", "cloud-init", "--cloud-init-user-data", str(tmp_path / "absent"),
                          "--state-dir", str(state)]) == 0
    user = tmp_path / "user-data"
    user.write_text("#cloud-config\n")
    assert ctxagent.main(["--bootstrap", "cloud-init", "--cloud-init-user-data", str(user),
                          "--state-dir", str(state)]) == 0
    assert not state.exists()


def test_main_with_foreign_json_user_data_exits_0(tmp_path):
    """JSON user-data that is not a ctxd bootstrap (an Ignition config) is exit 0, touching nothing."""
    source = tmp_path / "user-data"
    source.write_text('{"ignition": {"version": "3.4.0"}, "storage": {}}')
    state = tmp_path / "state"
    assert ctxagent.main(["--bootstrap", str(source), "--state-dir", str(state)]) == 0
    assert not state.exists()


def test_main_with_corrupt_bootstrap_exits_1(tmp_path):
    """A corrupt bootstrap is exit 1 before any network or state directory."""
    source = tmp_path / "bootstrap.json"
    source.write_text('{"ctxd_bootstrap": 1, "url": "http://plain"}')
    state = tmp_path / "state"
    assert ctxagent.main(["--bootstrap", str(source), "--state-dir", str(state)]) == 1
    assert not state.exists()


def test_main_with_unusable_scripts_dir_exits_2(tmp_path, bootstrap):
    """A scripts dir that is there but no directory is exit 2, before any network access. (One given
    but missing is an error only when the view delivers no scripts: tests/test_agent_deployer_day.py.)"""
    source = tmp_path / "bootstrap.json"
    source.write_text(json.dumps(bootstrap))
    (tmp_path / "file").write_text("")
    assert ctxagent.main(["--bootstrap", str(source), "--state-dir", str(tmp_path / "s"),
                          "--scripts-dir", str(tmp_path / "file")]) == 2
    assert not (tmp_path / "s").exists()


def test_instance_key_created_once_by_racing_runs(tmp_path):
    """Runs racing on a fresh state dir all use one instance key, complete and 0600, no temp file left."""
    for attempt in range(10):
        state = tmp_path / str(attempt)
        state.mkdir()
        options = ctxagent.parse_args(["--bootstrap", "x", "--state-dir", str(state)])
        barrier, keys = threading.Barrier(8), []

        def race():
            agent = ctxagent.Agent(options, ctxagent.Redactor(), None)
            barrier.wait()
            keys.append(agent.instance_key())
        threads = [threading.Thread(target=race) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(keys) == 8 and len(set(keys)) == 1
        assert os.listdir(str(state)) == ["instance_key"]
        assert (state / "instance_key").read_text() == keys[0] + "\n"
        assert stat.S_IMODE((state / "instance_key").stat().st_mode) == 0o600


def test_instance_key_kept_or_refused_when_corrupt(tmp_path):
    """An existing instance key is reused as is; a corrupt one is a config error (exit 2)."""
    options = ctxagent.parse_args(["--bootstrap", "x", "--state-dir", str(tmp_path)])
    (tmp_path / "instance_key").write_text("k" * 43 + "\n")
    assert ctxagent.Agent(options, ctxagent.Redactor(), None).instance_key() == "k" * 43
    (tmp_path / "instance_key").write_text("bad key\n")
    with pytest.raises(ctxagent.ConfigError):
        ctxagent.Agent(options, ctxagent.Redactor(), None).instance_key()


# ---------------------------------------------------------------------------
# Whole runs against a fake broker

NODE_TOKEN = "ctxd_node_" + "n" * 43


class FakeConnection(object):
    """Stands in for ctxagent.BrokerConnection: canned replies, every request recorded."""
    calls = []
    ok_reply = (200, b"{}")

    def __init__(self, bootstrap, source=None):
        self.local_address, self.reached = "10.1.0.5", True
        self.opened = self.resumed = 0

    def connect(self, timeout=None):
        return self.local_address

    def close(self):
        pass

    def request(self, method, path, token=None, body=None, timeout=None):
        self.calls.append((method, path.split("?")[0], body))
        if path.endswith("/enroll"):
            return 201, json.dumps({"context_id": CID, "group": "compute", "node_id": NID,
                                    "node_token": NODE_TOKEN}).encode()
        if "/view?" in path:
            return 200, json.dumps(sample_view()).encode()
        if path.endswith("/report") and body["state"] == "ok":
            return self.ok_reply
        return 200, b"{}"

    @classmethod
    def reports(cls):
        return [body for _, path, body in cls.calls if path.endswith("/report")]


@pytest.fixture
def broker(monkeypatch):
    """ctxagent.BrokerConnection replaced by a fresh FakeConnection class; no interface discovery."""
    class Fake(FakeConnection):
        calls = []
    monkeypatch.setattr(ctxagent, "BrokerConnection", Fake)
    monkeypatch.setattr(ctxagent, "discover_interfaces",
                        lambda: [{"name": "eth0", "ipv4": ["10.1.0.5"], "ipv6": []}])
    return Fake


def agent_argv(tmp_path, paths, bootstrap, *extra):
    source = tmp_path / "bootstrap.json"
    source.write_text(json.dumps(bootstrap))
    return ["--bootstrap", str(source), "--state-dir", paths.state_dir, "--scripts-dir", paths.scripts_dir,
            "--hosts-file", paths.hosts_file, "--known-hosts-file", paths.known_hosts_file,
            "--ssh-dir", str(tmp_path), "--address", "10.1.0.5", "--hostname", "node-3",
            "--fqdn", "node-3.cluster.example.org", "--poll-wait", "0"] + list(extra)


def test_run_with_a_daemon_starting_script(site, bootstrap, broker, daemons):
    """A whole run whose 4-restarts script leaves a daemon ends at once, exit 0, daemon alive, lock free."""
    tmp_path, paths = site
    pidfile = tmp_path / "daemon.pid"
    shell_script(tmp_path / "scripts" / "4-restarts" / "torquemaster",
                 "sleep 30 &\necho $! > %s\necho token %s\n" % (pidfile, bootstrap["join_token"]))
    began = time.monotonic()
    assert ctxagent.main(agent_argv(tmp_path, paths, bootstrap)) == 0
    assert time.monotonic() - began < 5
    daemons.append(int(pidfile.read_text()))
    assert alive(daemons[0])
    assert [r["state"] for r in broker.reports()] == ["ok"]
    tail = broker.reports()[0]["log_tail"]
    assert "4-restarts/torquemaster: token <redacted>" in tail
    assert bootstrap["join_token"] not in tail
    with open(os.path.join(paths.state_dir, "lock")) as lock:   # the daemon holds no lock
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    for name in ("lock", "script.out", "instance_key", "node.json", "ctxagent.log"):
        assert stat.S_IMODE(os.stat(os.path.join(paths.state_dir, name)).st_mode) == 0o600


def test_run_with_script_timeout_fails_with_exit_4(site, bootstrap, broker):
    """A script running past --script-timeout makes the run exit 4 and report the error."""
    tmp_path, paths = site
    shell_script(tmp_path / "scripts" / "clean.sh", "sleep 30\n")
    assert ctxagent.main(agent_argv(tmp_path, paths, bootstrap, "--script-timeout", "0.5")) == 4
    error = broker.reports()[-1]
    assert (error["state"], error["exit_code"]) == ("error", 4)
    assert "script clean.sh timed out after 0.5 s" in error["message"]


def test_ok_report_refused_with_409_exits_6(site, bootstrap, broker, capsys):
    """A broker answering the ok report with 409 makes the run exit 6, saying so, with no error report."""
    tmp_path, paths = site
    broker.ok_reply = (409, b'{"error": "conflict", "message": "view not complete"}')
    assert ctxagent.main(agent_argv(tmp_path, paths, bootstrap)) == 6
    assert "failed (exit 6): report ok refused by the broker: HTTP 409 'conflict: view not complete'" \
        in capsys.readouterr().err
    assert [r["state"] for r in broker.reports()] == ["ok"]


def _old_broker_views(broker, longest):
    """The fake broker answers a view request waiting longer than LONGEST with 400, as ctxd
    before 0.2 did above 60 s; the waits asked for, in order."""
    waits = []
    plain = broker.request

    def request(self, method, path, token=None, body=None, timeout=None):
        if "/view?" in path:
            wait = int(path.rsplit("wait=", 1)[1])
            waits.append((wait, timeout))
            if wait > longest:
                self.calls.append((method, path.split("?")[0], body))
                return 400, b'{"error": "bad_request", "message": "wait: must be from 0 to 60 seconds"}'
        return plain(self, method, path, token, body, timeout)
    broker.request = request
    return waits


def test_an_older_broker_refusing_long_waits_is_asked_for_60_s(site, bootstrap, broker, capsys):
    """By default a view request waits 120 s (socket timeout 120 + 30 s); a broker allowing at most
    60 s answers 400, and the agent asks again for 60 s and finishes its run."""
    tmp_path, paths = site
    waits = _old_broker_views(broker, 60)
    argv = agent_argv(tmp_path, paths, bootstrap)
    argv = argv[:argv.index("--poll-wait")] + argv[argv.index("--poll-wait") + 2:]   # the default
    assert ctxagent.main(argv) == 0
    assert waits == [(120, 120 + ctxagent.REQUEST_TIMEOUT), (60, 60 + ctxagent.REQUEST_TIMEOUT)]
    assert "the broker refused a 120 s wait (ctxd before 0.2?): waiting 60 s per request" in capsys.readouterr().err
    assert [r["state"] for r in broker.reports()] == ["ok"]


def test_a_400_to_a_short_wait_is_not_retried(site, bootstrap, broker):
    """The fallback is for a long wait only: a 400 to a wait of 60 s or less ends the run (exit 1),
    reported, after one request."""
    tmp_path, paths = site
    waits = _old_broker_views(broker, 0)
    assert ctxagent.main(agent_argv(tmp_path, paths, bootstrap, "--poll-wait", "60")) == 1
    assert [w for w, _ in waits] == [60]
    assert [r["state"] for r in broker.reports()] == ["error"]


def test_run_exits_0_while_another_holds_the_lock(site, bootstrap, broker, capsys):
    """A run finding STATE/lock held logs one line and exits 0 before any request or script."""
    tmp_path, paths = site
    lock_path = os.path.join(paths.state_dir, "lock")
    with open(lock_path, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert ctxagent.main(agent_argv(tmp_path, paths, bootstrap)) == 0
    assert "another ctxagent run holds %s" % lock_path in capsys.readouterr().err
    assert broker.calls == [] and recorded(tmp_path) == []
    assert not os.path.exists(os.path.join(paths.state_dir, "instance_key"))
    assert ctxagent.main(agent_argv(tmp_path, paths, bootstrap)) == 0   # once it is free
    assert [r["state"] for r in broker.reports()] == ["ok"]


def test_keepalive_probes_the_broker_connection():
    """The agent's broker connection sends TCP keepalive probes (KEEPALIVE: 20 s idle, every 5 s,
    3 of them) so a long-poll to a vanished broker host ends within about 35 s: set on its real
    TCP socket before the TLS handshake (here a stand-in TLS context that records the socket)."""
    seen = []

    class RecordingTLS(ssl.SSLContext):
        def wrap_socket(self, sock, server_hostname=None, session=None):
            seen.append((sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                         sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                         sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
                         sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT)))
            raise ssl.SSLError("stop here")

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        connection = ctxagent._HTTPSConnection("127.0.0.1", listener.getsockname()[1], RecordingTLS(ssl.PROTOCOL_TLS_CLIENT), 5, None, None)
        with pytest.raises(ssl.SSLError):
            connection.connect()
        connection.close()
    assert seen == [(1,) + ctxagent.KEEPALIVE] and ctxagent.KEEPALIVE == (20, 5, 3)
