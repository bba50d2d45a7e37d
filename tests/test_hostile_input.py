"""Hostile input (issue 3): property tests of the agent's view handling and of the
cluster-file parser, and the agent's file safety (atomic writes, planted symlinks,
private modes, no token in its log, its scripts' output or its error report).

Bounded for CI; CTXD_FUZZ_LONG=1 selects a hypothesis profile with many more examples.
"""

import base64
import datetime
import http.server
import ipaddress
import json
import math
import os
import re
import ssl
import stat
import string
import subprocess
import sys
import tempfile
import threading

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import ctxagent  # noqa: E402
from ctxd.cluster import MAX_QUANTITY, ClusterFileError, parse_cluster_text  # noqa: E402

try:
    import tomllib
except ImportError:  # Python < 3.11
    import tomli as tomllib  # type: ignore[no-redef]

settings.register_profile(
    "ctxd-hostile", max_examples=100, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
settings.register_profile("ctxd-hostile-long", settings.get_profile("ctxd-hostile"), max_examples=5000)
PROFILE = settings.get_profile("ctxd-hostile-long" if os.environ.get("CTXD_FUZZ_LONG") == "1"
                               else "ctxd-hostile")


def fuzz(scale):
    """The profile's settings with SCALE times its number of examples."""
    return settings(PROFILE, max_examples=max(1, int(PROFILE.max_examples * scale)))


CID = "Q2x1c3Rlci1pZC0xMjM0NT"
NID = "Tm9kZS1pZC0wMDAwMDAwMD"
HEAD_ID = "SGVhZC1ub2RlLWlkLTAwMD"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHZ0ZXN0a2V5"

# ---------------------------------------------------------------------------
# Independent validators: written from the rules in docs/api.md and RFC 1123,
# not from ctxagent's regular expressions.

ALNUM = frozenset(string.ascii_letters + string.digits)


def is_name(s):
    """A role, data or group name: 1-64 of A-Z a-z 0-9 _ . -, starting with a letter or digit."""
    return (isinstance(s, str) and 1 <= len(s) <= 64 and s[0] in ALNUM
            and set(s) <= ALNUM | set("_.-"))


def is_label(s):
    """One RFC 1123 label: 1-63 letters, digits and hyphens, no hyphen at either end."""
    return (isinstance(s, str) and 1 <= len(s) <= 63 and set(s) <= ALNUM | {"-"}
            and s[0] != "-" and s[-1] != "-")


def parses_as_ip(s):
    try:
        ipaddress.ip_address(s)
        return True
    except ValueError:
        return False


def is_fqdn(s):
    """Dot-separated RFC 1123 labels, at most 253 characters, and not an IP address."""
    return (isinstance(s, str) and len(s) <= 253 and all(is_label(x) for x in s.split("."))
            and not parses_as_ip(s))


def is_ip(s, canonical=False):
    """An IPv4 or IPv6 address without a scope id (canonical: as ipaddress prints it)."""
    if not isinstance(s, str) or "%" in s or not parses_as_ip(s):
        return False
    return not canonical or str(ipaddress.ip_address(s)) == s


def is_iface(s):
    """An interface name: 1-16 ASCII letters, digits and _ . : @ -, starting with a letter or digit."""
    return (isinstance(s, str) and 1 <= len(s) <= 16 and s[0] in ALNUM
            and set(s) <= ALNUM | set("_.:@-"))


def is_ssh_key(s):
    """'TYPE BASE64' of a known key type, one line, no comment."""
    if not isinstance(s, str) or s.count(" ") != 1:
        return False
    kind, blob = s.split(" ")
    return (kind in KEY_TYPES and 1 <= len(blob.rstrip("=")) <= 4000 and len(blob) - len(blob.rstrip("=")) <= 2
            and set(blob.rstrip("=")) <= ALNUM | set("+/"))


KEY_TYPES = ["ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384",
             "ecdsa-sha2-nistp521", "sk-ssh-ed25519@openssh.com", "sk-ecdsa-sha2-nistp256@openssh.com"]

# ---------------------------------------------------------------------------
# Strategies: valid values, hostile strings, wrong JSON types.

FRAGMENTS = ["../", "..", "/", "/abs", "/etc/passwd", ".", ".hidden", "\x00", "\n", "\r", "\r\n", "\t",
             " ", ";", "|", "&", "$", "(", ")", "`", "<", ">", "*", "?", "'", '"', "\\", "$(id)", "`id`",
             "%eth0", "%", "-", "--", "#", "=", ",", ":", "@", "~", "\x7f", "\x1b[2J"]
LOOKALIKES = ["\u0430", "\u0435", "\u043e", "\uff41", "\uff10", "\u0660", "\u0661", "\u2024", "\uff0e",
              "\u2215", "\u2044", "\u200b", "\u00a0", "\u212a", "\u0131", "\U0001d7ce", "\ufeff",
              "\u202e", "\u2028", "\u0085", "\udc80", "\ud800", "\u00e9"]
CURATED = ["fe80::1%eth0", "::1%1", "fd00::1%25eth0", "010.1.1.1", "1.1.1", "10.1.1", "0x0a.0.0.1",
           "10.0.0.1/24", "10.0.0.256", " 10.0.0.1", "10.0.0.1 ", "10.0.0.1\n", "::ffff:10.0.0.1",
           "FD00::0001", "0:0:0:0:0:0:0:1", "1.2.3.4", "1e1.1.1.1", "\uff11.\uff12.\uff13.\uff14",
           "localhost", "localhost.", "a.", ".a", ".", "..", "...", "-rf", "--help", "-", "", "a" * 63,
           "a" * 64, "a" * 65, "a-", "-a", "a_b", "a.b", "a..b", "x" * 254, "\u0430dmin", "eth0:1",
           "veth1@if6", "eth0\x00", "ssh-ed25519 AAAA comment", "ssh-rsa AAAA\nssh-rsa BBBB",
           "ssh-dss AAAA", "../../../etc/passwd", "..%2f..%2fetc", "con", "nul", "\\\\?\\C:\\x"]

valid_piece = st.from_regex(r"[A-Za-z0-9]{1,8}", fullmatch=True)
huge = st.builds(lambda c, n: c * n, st.sampled_from(["a", "1", ".", "/", "../", "\x00", "\u00e9", "a.", "a b"]),
                 st.integers(10000, 70000))
hostile_text = st.one_of(
    st.sampled_from(CURATED),
    st.lists(st.one_of(st.sampled_from(FRAGMENTS + LOOKALIKES), valid_piece), min_size=1, max_size=6)
    .map("".join),
    huge,
    st.text(max_size=20),
)
wrong_type = st.one_of(
    st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.floats(), st.just([]), st.just({}),
    st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
hostile = st.one_of(hostile_text, wrong_type)


def near(valid):
    """VALID with a hostile fragment inserted, replacing a character or two, or appended."""
    return st.builds(lambda piece, at, cut: valid[:at] + piece + valid[at + cut:],
                     st.sampled_from(FRAGMENTS + LOOKALIKES + ["a" * 300, ".."]),
                     st.integers(0, len(valid)), st.integers(0, 2))

valid_name = st.one_of(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", fullmatch=True),
                       st.sampled_from(["torquemaster", "gridmap", "0", "a..b", "A.", "x" * 64, "a-_."]))
valid_label = st.from_regex(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?", fullmatch=True)
valid_fqdn = st.lists(valid_label, min_size=1, max_size=4).map(".".join).filter(lambda s: len(s) <= 253)
valid_ip = st.one_of(st.ip_addresses().map(str),
                     st.sampled_from(["FD00:0:0::0005", "::ffff:10.1.2.3", "10.1.0.5", "0.0.0.0", "::",
                                      "255.255.255.255", "fe80::1"]))
valid_iface = st.one_of(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.:@-]{0,15}", fullmatch=True),
                        st.sampled_from(["eth0", "ens5", "eth0.100", "veth1@if6", "wg0"]))
valid_key = st.builds(lambda t, b: t + " " + base64.b64encode(b).decode(), st.sampled_from(KEY_TYPES),
                      st.binary(min_size=1, max_size=48))
valid_id = st.from_regex(r"[A-Za-z0-9_-]{22}", fullmatch=True)
valid_b64 = st.one_of(st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode()),
                      st.binary(max_size=64).map(lambda b: base64.urlsafe_b64encode(b).decode().rstrip("=")))


@st.composite
def valid_views(draw, least=0):
    """A complete, valid view for node NID of context CID, with at least LEAST of each kind of item."""
    def many(make, most):
        return [make() for _ in range(draw(st.integers(least, most)))]

    def peer():
        obj = {"node_id": draw(valid_id), "hostname": draw(valid_label), "fqdn": draw(valid_fqdn),
               "ip": draw(valid_ip), "ssh_host_keys": many(lambda: draw(valid_key), 2)}
        if least or draw(st.booleans()):
            obj["group"] = draw(valid_name)
        return obj

    return {
        "context_id": CID, "node_id": NID, "revision": draw(st.integers(0, 2 ** 40)), "complete": True,
        "waiting_for": many(lambda: draw(hostile_text), 1),
        "self": {"hostname": draw(valid_label), "fqdn": draw(valid_fqdn), "primary_ip": draw(valid_ip),
                 "interfaces": many(lambda: {"name": draw(valid_iface),
                                             "ipv4": many(lambda: draw(valid_ip), 2),
                                             "ipv6": many(lambda: draw(valid_ip), 2)}, 3),
                 "ssh_host_keys": many(lambda: draw(valid_key), 2)},
        "roles": {draw(valid_name): {"ready": True, "providers": many(peer, 2)}
                  for _ in range(draw(st.integers(least, 3)))},
        "data": {draw(valid_name): many(lambda: {"b64": draw(valid_b64)}, 2)
                 for _ in range(draw(st.integers(least, 2)))},
        "all_identities": many(peer, 2) if least or draw(st.booleans()) else None,
    }


def locations(obj, path=()):
    """Every value in OBJ as a path of keys/indexes; ("key", K) at the end names the object key K itself."""
    found = [path]
    if isinstance(obj, dict):
        for key, value in obj.items():
            found.append(path + (("key", key),))
            found += locations(value, path + (key,))
    elif isinstance(obj, list):
        for index, value in enumerate(obj):
            found += locations(value, path + (index,))
    return found


def kind(path):
    """What a location is, e.g. "peer.ip", "self.interfaces[].name", "roles.<key>", "self.<key hostname>"."""
    words = []
    for step in path:
        if isinstance(step, int):
            words.append("[]")
        elif isinstance(step, tuple):
            words.append("<key>" if words in (["roles"], ["data"]) else "<key %s>" % step[1])
        elif words in (["roles"], ["data"]):
            words.append("*")
        else:
            words.append(step)
    text = ".".join(words).replace(".[]", "[]")
    return re.sub(r"^(roles\.\*\.providers\[\]|all_identities\[\])", "peer", text)


# Where a hostile value would reach a script argv, a file path or a managed line
# (and the fields checked first); "any" is any location at all, object keys included.
SENSITIVE = ["roles.<key>", "data.<key>", "data.*[].b64", "revision", "complete", "context_id", "node_id",
             "self.hostname", "self.fqdn", "self.primary_ip", "self.ssh_host_keys[]",
             "self.interfaces[].name", "self.interfaces[].ipv4[]", "self.interfaces[].ipv6[]",
             "peer.hostname", "peer.fqdn", "peer.ip", "peer.node_id", "peer.group", "peer.ssh_host_keys[]"]
KINDS = st.sampled_from(SENSITIVE + ["any"] * 4)


@st.composite
def raw_views(draw):
    """A valid view, or one with one, a few or many values (or object keys) replaced by hostile ones:
    a valid string with a fragment inserted, a hostile string, or a value of a wrong JSON type."""
    mode = draw(st.sampled_from(["valid", "one", "one", "one", "few", "many"]))
    targets = {"valid": [], "one": [draw(KINDS)], "few": draw(st.lists(KINDS, min_size=2, max_size=4)),
               "many": ["any"] * draw(st.integers(5, 40))}[mode]
    view = draw(valid_views(least=1 if targets else 0))
    for target in targets:
        places = [p for p in locations(view)[1:] if target in ("any", kind(p))]
        if not places:
            continue
        if mode == "one":
            event("hostile " + target)
        path = places[draw(st.integers(0, len(places) - 1))]
        parent = view
        for step in path[:-1]:
            parent = parent[step]
        last = path[-1]
        if isinstance(last, tuple):           # rename an object key
            parent[draw(st.one_of(near(last[1]), hostile_text))] = parent.pop(last[1])
        else:
            value = parent[last]
            near_value = near(value) if isinstance(value, str) else hostile
            parent[last] = draw(st.one_of(near_value, near_value, hostile))
    if mode != "valid" and draw(st.booleans()):
        view[draw(hostile_text)] = draw(hostile)   # an unknown top-level key: ignored
    # What the agent gets: a JSON object as decode_reply returns it.
    return json.loads(json.dumps(view))


# ---------------------------------------------------------------------------
# A site: recording scripts, a state dir, hosts and known_hosts files.

RECORDER = "#!/bin/sh\nprintf '%%s\\0' \"$#\" \"$0\" \"$@\" >> '%s'\n"
PHASES = {"1-ipandhost": "role", "4-restarts": "role", "3-data": "data", "2-thishost": "iface",
          "5-thishost-finalize": "iface"}


def creatable(name):
    """Whether NAME can be a file name in a directory of the test's own (even a hostile one)."""
    try:
        size = len(name.encode("utf-8"))
    except (AttributeError, UnicodeEncodeError):
        return False
    return 0 < size <= 200 and name not in (".", "..") and "/" not in name and "\x00" not in name


def make_site(top, view=None):
    """Paths of a site under TOP, with a recording script for every name in VIEW that can be a file."""
    scripts = os.path.join(top, "scripts")
    record = os.path.join(top, "record")
    names = {"role": [], "data": [], "iface": []}
    if isinstance(view, dict):
        for kind, key in (("role", "roles"), ("data", "data")):
            if isinstance(view.get(key), dict):
                names[kind] = list(view[key])
        me = view.get("self")
        if isinstance(me, dict) and isinstance(me.get("interfaces"), list):
            names["iface"] = [i.get("name") for i in me["interfaces"] if isinstance(i, dict)]
    targets = ["clean.sh", "0-etchosts.sh", "problem.sh"] + [
        phase + "/" + name for phase, kind in PHASES.items() for name in names[kind] if creatable(name)]
    for target in targets:
        path = os.path.join(scripts, *target.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(RECORDER % record)
        os.chmod(path, 0o755)
    state = os.path.join(top, "state")
    os.mkdir(state, 0o700)
    with open(os.path.join(top, "hosts"), "w") as f:
        f.write("127.0.0.1 localhost\n")
    os.mkdir(os.path.join(top, "outside"))
    with open(os.path.join(top, "outside", "victim"), "w") as f:
        f.write("precious\n")
    return ctxagent.Paths(scripts, state, os.path.join(top, "hosts"), os.path.join(top, "known_hosts"))


def recorded(top):
    """[(script relative to the scripts dir, [args])] in the order they ran."""
    path = os.path.join(top, "record")
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        fields = f.read().split(b"\0")
    assert fields.pop() == b""
    runs = []
    while fields:
        count, argv0 = int(fields[0]), fields[1].decode("utf-8", "surrogateescape")
        args = [a.decode("utf-8", "surrogateescape") for a in fields[2:2 + count]]
        del fields[:2 + count]
        runs.append((os.path.relpath(argv0, os.path.join(top, "scripts")), args))
    return runs


def snapshot(root):
    """Every path below ROOT: its type, mode, and content or link target."""
    result = {}
    for directory, dirs, names in os.walk(root):
        for name in [""] + dirs + names:
            path = os.path.join(directory, name) if name else directory
            st_ = os.lstat(path)
            if stat.S_ISREG(st_.st_mode):
                with open(path, "rb") as f:
                    content = f.read()
            else:
                content = os.readlink(path) if stat.S_ISLNK(st_.st_mode) else None
            result[path] = (st_.st_mode, content)
    return result


def managed_lines(path):
    """The lines of the ctxd block of context CID in PATH."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        text = f.read().decode("utf-8")
    begin, end = "# BEGIN ctxd (context %s)\n" % CID, "# END ctxd (context %s)\n" % CID
    assert text.count(begin) == 1 and text.count(end) == 1
    return text.split(begin)[1].split(end)[0].splitlines()


def b64_value(text):
    return base64.b64decode(text.replace("-", "+").replace("_", "/") + "=" * (-len(text) % 4))


def check_accepted_view(view):
    """Every string of an accepted view that can reach a file, a path or an argv is valid."""
    peers = list(view.get("all_identities") or [])
    for name, role in view.get("roles", {}).items():
        assert is_name(name), name
        peers += role.get("providers", [])
    for name, values in view.get("data", {}).items():
        assert is_name(name), name
        assert all(isinstance(v, dict) and isinstance(v["b64"], str) for v in values)
    for p in peers:
        assert is_label(p["hostname"]) and is_fqdn(p["fqdn"]) and is_ip(p["ip"]), p
        assert all(is_ssh_key(k) for k in p.get("ssh_host_keys", [])), p
        assert "group" not in p or is_name(p["group"]), p
    me = view["self"]
    assert is_label(me["hostname"]) and is_fqdn(me["fqdn"]) and is_ip(me["primary_ip"]), me
    assert all(is_ssh_key(k) for k in me.get("ssh_host_keys", [])), me
    for i in me.get("interfaces", []):
        assert is_iface(i["name"]) and all(is_ip(a) for a in i.get("ipv4", []) + i.get("ipv6", [])), i


def check_argv(paths, runs, view):
    """Each script that ran is a planned one with a well-formed argv; data paths are STATE/data/NAME/N."""
    assert runs and runs[0] == ("clean.sh", []), runs[:1]
    data_dir = os.path.join(paths.state_dir, "data")
    for script, args in runs:
        parts = script.split("/")
        assert all(not a.startswith("-") for a in args), (script, args)
        if parts == ["clean.sh"] or parts[0] == "4-restarts":
            assert args == [], (script, args)
        elif parts[0] == "3-data":
            assert len(args) == 1, (script, args)
            name, index = os.path.relpath(args[0], data_dir).split(os.sep)
            assert args[0] == os.path.join(data_dir, name, index) and name == parts[1], (script, args)
            assert is_name(name) and index.isdigit() and index.isascii(), (script, args)
            with open(args[0], "rb") as f:
                assert f.read() == b64_value(view["data"][name][int(index)]["b64"])
        else:
            assert parts[0] in ("0-etchosts.sh", "1-ipandhost", "2-thishost", "5-thishost-finalize"), script
            assert len(args) == 3 and is_ip(args[0], True) and is_label(args[1]) and is_fqdn(args[2]), args
        if len(parts) == 2:
            assert (is_iface if PHASES[parts[0]] == "iface" else is_name)(parts[1]), script
        assert len(parts) <= 2 and parts[0] != "problem.sh", script


def check_writes(top, paths, before, after):
    """Only the view, the script output, data files, hosts and known_hosts changed; all 0600 in STATE."""
    data_dir = os.path.join(paths.state_dir, "data")
    allowed = {os.path.join(paths.state_dir, n) for n in ("view.json", "script.out")} | {
        paths.hosts_file, paths.known_hosts_file, os.path.join(top, "record"), data_dir}
    for path, (mode, _) in after.items():
        if before.get(path) == after[path] or path in allowed:
            continue
        parts = os.path.relpath(path, data_dir).split(os.sep)
        assert path.startswith(data_dir + os.sep) and is_name(parts[0]) and len(parts) <= 2, path
        if len(parts) == 2:
            assert parts[1].isdigit() and parts[1].isascii() and stat.S_ISREG(mode), path
    assert set(before) <= set(after)
    for name in ("view.json", "script.out"):
        assert stat.S_IMODE(after[os.path.join(paths.state_dir, name)][0]) == 0o600
    for path, (mode, _) in after.items():
        if path.startswith(data_dir):
            assert stat.S_IMODE(mode) == (0o700 if stat.S_ISDIR(mode) else 0o600), path


@fuzz(1.5)
@given(raw_views())
def test_hostile_view_is_refused_whole_or_fully_valid(view):
    """A view is either refused with InputError (no script run, no byte written) or every string
    reaching a script argv, a file path or a managed line is valid, and writes stay in the configured files."""
    with tempfile.TemporaryDirectory() as top:
        paths = make_site(top, view)
        before = snapshot(top)
        try:
            ctxagent.apply_view(view, CID, NID, paths, 30)
        except ctxagent.InputError:
            event("refused")
            assert recorded(top) == []
            assert snapshot(top) == before
            return
        event("accepted")
        check_accepted_view(view)
        check_argv(paths, recorded(top), view)
        check_writes(top, paths, before, snapshot(top))
        for line in managed_lines(paths.hosts_file):
            ip, fqdn, short = line.split(" ")
            assert is_ip(ip, True) and is_fqdn(fqdn) and is_label(short), line
        for line in managed_lines(paths.known_hosts_file):
            names, key = line.split(" ", 1)
            fqdn, short, ip = names.split(",")
            assert is_fqdn(fqdn) and is_label(short) and is_ip(ip, True) and is_ssh_key(key), line
