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
from ctxd.ctxctl.cluster import ClusterFileError, parse_cluster_text  # noqa: E402
from ctxd.rules import MAX_QUANTITY  # noqa: E402

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
EDGES = ["%eth0", "%1", "\n", "\r", " ", "\x00", ";id", "|", "$(id)", "`id`", "/", "/..", ".", "..", "-",
         "_", ":", "@", "\u0430", "\uff0e", "\u200b", "a" * 300]


def near(valid):
    """VALID with a hostile fragment prepended or appended (EDGES), or inserted anywhere, replacing
    up to two characters (FRAGMENTS, LOOKALIKES)."""
    return st.one_of(
        st.builds(lambda piece: piece + valid, st.sampled_from(EDGES)),
        st.builds(lambda piece: valid + piece, st.sampled_from(EDGES)),
        st.builds(lambda piece, at, cut: valid[:at] + piece + valid[at + cut:],
                  st.sampled_from(FRAGMENTS + LOOKALIKES), st.integers(0, len(valid)), st.integers(0, 2)))


valid_name = st.one_of(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", fullmatch=True),
                       st.sampled_from(["torquemaster", "gridmap", "0", "a..b", "A.", "x" * 64, "a-_."]))
valid_label = st.from_regex(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?", fullmatch=True)
valid_fqdn = st.lists(valid_label, min_size=1, max_size=4).map(".".join).filter(
    lambda s: len(s) <= 253 and not s.split(".")[-1].isdigit())  # rules.is_fqdn
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

    # A node's names, primary address and keys are its own (the broker refuses any other claim).
    names, addresses, keys = set(), set(), set()

    def name_pair():
        hostname = draw(valid_label.filter(lambda v: v.lower() not in names))
        fqdn = draw(valid_fqdn.filter(lambda v: v.lower() not in names or v.lower() == hostname.lower()))
        names.update((hostname.lower(), fqdn.lower()))
        return hostname, fqdn

    def own(strategy, taken, canonical=lambda v: v):
        value = draw(strategy.filter(lambda v: canonical(v) not in taken))
        taken.add(canonical(value))
        return value

    def address():
        return own(valid_ip, addresses, lambda v: str(ipaddress.ip_address(v)))

    def peer():
        hostname, fqdn = name_pair()
        obj = {"node_id": draw(valid_id), "hostname": hostname, "fqdn": fqdn,
               "ip": address(), "ssh_host_keys": many(lambda: own(valid_key, keys), 2)}
        if least or draw(st.booleans()):
            obj["group"] = draw(valid_name)
        return obj

    hostname, fqdn = name_pair()
    return {
        "context_id": CID, "node_id": NID, "revision": draw(st.integers(0, 2 ** 40)), "complete": True,
        "waiting_for": many(lambda: draw(hostile_text), 1),
        "self": {"hostname": hostname, "fqdn": fqdn, "primary_ip": address(),
                 "interfaces": many(lambda: {"name": draw(valid_iface),
                                             "ipv4": many(lambda: draw(valid_ip), 2),
                                             "ipv6": many(lambda: draw(valid_ip), 2)}, 3),
                 "ssh_host_keys": many(lambda: own(valid_key, keys), 2)},
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


@st.composite
def raw_views(draw, target):
    """A valid view ("valid"), or one with hostile values at a location of kind TARGET ("any":
    anywhere, object keys included), at 2-4 locations of random kinds ("few") or at 5-40
    locations ("many"). A hostile value is a valid string with a fragment inserted, a hostile
    string, or a value of a wrong JSON type."""
    targets = {"valid": [], "few": draw(st.lists(st.sampled_from(SENSITIVE + ["any"]), min_size=2, max_size=4)),
               "many": ["any"] * draw(st.integers(5, 40))}.get(target, [target])
    view = draw(valid_views(least=1 if targets else 0))
    for wanted in targets:
        places = [p for p in locations(view)[1:] if wanted in ("any", kind(p))]
        if not places:
            continue
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
    if targets and draw(st.booleans()):
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
        for what, key in (("role", "roles"), ("data", "data")):
            if isinstance(view.get(key), dict):
                names[what] = list(view[key])
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


@pytest.mark.parametrize("target", ["valid", "few", "many", "any"] + SENSITIVE)
@fuzz(0.1)
@given(data=st.data())
def test_hostile_view_is_refused_whole_or_fully_valid(target, data):
    """A hostile view is refused whole (nothing run or written) or all it passes on is valid and lands in place."""
    # Refused: InputError, no script ran, the site is byte for byte as before. Accepted: every
    # name, host name, FQDN and address in it is valid (checked independently), so is every argv
    # element of every script that ran and every managed line, and only the configured files
    # changed, the data files as STATE/data/NAME/N.
    view = data.draw(raw_views(target), label="view")
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


# ---------------------------------------------------------------------------
# The cluster-file parser

FIELDS = ["name", "open_for_injection", "expires_in", "join_token_ttl", "group", "data"]
toml_wrong_type = st.one_of(
    st.booleans(), st.integers(-2 ** 63, 2 ** 63 - 1), st.floats(), st.text(max_size=5),
    st.lists(st.integers(0, 3), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(0, 3), max_size=2),
    st.datetimes(timezones=st.just(datetime.timezone.utc)), st.dates(), st.times())
toml_hostile = st.one_of(hostile_text, toml_wrong_type)


def toml_string(text):
    """TEXT as a TOML basic string (control characters escaped, anything else as is)."""
    escaped = "".join('\\"' if c == '"' else "\\\\" if c == "\\" else
                      "\\u%04x" % ord(c) if (ord(c) < 0x20 and c != "\t") or c == "\x7f" else c
                      for c in text)
    return '"%s"' % escaped


def toml_value(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, (int, datetime.date, datetime.time)):
        return value.isoformat() if not isinstance(value, int) else str(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, list):
        return "[%s]" % ", ".join(toml_value(v) for v in value)
    return "{%s}" % ", ".join("%s = %s" % (toml_string(k), toml_value(v)) for k, v in value.items())


def toml_document(doc):
    """DOC (a dict) as TOML: [[group]] tables for a list of tables, a [data] table for a table."""
    tables = [k for k in ("group", "data") if k in doc and (
        isinstance(doc[k], dict) if k == "data" else
        isinstance(doc[k], list) and doc[k] and all(isinstance(g, dict) for g in doc[k]))]
    lines = ["%s = %s" % (toml_string(k), toml_value(v)) for k, v in doc.items() if k not in tables]
    for key in tables:
        for table in doc[key] if key == "group" else [doc[key]]:
            lines.append("[[group]]" if key == "group" else "[data]")
            lines += ["%s = %s" % (toml_string(k), toml_value(v)) for k, v in table.items()]
    return "\n".join(lines) + "\n"


@st.composite
def valid_cluster_docs(draw):
    """A cluster document the parser must accept."""
    roles = draw(st.lists(valid_name, min_size=1, max_size=3, unique=True))
    data_names = draw(st.lists(valid_name, max_size=2, unique=True))
    inject = draw(st.booleans())

    def some(items):
        return draw(st.lists(st.sampled_from(items), unique=True)) if items else []
    groups = []
    for name in draw(st.lists(valid_name, min_size=1, max_size=3, unique=True)):
        groups.append({"name": name, "quantity": draw(st.integers(1, MAX_QUANTITY)),
                       "provides": roles if not groups else some(roles),
                       "requires": [{"role": r, "ready": draw(st.booleans())} for r in some(roles)],
                       "data": some(data_names), "all_identities": draw(st.booleans())})
    specs = [st.builds(lambda t: {"value": t}, st.text(max_size=20)),
             st.builds(lambda p: {"file": p}, st.sampled_from(["grid-mapfile", "a/b", "../x"])),
             st.builds(lambda ps: {"files": ps}, st.lists(st.sampled_from(["f1", "f2"]), min_size=1, max_size=2))]
    if inject:
        specs += [st.just({}), st.just({"inject": True})]
    printable = st.characters(whitelist_categories=("L", "N", "P", "S"), whitelist_characters=" ")
    doc = {"name": draw(st.text(printable, min_size=1, max_size=128)),
           "open_for_injection": inject, "group": groups,
           "data": {n: draw(st.one_of(specs)) for n in data_names}}
    if draw(st.booleans()):
        doc["expires_in"] = draw(st.integers(3600, 365 * 24 * 3600))
        if draw(st.booleans()):
            doc["join_token_ttl"] = draw(st.integers(60, 3600))
    return doc


@st.composite
def cluster_docs(draw, mode):
    """A valid cluster document, or one with one, a few or many values or keys hostile."""
    doc = draw(valid_cluster_docs())
    count = {"valid": 0, "one": 1, "few": draw(st.integers(2, 4)), "many": draw(st.integers(5, 20))}[mode]
    for _ in range(count):
        places = locations(doc)[1:]
        path = places[draw(st.integers(0, len(places) - 1))]
        parent = doc
        for step in path[:-1]:
            parent = parent[step]
        last = path[-1]
        if isinstance(last, tuple):           # rename a key: unknown, hostile or another valid one
            new = draw(st.one_of(near(last[1]), hostile_text, st.sampled_from(FIELDS + ["quantity", "role"])))
            parent[new] = parent.pop(last[1])
        else:
            value = parent[last]
            near_value = near(value) if isinstance(value, str) else toml_hostile
            parent[last] = draw(st.one_of(near_value, toml_hostile, toml_hostile))
    return doc


def fake_reader(path):
    """Data files as the parser's read_file sees them: bytes, or the errors open() raises."""
    if "\x00" in path:
        raise ValueError("embedded null byte")
    if len(path) > 4096:
        raise OSError(36, "File name too long")
    return ("content of %s" % path).encode("utf-8", "surrogateescape")


def one_line(text):
    return " ".join(text.split())


@pytest.mark.parametrize("mode", ["valid", "one", "few", "many"])
@fuzz(0.5)
@given(data=st.data())
def test_cluster_file_gives_a_valid_body_or_one_line_error_naming_a_field(mode, data):
    """A hostile cluster file gives a body of valid names and positive quantities, or a one-line error naming a field."""
    # Hostile values, wrong TOML types, unknown or renamed keys; any exception other than
    # ClusterFileError fails the test.
    doc = data.draw(cluster_docs(mode), label="document")
    text = toml_document(doc)
    try:
        body = parse_cluster_text(text, read_file=fake_reader)
    except ClusterFileError as exc:
        message = str(exc)
        event("refused")
        assert len(message.splitlines()) == 1 and message == one_line(message), message
        assert message.startswith("cluster.toml: "), message
        rest = message[len("cluster.toml: "):]
        try:
            parsed = tomllib.loads(text)
        except tomllib.TOMLDecodeError:
            assert rest.startswith("invalid TOML: ")
            return
        fields = FIELDS + [one_line(json.dumps(k, ensure_ascii=False)) for k in parsed] + list(parsed)
        assert any(rest.startswith(f) and rest[len(f):len(f) + 1] in (":", ".", "[") for f in fields if f), \
            message
        return
    event("accepted")
    assert mode != "valid" or body["name"] == doc["name"]
    assert isinstance(body["name"], str) and 1 <= len(body["name"]) <= 128 and body["name"].isprintable()
    assert isinstance(body["open_for_injection"], bool)
    for key in ("expires_in", "join_token_ttl"):
        assert key not in body or type(body[key]) is int and body[key] >= 60
    assert 1 <= len(body["groups"]) <= 64
    for group in body["groups"]:
        assert is_name(group["name"])
        assert type(group["quantity"]) is int and 1 <= group["quantity"] <= MAX_QUANTITY
        assert all(is_name(r) for r in group["provides"])
        assert all(is_name(r["role"]) and type(r["ready"]) is bool for r in group["requires"])
        assert all(is_name(d) and d in body["data"] for d in group["data"])
        assert type(group["all_identities"]) is bool
    for name, values in body["data"].items():
        assert is_name(name)
        assert all(set(v) == {"b64"} and base64.b64decode(v["b64"], validate=True) is not None for v in values)
    json.dumps(body)   # nothing but JSON in it


def test_cluster_file_deeply_nested_toml_is_one_line_error():
    """Deeply nested TOML arrays (a recursion bomb) end as a one-line ClusterFileError, not a crash."""
    for text in ("name = " + "[" * 100000, "name = " + "[" * 5000 + "]" * 5000, "a = " + "{b = " * 3000):
        with pytest.raises(ClusterFileError) as info:
            parse_cluster_text(text, read_file=fake_reader)
        assert len(str(info.value).splitlines()) == 1


# ---------------------------------------------------------------------------
# The agent's files: a whole run against a fake broker over real TLS

JOIN_TOKEN = "ctxd_join_" + "J0in-t0ken_" * 3
NODE_TOKEN = "ctxd_node_" + "N0de-t0ken_" * 3
BROKER_GROUP = "compute"


def complete_view():
    """A complete view with a role, a data item of two values and a peer."""
    head = {"node_id": HEAD_ID, "group": "head", "hostname": "node-1", "fqdn": "node-1.cluster.example.org",
            "ip": "10.1.0.1", "ssh_host_keys": [KEY[:-4] + "0001"]}
    return {"context_id": CID, "node_id": NID, "group": BROKER_GROUP, "revision": 2, "complete": True,
            "waiting_for": [],
            "self": {"hostname": "node-3", "fqdn": "node-3.cluster.example.org", "primary_ip": "10.1.0.5",
                     "interfaces": [{"name": "eth0", "ipv4": ["10.1.0.5"], "ipv6": []}],
                     "ssh_host_keys": [KEY]},
            "roles": {"torquemaster": {"ready": True, "providers": [head]}},
            "data": {"gridmap": [{"b64": base64.b64encode(b"/DC=x user1\n").decode()},
                                 {"b64": base64.b64encode(b"second\n").decode()}]},
            "all_identities": [head]}


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    """(CA PEM, server cert file, server key file) from ctxd's own TLS helpers, for 127.0.0.1."""
    from ctxd.tls import cert_pem, key_pem, make_ca, make_server_cert
    ca_cert, ca_key = make_ca()
    cert, key = make_server_cert(ca_cert, ca_key, ["127.0.0.1", "localhost"])
    directory = tmp_path_factory.mktemp("tls")
    (directory / "cert.pem").write_bytes(cert_pem(cert))
    (directory / "key.pem").write_bytes(key_pem(key))
    return cert_pem(ca_cert).decode("ascii"), str(directory / "cert.pem"), str(directory / "key.pem")


class ScriptedBroker:
    """A broker over TLS in a thread: enrolls, serves one view, records every request.

    HOSTILE: it echoes every secret it knows in a 503 to the first report and in the
    waiting_for of a first, incomplete view (where the agent logs them).
    """

    def __init__(self, tls, hostile=False):
        self.requests, self.instance_key, self.hostile = [], None, hostile
        self.view = None   # what views answer (default: complete_view())
        self.views_served = 0
        broker = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                broker.handle(self, "GET")

            def do_POST(self):
                broker.handle(self, "POST")

            def do_PUT(self):
                broker.handle(self, "PUT")

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(tls[1], tls[2])
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.url = "https://127.0.0.1:%d" % self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def secrets(self):
        return [s for s in (JOIN_TOKEN, NODE_TOKEN, self.instance_key) if s]

    def handle(self, request, method):
        body = request.rfile.read(int(request.headers.get("Content-Length") or 0))
        path = request.path
        self.requests.append((method, path, body))
        node = "/v1/contexts/%s/nodes/%s/" % (CID, NID)
        auth = request.headers.get("Authorization")
        status, reply = 404, {"error": "not_found", "message": "no route"}
        if path == "/healthz":
            status, reply = 200, {"status": "ok"}
        elif path == "/v1/contexts/%s/enroll" % CID and auth == "Bearer " + JOIN_TOKEN:
            self.instance_key = json.loads(body)["instance_key"]
            status, reply = 201, {"context_id": CID, "group": BROKER_GROUP, "node_id": NID,
                                  "node_token": NODE_TOKEN}
        elif path.startswith(node) and auth != "Bearer " + NODE_TOKEN:
            status, reply = 401, {"error": "unauthorized", "message": "bad node token"}
        elif path == node + "identity":
            status, reply = 200, {}
        elif path.startswith(node + "view"):
            self.views_served += 1
            reply, status = (self.view or complete_view()), 200
            if self.hostile and self.views_served == 1:
                reply.update(complete=False, revision=1, waiting_for=["group head (%s)" % s for s in self.secrets()])
            elif self.hostile and self.views_served == 2:
                status, reply = 503, {"error": "unavailable", "message": " ".join(self.secrets())}
        elif path == node + "report":
            status, reply = 200, {}
        data = json.dumps(reply).encode()
        request.send_response(status)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        request.wfile.write(data)

    def reports(self):
        return [(raw, json.loads(raw)) for method, path, raw in self.requests if path.endswith("/report")]

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def broker(tls, monkeypatch):
    """A ScriptedBroker; the agent sees one interface and retries after 10 ms, not seconds."""
    monkeypatch.setattr(ctxagent, "discover_interfaces",
                        lambda: [{"name": "eth0", "ipv4": ["10.1.0.5"], "ipv6": []}])
    monkeypatch.setattr(ctxagent.random, "uniform", lambda low, high: 0.01)
    made = []

    def make(hostile=False):
        made.append(ScriptedBroker(tls, hostile))
        return made[-1]
    yield make
    for b in made:
        b.close()


def shell_script(path, body):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("#!/bin/sh\n" + body)
    os.chmod(path, 0o755)


@pytest.fixture
def site(tmp_path):
    """Paths of a site: scripts (clean.sh, 3-data/gridmap), state, hosts, known_hosts, and outside/."""
    paths = make_site(str(tmp_path))
    shell_script(os.path.join(paths.scripts_dir, "3-data", "gridmap"), "cat \"$1\" > /dev/null\n")
    return tmp_path, paths


def run_agent(tmp_path, paths, broker, tls, *extra):
    """Run the agent's main() against BROKER; its exit code."""
    bootstrap = {"ctxd_bootstrap": 1, "url": broker.url, "context_id": CID, "group": BROKER_GROUP,
                 "join_token": JOIN_TOKEN, "ca_pem": tls[0]}
    source = tmp_path / "bootstrap.json"
    source.write_text(json.dumps(bootstrap))
    ssh_dir = tmp_path / "ssh"
    ssh_dir.mkdir(exist_ok=True)
    return ctxagent.main(["--bootstrap", str(source), "--state-dir", paths.state_dir,
                          "--scripts-dir", paths.scripts_dir, "--hosts-file", paths.hosts_file,
                          "--known-hosts-file", paths.known_hosts_file, "--ssh-dir", str(ssh_dir),
                          "--address", "10.1.0.5", "--hostname", "node-3",
                          "--fqdn", "node-3.cluster.example.org", "--poll-wait", "0", "--timeout", "20",
                          "--script-timeout", "10"] + list(extra))


def mode_of(path):
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_fake_broker_run_succeeds(site, broker, tls):
    """The fake TLS broker serves a whole run: exit 0, data files written, reports ok."""
    tmp_path, paths = site
    b = broker()
    assert run_agent(tmp_path, paths, b, tls) == 0
    assert [body["state"] for _, body in b.reports()] == ["ok"]
    with open(os.path.join(paths.state_dir, "data", "gridmap", "1"), "rb") as f:
        assert f.read() == b"second\n"


@pytest.mark.parametrize("claim", [{"fqdn": "NODE-3.cluster.example.org"}, {"hostname": "node-3"},
                                   {"ip": "10.1.0.5"}, {"ssh_host_keys": [KEY]}])
def test_a_view_where_two_nodes_claim_one_thing_runs_nothing(site, broker, tls, claim):
    """Defense in depth: a view in which a peer claims this node's name, address or key (a broker
    bug, an old journal) is refused whole - exit 1, no script, no managed line - and the error
    report names the conflict."""
    tmp_path, paths = site
    b = broker()
    b.view = complete_view()
    b.view["all_identities"][0].update(claim)
    assert run_agent(tmp_path, paths, b, tls) == ctxagent.EXIT_INPUT
    error = b.reports()[-1][1]
    assert error["state"] == "error" and "both claim" in error["message"], error
    assert not os.path.exists(os.path.join(paths.state_dir, "data"))
    for path in (paths.hosts_file, paths.known_hosts_file):
        assert not os.path.exists(path) or "ctxd" not in open(path).read()


def test_no_token_in_log_script_output_or_error_report(site, broker, tls, capsys):
    """No join token, node token or instance key reaches ctxagent.log, script.out, stderr or a report."""
    # The broker echoes every secret it knows into waiting_for and a 503 (both logged);
    # the failing script and problem.sh dump their argv, environment and view.
    tmp_path, paths = site
    dump = 'echo "args: $*"; env; cat "$CTX_VIEW"; ls -la "$(dirname "$CTX_VIEW")"\n'
    shell_script(os.path.join(paths.scripts_dir, "3-data", "gridmap"), dump + "exit 3\n")
    shell_script(os.path.join(paths.scripts_dir, "problem.sh"), dump)   # its output is script.out's last
    b = broker(hostile=True)
    assert run_agent(tmp_path, paths, b, tls) == ctxagent.EXIT_ACTION
    assert [body["state"] for _, body in b.reports()] == ["error"]
    assert b.views_served == 3   # the 503 (second view) was retried
    error = b.reports()[-1][1]
    assert error["exit_code"] == ctxagent.EXIT_ACTION and "3-data/gridmap exited 3" in error["message"]
    assert "<redacted>" in error["log_tail"]          # the echoed secrets were logged, redacted
    out, err = capsys.readouterr()
    with open(os.path.join(paths.state_dir, "ctxagent.log"), "rb") as f:
        log = f.read()
    with open(os.path.join(paths.state_dir, "script.out"), "rb") as f:
        script_out = f.read()
    assert b"args: " + paths.state_dir.encode() in log and b"CTX_NODE_ID=" + NID.encode() in log
    assert b"CTX_EXIT_CODE=4" in script_out and b"CTX_ERROR=script 3-data/gridmap exited 3" in script_out
    assert b.instance_key and len(b.secrets()) == 3
    for secret in b.secrets():
        secret_part = secret.split("_", 2)[-1] if secret.startswith("ctxd_") else secret
        for where, text in (("ctxagent.log", log), ("script.out", script_out), ("stdout", out.encode()),
                            ("stderr", err.encode())):
            assert secret_part.encode() not in text, where
        for raw, _ in b.reports():
            assert secret_part.encode() not in raw, "report"


@pytest.mark.parametrize("reuse", [False, True], ids=["enroll", "reuse-credential"])
def test_state_dir_and_secrets_end_private(site, broker, tls, reuse):
    """Pre-created with loose modes, the state and data dirs end 0700 and every state file 0600."""
    tmp_path, paths = site
    b = broker()
    state = paths.state_dir
    os.makedirs(os.path.join(state, "data", "gridmap"))
    files = {"instance_key": "k" * 43 + "\n", "view.json": "{}", "ctxagent.log": "old\n", "script.out": "",
             "lock": "", "data/gridmap/0": "old"}
    if reuse:
        files["node.json"] = json.dumps({"url": b.url, "context_id": CID, "group": BROKER_GROUP,
                                         "node_id": NID, "node_token": NODE_TOKEN})
    for name, content in files.items():
        with open(os.path.join(state, name), "w") as f:
            f.write(content)
        os.chmod(os.path.join(state, name), 0o644)
    for directory in (state, os.path.join(state, "data"), os.path.join(state, "data", "gridmap")):
        os.chmod(directory, 0o755)
    assert run_agent(tmp_path, paths, b, tls) == 0
    assert ("POST", "/v1/contexts/%s/enroll" % CID) not in [r[:2] for r in b.requests] if reuse else True
    for directory in (state, os.path.join(state, "data"), os.path.join(state, "data", "gridmap")):
        assert mode_of(directory) == 0o700, directory
    for name in list(files) + ["node.json", "data/gridmap/1"]:
        assert mode_of(os.path.join(state, name)) == 0o600, name


# Planted symlinks: (path below STATE, pointing to a file or a directory, the run's exit code:
# 0 when the agent replaces the link with its own file, else the refusal's).
PLANTED = [("node.json", "file", 0), ("view.json", "file", 0), ("data/gridmap/0", "file", 0),
           ("data", "dir", 2), ("data/gridmap", "dir", 2), ("ctxagent.log", "file", 2),
           ("instance_key", "file", 2), ("lock", "file", 2), ("script.out", "file", 4)]


@pytest.mark.parametrize("dangling", [False, True], ids=["to-victim", "dangling"])
@pytest.mark.parametrize("name, kind, expected", PLANTED, ids=[n for n, _, _ in PLANTED])
def test_planted_symlink_is_never_followed(site, broker, tls, capsys, name, kind, expected, dangling):
    """A symlink planted in the state or data dir is replaced, or refused naming it; never written through."""
    tmp_path, paths = site
    outside = tmp_path / "outside"
    victim = outside / ("victim" if kind == "file" else "elsewhere")
    if kind == "dir":
        victim.mkdir()
        victim.chmod(0o755)
    if dangling:
        victim = outside / "absent"
    link = os.path.join(paths.state_dir, name)
    os.makedirs(os.path.dirname(link), exist_ok=True)
    os.symlink(str(victim), link)
    before = snapshot(str(outside))
    code = run_agent(tmp_path, paths, broker(), tls)
    err = capsys.readouterr().err
    assert snapshot(str(outside)) == before
    assert code == expected, err
    if code == 0:
        assert not os.path.islink(link) and stat.S_ISREG(os.lstat(link).st_mode)
    else:
        assert "failed (exit %d): " % code in err and link in err, err


# ---------------------------------------------------------------------------
# Atomic writes

class Crash(BaseException):
    """Stands for the process dying at that point (a BaseException, like KeyboardInterrupt)."""


def fail_on(monkeypatch, name, when=lambda *args: True):
    """Make os.NAME raise Crash (when WHEN(*args) holds)."""
    real = getattr(os, name)

    def crashing(*args, **kwargs):
        if when(*args):
            raise Crash(name)
        return real(*args, **kwargs)
    monkeypatch.setattr(os, name, crashing)


class HalfWriter:
    """A file object that writes half of what it is given, then crashes."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, data):
        self.stream.write(data[:len(data) // 2])
        self.stream.flush()
        raise Crash("write")

    def __getattr__(self, name):
        return getattr(self.stream, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stream.close()


@pytest.mark.parametrize("point", ["write", "fsync", "replace"])
def test_atomic_write_crash_keeps_previous_content(tmp_path, monkeypatch, point):
    """A crash while writing, syncing or renaming leaves the previous file byte for byte and no temp file."""
    target = tmp_path / "view.json"
    target.write_bytes(b"previous")
    if point == "write":
        real_fdopen = os.fdopen
        monkeypatch.setattr(os, "fdopen", lambda *a, **k: HalfWriter(real_fdopen(*a, **k)))
    else:
        fail_on(monkeypatch, point)
    with pytest.raises(Crash):
        ctxagent.atomic_write(str(target), b"new content " * 1000)
    monkeypatch.undo()
    assert target.read_bytes() == b"previous"
    assert os.listdir(str(tmp_path)) == ["view.json"]


def test_process_killed_before_rename_keeps_previous_content(tmp_path):
    """An agent killed (SIGKILL) between writing the temp file and renaming it leaves the target intact."""
    target = tmp_path / "node.json"
    target.write_bytes(b"previous")
    code = ("import os, signal, sys; sys.path.insert(0, %r); import ctxagent\n"
            "os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)\n"
            "ctxagent.atomic_write(%r, b'new')\n" % (ROOT, str(target)))
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == -9
    assert target.read_bytes() == b"previous"
    leftovers = [n for n in os.listdir(str(tmp_path)) if n != "node.json"]
    assert all(n.startswith(".node.json.") and n.endswith(".tmp") for n in leftovers), leftovers


@pytest.mark.parametrize("victim", ["view.json", "data/gridmap/0", "hosts", "known_hosts"])
def test_apply_view_crash_keeps_previous_files(site, monkeypatch, victim):
    """A crash renaming view.json, a data file, hosts or known_hosts leaves that file as the last run left it."""
    paths = site[1]
    ctxagent.apply_view(complete_view(), CID, NID, paths, 10)
    files = {"view.json": os.path.join(paths.state_dir, "view.json"), "hosts": paths.hosts_file,
             "known_hosts": paths.known_hosts_file,
             "data/gridmap/0": os.path.join(paths.state_dir, "data", "gridmap", "0")}
    with open(files[victim], "rb") as f:
        previous = f.read()
    changed = complete_view()
    changed["data"]["gridmap"][0]["b64"] = base64.b64encode(b"changed\n").decode()
    changed["all_identities"][0].update(ip="10.1.0.9")
    changed["roles"]["torquemaster"]["providers"][0].update(ip="10.1.0.9")
    changed["revision"] = 3
    fail_on(monkeypatch, "replace", lambda src, dst, *rest: dst == files[victim])
    with pytest.raises(Crash):
        ctxagent.apply_view(changed, CID, NID, paths, 10)
    monkeypatch.undo()
    with open(files[victim], "rb") as f:
        assert f.read() == previous
    assert not [n for n in os.listdir(os.path.dirname(files[victim])) if n.endswith(".tmp")]


def test_crash_writing_node_credential_keeps_the_previous_one(site, broker, tls, monkeypatch):
    """A crash renaming a new node.json over the saved one (of another group) leaves the saved one."""
    tmp_path, paths = site
    b = broker()
    node_json = os.path.join(paths.state_dir, "node.json")
    saved = json.dumps({"url": b.url, "context_id": CID, "group": "head", "node_id": HEAD_ID,
                        "node_token": "ctxd_node_" + "o" * 43}).encode()
    with open(node_json, "wb") as f:
        f.write(saved)
    fail_on(monkeypatch, "replace", lambda src, dst, *rest: dst == node_json)
    with pytest.raises(Crash):
        run_agent(tmp_path, paths, b, tls)
    monkeypatch.undo()
    with open(node_json, "rb") as f:
        assert f.read() == saved


def test_crash_creating_instance_key_leaves_none_then_one_is_made(tmp_path, monkeypatch):
    """A crash creating the instance key leaves no key and no temp file; the next run makes one, never rewritten."""
    options = ctxagent.parse_args(["--bootstrap", "x", "--state-dir", str(tmp_path)])
    fail_on(monkeypatch, "link")
    with pytest.raises(Crash):
        ctxagent.Agent(options, ctxagent.Redactor(), None).instance_key()
    monkeypatch.undo()
    assert os.listdir(str(tmp_path)) == []
    key = ctxagent.Agent(options, ctxagent.Redactor(), None).instance_key()
    fail_on(monkeypatch, "replace")
    assert ctxagent.Agent(options, ctxagent.Redactor(), None).instance_key() == key


def test_agent_writes_files_only_through_atomic_write():
    """Every file-writing call in ctxagent.py is in atomic_write or a documented append/output/lock write."""
    # atomic_write: temp file in the same directory, fsync, rename (or link, exclusive). The
    # others never replace content: RunLog.open_file appends the log, run_script truncates
    # script.out for each script's output, Agent.run opens the empty lock file.
    import ast
    with open(os.path.join(ROOT, "ctxagent.py")) as f:
        tree = ast.parse(f.read())
    writers = set()
    for function in ast.walk(tree):
        if not isinstance(function, ast.FunctionDef):
            continue
        for node in ast.walk(function):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            text = ast.unparse(node)
            if name in ("os.open", "open", "os.fdopen", "io.open", "tempfile.mkstemp", "os.mkfifo") and (
                    re.search(r"O_WRONLY|O_RDWR|O_CREAT|'[wax]b?'|\"[wax]b?\"|mkstemp", text)):
                writers.add(function.name)
            if name in ("os.replace", "os.rename", "os.link", "shutil.copy", "shutil.move", "os.truncate"):
                writers.add(function.name)
    # unpack_scripts renames its private temporary tree into place (each file in it went
    # through atomic_write), below the agent's own state directory.
    assert writers == {"atomic_write", "open_file", "run_script", "run", "unpack_scripts"}, writers


def test_in_place_rewrite_only_for_a_busy_system_file(site, monkeypatch):
    """EBUSY on view.json keeps the old file and fails; only a busy (bind-mounted) hosts file is rewritten in place."""
    import errno
    paths = site[1]
    view_json = os.path.join(paths.state_dir, "view.json")
    with open(view_json, "w") as f:
        f.write("previous")
    real_replace = os.replace

    def busy(targets):
        def replace(src, dst, *rest):
            if dst in targets:
                raise OSError(errno.EBUSY, "Device or resource busy")
            return real_replace(src, dst, *rest)
        return replace
    monkeypatch.setattr(os, "replace", busy({view_json}))
    with pytest.raises(ctxagent.ActionError):
        ctxagent.apply_view(complete_view(), CID, NID, paths, 10)
    with open(view_json) as f:
        assert f.read() == "previous"
    inode = os.stat(paths.hosts_file).st_ino
    monkeypatch.setattr(os, "replace", busy({paths.hosts_file}))
    ctxagent.apply_view(complete_view(), CID, NID, paths, 10)
    assert os.stat(paths.hosts_file).st_ino == inode
    with open(paths.hosts_file) as f:
        assert "10.1.0.1 node-1.cluster.example.org node-1\n" in f.read()
