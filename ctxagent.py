#!/usr/bin/env python3
"""ctxagent: the on-VM agent of ctxd, the contextualization broker.

One file, standard library only, Python 3.6+. It enrolls this VM with the
broker named in its bootstrap, long-polls its view of the cluster until it is
complete, then writes managed blocks into the hosts and known_hosts files and
runs the ctx-scripts (the layout of the original Nimbus ctx-agent).

Usage: python3 ctxagent.py --bootstrap SOURCE [--scripts-dir DIR]
           [--state-dir DIR] [--timeout SECONDS] ...  (see --help)

SOURCE is a file, an http(s):// URL, "ec2" (user-data through IMDSv2) or
"cloud-init" (the user-data cloud-init saved). It holds the bootstrap JSON,
or user-data with a line "# ctxd-bootstrap: " + base64 of it; either may be
gzipped. No bootstrap at all (no user-data, or JSON without "ctxd_bootstrap"):
exit 0; a FILE that is not there: exit 2.

While the first run waits for a complete view, why it waits goes to the broker
(a contextualizing report, "waiting: " + the view's waiting_for joined by
"; "): once it has waited WAIT_REPORT_AFTER s, then when the reason changes,
at most every WAIT_REPORT_EVERY s. Advisory: a failure is logged.

Scripts (optional; argv lists, never a shell; all input validated first):
clean.sh; 0-etchosts.sh IP SHORT FQDN per identity; 1-ipandhost/ROLE IP SHORT
FQDN per (required role, provider); 2-thishost/IFACE IP SHORT FQDN per own
interface; 3-data/NAME PATH per data value; 4-restarts/ROLE per role;
5-thishost-finalize/IFACE IP SHORT FQDN; problem.sh when an action failed.
Each from --scripts-dir where it is there, else from the tree the view
delivers ("scripts": {sha256, size}): fetched once, checked against both, a
gzip'd tar of regular files and directories with relative names only (else
exit 1, nothing run), unpacked into STATE/scripts/SHA256 (0700).
Their environment adds CTX_VIEW (path of the view as JSON), CTX_CONTEXT_ID,
CTX_NODE_ID (and, for problem.sh, CTX_EXIT_CODE and CTX_ERROR); with host
certificates, CTX_TLS_KEY, CTX_TLS_CERT, CTX_TLS_BUNDLE, CTX_TLS_CA_DIR (when
the view has a ca_dir) and CTX_SSH_CERTS (paths joined by ":").

Host certificates (when the view opts in; before any script, and in watch mode
again two thirds into their validity): a key made by the openssl command (argv,
never a shell) for this node (KEY.ctxd-node names it: an image's key is never
reused) stays here; the broker signs a request for this node's vetted names.
Installed at the view's paths, 0644: the certificate (leaf, then chain), the CA
bundle, and in ca_dir each CA as ctxd-CID-N.pem with its HASH.N symlink (any
other context's such files and links removed); SSH certificates as ssh_host_TYPE_key-cert.pub beside the host keys,
and with sshd = true, HostCertificate lines in --sshd-config-dir's
ctxd-host-certificates.conf and an sshd reload through systemctl.

Exit codes:
    0   success, no bootstrap present, or another run holds STATE/lock
    1   bad input: corrupt bootstrap, invalid or hostile view or scripts tree
    2   usage or configuration error (bad arguments, missing bootstrap file,
        unusable scripts dir, a script that is present but not executable)
    3   environment: no network, broker unreachable, TLS verification failed,
        no openssl command (or it failed) for the host certificates
    4   an action failed (a script exited non-zero or timed out)
    5   timed out waiting for a complete view
    6   the broker refused us (join token expired or used up, context deleted,
        this node departed), or this node's host certificates (403, 409:
        then reported)
    42  programming error (an assertion failed)
    97  uncaught exception

Files, each written to a temp file then renamed; STATE (--state-dir) is 0700:
STATE/ctxagent.log (appended), STATE/instance_key, STATE/node.json (the node
credential), STATE/view.json, STATE/data/NAME/N (value N from 0), STATE/lock,
STATE/script.out (the output of the last script), all 0600;
and between "# BEGIN ctxd (context CID)" and "# END ctxd (context CID)"
(another context's such block removed), the rest kept byte for byte:
"IP FQDN SHORT" lines in --hosts-file,
"FQDN,SHORT,IP TYPE KEY" lines in --known-hosts-file (with an SSH CA in the
view: its "@cert-authority PATTERN KEY" line first, and none for the peers of
the groups it certifies). Tokens never reach
the log, stdout/stderr or an error report.
"""

import argparse
import base64
import binascii
import collections
import errno
import fcntl
import glob
import hashlib
import http.client
import io
import ipaddress
import json
import logging
import os
import random
import re
import secrets
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib

__version__ = "0.1.0"

EXIT_OK, EXIT_INPUT, EXIT_CONFIG, EXIT_ENVIRONMENT = 0, 1, 2, 3
EXIT_ACTION, EXIT_INCOMPLETE, EXIT_REFUSED, EXIT_BUG, EXIT_UNCAUGHT = 4, 5, 6, 42, 97

MAX_BOOTSTRAP = 1 << 20
MAX_REPLY = 256 << 20
TAIL = 65536                  # captured script output, in characters
REQUEST_TIMEOUT = 30.0
RETRY_FIRST, RETRY_MAX = 0.25, 30.0   # backoff after a failed request: from a fraction of a second
ERROR_REPORT_TIMEOUT = 5.0    # an error report is one short attempt
# Why a first run waits reaches the broker (an advisory report) once it has waited this long, then
# when the reason changes, at most this often: a cluster that completes at once costs no request.
WAIT_REPORT_AFTER, WAIT_REPORT_EVERY = 10.0, 30.0
FINAL_REPORT_BUDGET = 120.0   # the ok report may outlive --timeout by this much
REFUSED = (401, 403, 404, 409, 410)
IMDS = "http://169.254.169.254/latest/"

MARKER = re.compile(r"^[ \t]*#[ \t]*ctxd-bootstrap:(.*)$", re.M)

# What the broker accepts (ctxd/rules.py), copied so this file needs nothing else;
# tests/test_rules.py checks that both say the same. Matched whole (fullmatch).
# Names start with a letter or digit, so "." and ".." can never match.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
ID = re.compile(r"[A-Za-z0-9_-]{22}")
LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
MAX_FQDN = 253
IFACE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@-]{0,15}")
MAX_INTERFACES, MAX_ADDRESSES = 64, 64
SSH_KEY_TYPES = ("ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521",
                 "sk-ssh-ed25519@openssh.com", "sk-ecdsa-sha2-nistp256@openssh.com")
SSH_KEY_B64 = re.compile(r"[A-Za-z0-9+/]+={0,2}")
MAX_SSH_KEY, MAX_SSH_KEYS = 4096, 16
MAX_MESSAGE, MAX_LOG_TAIL, MAX_WAIT = 4096, 65536, 300
MIN_LEASE, MAX_LEASE = 10, 2592000
# A context's ctx-scripts tree: packed (gzip'd tar) bytes; unpacked bytes and entries.
MAX_SCRIPTS, MAX_SCRIPTS_UNPACKED, MAX_SCRIPT_FILES = 512 << 10, 16 << 20, 1024
SHA256 = re.compile(r"[0-9a-f]{64}")
# How long a view request waits at the broker for a change, by default: an idle node costs
# the broker one request per POLL_WAIT. A broker older than 0.2 allows at most OLD_MAX_WAIT.
POLL_WAIT, OLD_MAX_WAIT = 120, 60
# TCP keepalive on the broker connection (idle s, interval s, probes): a broker host that
# vanished (or a standby that took its address) is noticed within about 35 s even while a
# long-poll waits; the probes are the kernels' work, not the broker's.
KEEPALIVE = (20, 5, 3)

SECRET = re.compile(r"[A-Za-z0-9_-]{16,128}")   # tokens and the instance key
TOKEN = re.compile(r"ctxd_(join|node|adm)_[A-Za-z0-9_-]*")
PATH = re.compile(r"/[^\x00\r\n]{0,4095}")
PEM = re.compile(r"-----BEGIN CERTIFICATE-----\r?\n[A-Za-z0-9+/=\r\n]+-----END CERTIFICATE-----")
# A credentials request answered 429 is asked again after its Retry-After (at most MAX_RETRY_AFTER s;
# RATE_LIMIT_PAUSE s without one), at most RATE_LIMITED_RETRIES times: the broker issues one a minute.
MAX_RETRY_AFTER, RATE_LIMIT_PAUSE, RATE_LIMITED_RETRIES = 120, 60, 3
RENEW_RETRY = 60   # s: a renewal that failed (or came too early) is tried again after this, then twice as long...

LOG = logging.getLogger("ctxagent")


class AgentError(Exception):
    """A failure with a documented exit code; the message is safe to log."""
    exit_code = EXIT_UNCAUGHT


class InputError(AgentError):
    """Corrupt bootstrap, invalid or hostile view or broker reply."""
    exit_code = EXIT_INPUT


class ConfigError(AgentError):
    exit_code = EXIT_CONFIG


class EnvironmentFailure(AgentError):
    """No network, broker unreachable, TLS verification failure."""
    exit_code = EXIT_ENVIRONMENT


class ActionError(AgentError):
    exit_code = EXIT_ACTION


class IncompleteError(AgentError):
    exit_code = EXIT_INCOMPLETE


class RefusedError(AgentError):
    exit_code = EXIT_REFUSED
    credential_works = False   # so no error report can go


class CredentialsRefused(RefusedError):
    """The broker refused this node's host certificates (403, 409): its node credential still works."""
    credential_works = True


def retry_after(value):
    """The seconds a Retry-After header VALUE asks for, 1 to MAX_RETRY_AFTER (RATE_LIMIT_PAUSE without a number)."""
    try:
        return min(max(int(value), 1), MAX_RETRY_AFTER)
    except (TypeError, ValueError):
        return RATE_LIMIT_PAUSE


def exit_code_for(exc):
    if isinstance(exc, AgentError):
        return exc.exit_code
    return EXIT_BUG if isinstance(exc, AssertionError) else EXIT_UNCAUGHT


def _show(value, limit=80):
    """A bounded repr of an untrusted value: no raw control characters reach the log."""
    text = repr(value)
    return text if len(text) <= limit else "%s...(%d chars)" % (text[:limit], len(text))


# ---------------------------------------------------------------------------
# Validation (pure): each check returns the value, normalized, or raises
# InputError naming WHAT was wrong.

def _check(value, pattern, what, kind):
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise InputError("%s: invalid %s %s" % (what, kind, _show(value)))
    return value


def check_name(value, what):
    """A role, data or group name."""
    return _check(value, NAME, what, "name")


def check_id(value, what):
    return _check(value, ID, what, "id")


def check_hostname(value, what):
    """A short host name: one RFC 1123 label."""
    return _check(value, LABEL, what, "host name")


def check_interface_name(value, what):
    return _check(value, IFACE, what, "interface name")


def check_ssh_key(value, what):
    """"TYPE BASE64" of a known type, without comment."""
    kind, _, key = value.partition(" ") if isinstance(value, str) and len(value) <= MAX_SSH_KEY else ("", "", "")
    if kind not in SSH_KEY_TYPES or not SSH_KEY_B64.fullmatch(key):
        raise InputError("%s: invalid SSH host key %s" % (what, _show(value)))
    return value


def check_fqdn(value, what):
    """Dotted RFC 1123 labels, at most 253 characters, the last not all digits (an address)."""
    if not (isinstance(value, str) and 0 < len(value) <= MAX_FQDN):
        raise InputError("%s: invalid FQDN %s" % (what, _show(value)))
    labels = value.split(".")
    if labels[-1].isdigit() or not all(LABEL.fullmatch(label) for label in labels):
        raise InputError("%s: invalid FQDN %s" % (what, _show(value)))
    return value


def _is_ip(text):
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def check_ip(value, what):
    """An IP address without scope id (which Python 3.9+ would accept); canonical form."""
    if not isinstance(value, str) or "%" in value or len(value) > 45 or not _is_ip(value):
        raise InputError("%s: invalid IP address %s" % (what, _show(value)))
    return str(ipaddress.ip_address(value))


def _expect(value, kind, what, limit=None):
    # bool is an int: a revision of `true` is no revision.
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        raise InputError("%s: expected %s, got %s" % (what, kind.__name__, _show(value)))
    if limit is not None and len(value) > limit:
        raise InputError("%s: more than %d items" % (what, limit))
    return value


def _b64decode(text, what):
    """Standard or URL-safe base64, padding optional."""
    _expect(text, str, what)
    try:
        return base64.b64decode((text + "=" * (-len(text) % 4)).encode("ascii"),
                                b"-_" if "-" in text or "_" in text else None, True)
    except (binascii.Error, ValueError):
        raise InputError("%s: invalid base64" % what)


# ---------------------------------------------------------------------------
# Bootstrap (pure)

def make_tls_context(ca_pem):
    """Trust only CA_PEM, check host names, TLS 1.2 at least."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.verify_mode = ssl.CERT_REQUIRED
    context.check_hostname = True
    if hasattr(ssl, "TLSVersion"):
        context.minimum_version = ssl.TLSVersion.TLSv1_2  # novermin (guarded)
    else:
        context.options |= ssl.OP_NO_TLSv1 | ssl.OP_NO_TLSv1_1
    context.load_verify_locations(cadata=ca_pem)
    return context


def _gunzip(data, limit=MAX_BOOTSTRAP, what="bootstrap"):
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = inflater.decompress(data, limit + 1)
    except zlib.error as exc:
        raise InputError("%s: corrupt gzip data (%s)" % (what, exc))
    if len(out) > limit or not inflater.eof:
        raise InputError("%s: gzip data too large or truncated" % what)
    return out


def _is_broker_url(url):
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port   # ValueError when not a number or out of range
    except (ValueError, TypeError, AttributeError):
        return False
    return (parts.scheme == "https" and bool(parts.hostname) and port != 0
            and not (parts.query or parts.fragment or parts.username or parts.password))


def validate_bootstrap(obj):
    """OBJ if it is a valid bootstrap, else InputError naming the field."""
    _expect(obj, dict, "bootstrap")
    if obj.get("ctxd_bootstrap") != 1 or isinstance(obj.get("ctxd_bootstrap"), bool):
        raise InputError("bootstrap: ctxd_bootstrap must be 1")
    if not _is_broker_url(obj.get("url")):
        raise InputError("bootstrap.url: not https://HOST[:PORT][/PATH]: %s" % _show(obj.get("url")))
    check_id(obj.get("context_id"), "bootstrap.context_id")
    check_name(obj.get("group"), "bootstrap.group")
    token = obj.get("join_token")
    if not (isinstance(token, str) and token.startswith("ctxd_join_") and SECRET.fullmatch(token)):
        raise InputError("bootstrap.join_token: not a join token")
    ca_pem = obj.get("ca_pem")
    try:
        if "-----BEGIN CERTIFICATE-----" not in ca_pem:
            raise ValueError("no PEM certificate")
        make_tls_context(ca_pem)
    except (ssl.SSLError, ValueError, TypeError) as exc:
        raise InputError("bootstrap.ca_pem: unusable (%s)" % exc)
    return obj


def parse_bootstrap(content):
    """The validated bootstrap in CONTENT (bytes), None if there is none.

    None for no content, an empty one, a document without the marker line
    or a JSON object without "ctxd_bootstrap"; InputError for a corrupt one.
    """
    if content is None:
        return None
    if len(content) > MAX_BOOTSTRAP:
        raise InputError("bootstrap: more than %d bytes" % MAX_BOOTSTRAP)
    if content[:2] == b"\x1f\x8b":
        content = _gunzip(content)
    text = content.decode("utf-8", "replace").strip()
    marked = text[:1] not in ("{", "[")
    if marked:
        match = MARKER.search(text)
        if match is None:
            return None
        payload = _b64decode(match.group(1).strip(), "bootstrap marker line")
        if payload[:2] == b"\x1f\x8b":
            payload = _gunzip(payload)
        text = payload.decode("utf-8", "replace")
    try:
        obj = json.loads(text)
    except ValueError as exc:
        raise InputError("bootstrap: invalid JSON (%s)" % exc)
    # Other JSON user-data (an Ignition config...) is not ours.
    if not marked and isinstance(obj, dict) and "ctxd_bootstrap" not in obj:
        return None
    return validate_bootstrap(obj)


# ---------------------------------------------------------------------------
# Identity and view (pure)

Interface = collections.namedtuple("Interface", "name ipv4 ipv6")
Identity = collections.namedtuple("Identity", "hostname fqdn primary_ip interfaces ssh_host_keys")
Peer = collections.namedtuple("Peer", "node_id hostname fqdn ip ssh_host_keys group")
NodeView = collections.namedtuple("NodeView", "context_id node_id revision complete identity roles data "
                                  "all_identities certificate ssh_certificate ssh_ca scripts")
# What the view says of host certificates: where the X.509 files go (ca_dir may be None) and which
# names, in order, they carry; the SSH CA that certifies the host keys of the nodes of its groups.
Certificate = collections.namedtuple("Certificate", "names key certificate bundle ca_dir")
SshCa = collections.namedtuple("SshCa", "public_key pattern groups")
CERT_NAMES = {"fqdn": "fqdn", "hostname": "hostname", "ip": "primary_ip"}   # name -> Identity field


def _items(obj, key, what, check, limit=None):
    """The checked items of the list OBJ[KEY] (default empty), as a tuple."""
    where = "%s.%s" % (what, key)
    items = _expect(obj.get(key, []), list, where, limit)
    return tuple(check(item, "%s[%d]" % (where, i)) for i, item in enumerate(items))


def _interface(obj, what):
    _expect(obj, dict, what)
    return Interface(check_interface_name(obj.get("name"), what + ".name"),
                     _items(obj, "ipv4", what, check_ip, MAX_ADDRESSES),
                     _items(obj, "ipv6", what, check_ip, MAX_ADDRESSES))


def validate_identity(obj, what="identity"):
    """An Identity tuple from an Identity object (docs/api.md)."""
    _expect(obj, dict, what)
    return Identity(check_hostname(obj.get("hostname"), what + ".hostname"),
                    check_fqdn(obj.get("fqdn"), what + ".fqdn"),
                    check_ip(obj.get("primary_ip"), what + ".primary_ip"),
                    _items(obj, "interfaces", what, _interface, MAX_INTERFACES),
                    _items(obj, "ssh_host_keys", what, check_ssh_key, MAX_SSH_KEYS))


def validate_peer(obj, what):
    """A Peer tuple from a ProviderIdentity object."""
    _expect(obj, dict, what)
    return Peer(check_id(obj.get("node_id"), what + ".node_id"),
                check_hostname(obj.get("hostname"), what + ".hostname"),
                check_fqdn(obj.get("fqdn"), what + ".fqdn"),
                check_ip(obj.get("ip"), what + ".ip"),
                _items(obj, "ssh_host_keys", what, check_ssh_key, MAX_SSH_KEYS),
                check_name(obj["group"], what + ".group") if "group" in obj else "")


def view_progress(raw, what="view"):
    """(revision, complete, waiting_for) of a view (WHAT names it in errors): what polling needs."""
    _expect(raw, dict, what)
    lease = raw.get("lease")
    if lease is not None and not MIN_LEASE <= _expect(lease, int, what + ".lease") <= MAX_LEASE:
        raise InputError("%s.lease: %s is not %d to %d s" % (what, lease, MIN_LEASE, MAX_LEASE))
    return (_expect(raw.get("revision"), int, what + ".revision"),
            _expect(raw.get("complete"), bool, what + ".complete"),
            tuple(w if isinstance(w, str) and len(w) <= 200 and w.isprintable() else _show(w, 200)
                  for w in _expect(raw.get("waiting_for", []), list, what + ".waiting_for")))


def reply_progress(reply, what):
    """view_progress() of the view_progress in an enrollment's or identity update's REPLY (a dict),
    None if it has none (an older broker)."""
    progress = reply.get("view_progress")
    return None if progress is None else view_progress(progress, what + ".view_progress")


def _by_name(raw, key, check):
    """[(name, check(value, where))] of the object RAW[KEY], names checked, sorted."""
    table = _expect(raw.get(key, {}), dict, "view." + key)
    for name in table:
        check_name(name, "view." + key)
    return tuple((name, check(table[name], "view.%s[%s]" % (key, name))) for name in sorted(table))


def _providers(role, what):
    return _items(_expect(role, dict, what), "providers", what, validate_peer)


def _values(values, what):
    _expect(values, list, what)
    return tuple(_b64decode(_expect(v, dict, what).get("b64"), "%s[%d].b64" % (what, i))
                 for i, v in enumerate(values))


def check_path(value, what):
    """An absolute path without a ".." part, NUL or line break."""
    if ".." in _check(value, PATH, what, "path").split("/"):
        raise InputError("%s: invalid path %s" % (what, _show(value)))
    return value


def _certificate(spec, what):
    _expect(spec, dict, what)
    names = _expect(spec.get("names"), list, what + ".names")
    if not names or not all(isinstance(n, str) and n in CERT_NAMES for n in names):
        raise InputError("%s.names: not some of %s: %s" % (what, "/".join(sorted(CERT_NAMES)), _show(names)))
    paths = [check_path(spec.get(k), "%s.%s" % (what, k)) for k in ("key", "certificate", "bundle")]
    if len(set(paths)) < 3:
        raise InputError("%s: key, certificate and bundle must be three files" % what)
    ca_dir = spec.get("ca_dir")
    return Certificate(tuple(names), *paths, ca_dir=ca_dir and check_path(ca_dir, what + ".ca_dir"))


def _ssh_certificate(spec, what):
    """Whether sshd is to present the certificates."""
    return _expect(_expect(spec, dict, what).get("sshd", False), bool, what + ".sshd")


def _ssh_ca(ca, what):
    pattern = _expect(ca, dict, what).get("pattern")
    if pattern != "*":
        check_fqdn(pattern[2:] if str(pattern).startswith("*.") else None, what + ".pattern")
    return SshCa(check_ssh_key(ca.get("public_key"), what + ".public_key"), pattern,
                 _items(ca, "groups", what, check_name))


def _scripts(spec, what):
    """(SHA-256, size) of the ctx-scripts tree the view announces."""
    digest, size = _expect(spec, dict, what).get("sha256"), spec.get("size")
    if not (isinstance(digest, str) and SHA256.fullmatch(digest) and type(size) is int and 0 < size <= MAX_SCRIPTS):
        raise InputError("%s: not {sha256, size} of at most %d bytes: %s" % (what, MAX_SCRIPTS, _show(spec)))
    return digest, size


def validate_view(raw, context_id, node_id):
    """A NodeView (roles and data sorted by name) from a raw view.

    Everything that can reach a file, a path or a script argument is checked
    here, so a hostile view is refused before anything is touched.
    """
    revision, complete, _ = view_progress(raw)
    for key, expected in (("context_id", context_id), ("node_id", node_id)):
        if raw.get(key) != expected:
            raise InputError("view.%s: %s is not ours" % (key, _show(raw.get(key))))
    everyone = {"all_identities": raw.get("all_identities") or []}
    view = NodeView(context_id, node_id, revision, complete,
                    validate_identity(raw.get("self"), "view.self"),
                    _by_name(raw, "roles", _providers), _by_name(raw, "data", _values),
                    _items(everyone, "all_identities", "view", validate_peer),
                    *(None if raw.get(key) is None else check(raw[key], "view." + key) for key, check in (
                        ("certificate", _certificate), ("ssh_certificate", _ssh_certificate), ("ssh_ca", _ssh_ca),
                        ("scripts", _scripts))))
    check_no_conflicts(view)
    return view


def check_no_conflicts(view):
    """InputError when two nodes of VIEW claim the same name, primary address or host key.

    The broker refuses such claims; this is defense in depth, so that a broker bug or an
    old journal never makes us trust one node's key for another's name.
    """
    owners = {}
    for peer in (_me(view),) + _others(view):
        claims = [("name", peer.hostname.lower()), ("name", peer.fqdn.lower()), ("primary address", peer.ip)]
        for kind, value in claims + [("ssh host key", key) for key in peer.ssh_host_keys]:
            holder = owners.setdefault((kind, value), peer.node_id)
            if holder != peer.node_id:
                raise InputError("view: nodes %s and %s both claim the %s %s"
                                 % (holder, peer.node_id, kind, _show(value, 60)))


# ---------------------------------------------------------------------------
# Plan (pure)

Action = collections.namedtuple("Action", "kind target args content")
SCRIPT = "script"   # target: path relative to the scripts dir; args: argv tail
BLOCK = "block"     # target: "hosts" or "known_hosts"; args: the block's lines
FILE = "file"       # target: path below the state dir; content: bytes (0600)


def script_action(target, *args):
    return Action(SCRIPT, target, args, None)


def _dedupe(peers):
    """PEERS, each node once (the first time)."""
    seen = set()
    result = []
    for p in peers:
        if p.node_id not in seen:
            seen.add(p.node_id)
            result.append(p)
    return tuple(result)


def _others(view):
    """Providers of every required role (by role name), then all_identities."""
    return _dedupe(sum((providers for _, providers in view.roles), ()) + view.all_identities)


def _me(view):
    me = view.identity
    return Peer(view.node_id, me.hostname, me.fqdn, me.primary_ip, me.ssh_host_keys, "")


def peers_of(view):
    """Every identity in the view, this node first, once each."""
    return _dedupe((_me(view),) + _others(view))


def _this_host(view, phase):
    """PHASE/IFACE IP SHORT FQDN per interface: its first IPv4, else first IPv6."""
    me = view.identity
    return [script_action(phase + i.name, (i.ipv4 + i.ipv6)[0], me.hostname, me.fqdn)
            for i in me.interfaces if i.ipv4 or i.ipv6]


def _blocks(view):
    """The hosts and known_hosts managed blocks for VIEW: with an SSH CA, its line first and no
    line for the keys it certifies."""
    ca = view.ssh_ca
    known_hosts = ["@cert-authority %s %s" % (ca.pattern, ca.public_key)] if ca else []
    for p in _others(view):
        for key in () if ca and p.group in ca.groups else p.ssh_host_keys:
            line = "%s,%s,%s %s" % (p.fqdn, p.hostname, p.ip, key)
            if line not in known_hosts:
                known_hosts.append(line)
    return [Action(BLOCK, "hosts", tuple("%s %s %s" % (p.ip, p.fqdn, p.hostname) for p in peers_of(view)), None),
            Action(BLOCK, "known_hosts", tuple(known_hosts), None)]


def plan_actions(view, state_dir):
    """The ordered list of Actions for a validated NodeView (the initial run)."""
    plan = [script_action("clean.sh")] + _blocks(view)
    plan += [script_action("0-etchosts.sh", p.ip, p.hostname, p.fqdn) for p in peers_of(view)]
    plan += [script_action("1-ipandhost/" + role, p.ip, p.hostname, p.fqdn)
             for role, providers in view.roles for p in providers]
    plan += _this_host(view, "2-thishost/")
    for name, values in view.data:
        for index, value in enumerate(values):
            path = os.path.join(state_dir, "data", name, str(index))
            plan += [Action(FILE, path, (), value), script_action("3-data/" + name, path)]
    plan += [script_action("4-restarts/" + role) for role, _ in view.roles]
    return plan + _this_host(view, "5-thishost-finalize/")


def _listings(view):
    """{(ROLE, node id): Peer} of every provider in VIEW, and ("", node id) of every identity."""
    out = dict((("", p.node_id), p) for p in peers_of(view))
    for role, providers in view.roles:
        out.update(((role, p.node_id), p) for p in providers)
    return out


def plan_change(old, new):
    """(Actions, joined, departed) that take this node from NodeView OLD to NEW (watch mode):
    the blocks, 6-departed/ROLE per provider gone (a changed one: with its old values), 0-etchosts.sh
    per identity and 1-ipandhost/ROLE per provider come, 4-restarts/ROLE per role concerned."""
    before, after = _listings(old), _listings(new)
    gone = [k for k in before if after.get(k) != before[k]]
    came = [k for k in after if before.get(k) != after[k]]
    plan = _blocks(new)
    if not gone and not came:
        return ([] if plan == _blocks(old) else plan), [], []
    plan += [script_action("6-departed/" + r, before[r, n].ip, before[r, n].hostname, before[r, n].fqdn)
             for r, n in gone if r]
    for r, n in came:
        p = after[r, n]
        plan.append(script_action("1-ipandhost/" + r if r else "0-etchosts.sh", p.ip, p.hostname, p.fqdn))
    plan.sort(key=lambda a: a.target.startswith("1-"))   # (stable) every 0-etchosts.sh first
    plan += [script_action("4-restarts/" + r) for r in sorted(set(r for r, _ in gone + came if r))]
    return plan, [after[k] for k in came if not k[0]], [before[k] for k in gone if not k[0]]


def merge_delta(held, delta):
    """The full raw view: HELD (a full view) with DELTA (what changed since it) applied."""
    for key in ("context_id", "node_id"):
        if delta.get(key) != held.get(key):
            raise InputError("view delta.%s: %s is not ours" % (key, _show(delta.get(key))))
    peers = [_expect(p, dict, "view delta.peers[]") for p in _expect(delta.get("peers"), list, "view delta.peers")]
    gone = set(check_id(n, "view delta.departed[]") for n in _expect(delta.get("departed"), list, "view delta.departed"))
    gone.update(check_id(p.get("node_id"), "view delta.peers[].node_id") for p in peers)
    view = dict(held, roles={}, all_identities=[p for p in held.get("all_identities") or [] if p["node_id"] not in gone])
    for key in ("revision", "complete", "waiting_for", "state", "self", "locked", "lease"):
        view[key] = delta.get(key)
    counts = _expect(delta.get("roles", {}), dict, "view delta.roles")
    for name, role in held["roles"].items():
        role = view["roles"][name] = dict(role, **_expect(counts.get(name, {}), dict, "view delta.roles[]"))
        role["providers"] = [p for p in held["roles"][name]["providers"] if p["node_id"] not in gone]
    for p in peers:
        entry = dict((k, v) for k, v in p.items() if k not in ("roles", "all"))
        for name in _expect(p.get("roles"), list, "view delta.peers[].roles"):
            if check_name(name, "view delta.peers[].roles[]") not in view["roles"]:
                raise InputError("view delta: role %s is not in the view" % _show(name))
            view["roles"][name]["providers"].append(entry)
        if p.get("all") is True:
            view["all_identities"].append(entry)
    return view


def replace_managed_block(text, context_id, lines):
    """TEXT with the block of CONTEXT_ID replaced by LINES (none: removed).

    The block runs from "# BEGIN ctxd (context CID)" to "# END ctxd (context CID)".
    The first block of the context is replaced in place and any later copy is
    dropped; without one the block is appended; all else is kept as is.
    ValueError for a BEGIN without its END or an END without its BEGIN.
    (ctxctl has the same function; tests/test_managed_block.py checks both.)
    """
    begin, end = ("# %s ctxd (context %s)" % (word, context_id) for word in ("BEGIN", "END"))
    kept, at, inside = [], None, False
    for line in text.splitlines(True):
        marker = line.rstrip("\r\n")
        if marker == (end if inside else begin):
            if not inside and at is None:
                at = len(kept)
            inside = not inside
        elif marker in (begin, end):
            raise ValueError("the %r ... %r lines are damaged (a BEGIN without its END, or an END "
                             "without its BEGIN)" % (begin, end))
        elif not inside:
            kept.append(line)
    if inside:
        raise ValueError("the %r line has no %r line after it" % (begin, end))
    if at is None:
        at = len(kept)
        if lines and kept and not kept[-1].endswith("\n"):
            kept[-1] += "\n"
    block = [line + "\n" for line in [begin] + list(lines) + [end]] if lines else []
    return "".join(kept[:at] + block + kept[at:])


# ---------------------------------------------------------------------------
# Files

NOFOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def atomic_write(path, data, mode=0o600, owner=None, in_place_fallback=False, exclusive=False):
    """Write DATA to PATH through a temp file in its directory, then rename.

    EXCLUSIVE links the temp file instead: FileExistsError if PATH exists.

    The temp file is created exclusively and not through a symlink, with
    MODE (and OWNER, a (uid, gid), when possible) before any byte is written.
    IN_PLACE_FALLBACK rewrites a target that cannot be renamed over because
    it is a mount point (EBUSY: a bind-mounted /etc/hosts in a container).
    """
    directory, base = os.path.split(os.path.abspath(path))
    fd, temp = tempfile.mkstemp(prefix="." + base + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as stream:
            os.fchmod(fd, mode)
            if owner is not None:
                try:
                    os.fchown(fd, *owner)
                except PermissionError:
                    pass   # not root: the file becomes ours, as with any edit of ours
            stream.write(data)
            stream.flush()
            os.fsync(fd)
        (os.link if exclusive else os.replace)(temp, path)
        if exclusive:
            os.unlink(temp)
    except BaseException as exc:
        os.unlink(temp)
        if not (in_place_fallback and getattr(exc, "errno", None) == errno.EBUSY):
            raise
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_TRUNC | NOFOLLOW), "wb") as stream:
            stream.write(data)
        return
    try:   # make the rename durable
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def read_file(path, limit, private=False):
    """The bytes of PATH (no final symlink), at most LIMIT; None if absent. PRIVATE: made 0600."""
    try:
        fd = os.open(path, os.O_RDONLY | NOFOLLOW)
    except (FileNotFoundError, NotADirectoryError):
        return None
    with os.fdopen(fd, "rb") as stream:
        if private:
            os.fchmod(fd, 0o600)
        data = stream.read(limit + 1)
    if len(data) > limit:
        raise InputError("%s: larger than %d bytes" % (path, limit))
    return data


def make_private_dir(path):
    """PATH, created if needed, made 0700; never through a symlink."""
    if not os.path.islink(path):
        os.makedirs(path, mode=0o700, exist_ok=True)
    if os.path.islink(path) or not os.path.isdir(path):
        raise ConfigError("%s is a symlink or not a directory" % path)
    os.chmod(path, 0o700)
    return path


def make_private_tree(base, path):
    """PATH below BASE, every level 0700."""
    parts = os.path.relpath(path, base).split(os.sep)
    assert parts[0] != os.pardir, (base, path)
    for part in parts:
        base = make_private_dir(os.path.join(base, part))


BLOCK_BEGIN = re.compile(r"^# BEGIN ctxd \(context ([A-Za-z0-9_-]+)\)\r?$", re.M)


def update_managed_file(path, context_id, lines):
    """Replace the context's block in the system file PATH, and remove the blocks of any
    other context (a VM is in one context: an image made from a contextualized VM, say).

    A symlink at PATH is followed (it is the administrator's); mode and owner
    are kept (0644 for a new file); an unchanged file is not rewritten.
    """
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
        old, mode, owner = read_file(real, 64 << 20), stat.S_IMODE(st.st_mode), (st.st_uid, st.st_gid)
    except FileNotFoundError:
        old, mode, owner = None, 0o644, None
    if old is None and not lines:
        return
    text = (old or b"").decode("utf-8", "surrogateescape")
    for other in set(BLOCK_BEGIN.findall(text)) - {context_id}:
        LOG.info("removing the ctxd block of context %s from %s", other, path)
        text = replace_managed_block(text, other, ())
    new = replace_managed_block(text, context_id, lines).encode("utf-8", "surrogateescape")
    if new != old:
        atomic_write(real, new, mode, None if owner == (os.getuid(), os.getgid()) else owner, True)


# ---------------------------------------------------------------------------
# Executing a plan

# delivered: the ctx-scripts tree the view delivered (STATE/scripts/SHA256), or None.
Paths = collections.namedtuple("Paths", "scripts_dir state_dir hosts_file known_hosts_file delivered")
Paths.__new__.__defaults__ = (None,)


def script_path(paths, target):
    """Where the script TARGET is: in the scripts dir if it is there (baked scripts win), else in
    the delivered tree."""
    parts = target.split("/")
    path = os.path.join(paths.scripts_dir, *parts)
    return os.path.join(paths.delivered, *parts) if paths.delivered and not os.path.lexists(path) else path


def check_scripts_dir(scripts_dir):
    """Whether SCRIPTS_DIR is there; ConfigError when it is there but unusable."""
    if os.path.isdir(scripts_dir) and os.access(scripts_dir, os.R_OK | os.X_OK):
        return True
    if os.path.exists(scripts_dir):
        raise ConfigError("scripts directory %s is unusable (not a readable directory)" % scripts_dir)
    return False


def _is_runnable(path):
    return os.path.isfile(path) and os.access(path, os.X_OK)


def resolve_scripts(plan, paths):
    """PLAN less the absent scripts; ConfigError for one that is not executable."""
    result = []
    for action in plan:
        if action.kind == SCRIPT:
            path = script_path(paths, action.target)
            if not os.path.lexists(path):
                continue
            if not _is_runnable(path):
                raise ConfigError("script %s is present but not an executable file" % path)
        result.append(action)
    return result


def run_script(paths, target, args, env, timeout):
    """Run one script (argv list, own session); ActionError if it fails.

    Its stdout and stderr go to STATE/script.out, not to pipes: a daemon it
    starts keeps them open, and must neither hold us up nor be killed once
    the script has exited.
    """
    LOG.info("running %s", " ".join((target,) + tuple(args)))
    problem = None
    try:
        fd = os.open(os.path.join(paths.state_dir, "script.out"),
                     os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC | NOFOLLOW, 0o600)
        try:
            os.fchmod(fd, 0o600)
            process = subprocess.Popen([script_path(paths, target)] + list(args),
                                       stdin=subprocess.DEVNULL, stdout=fd, stderr=fd, env=env,
                                       start_new_session=True)
            try:
                code = process.wait(timeout)
            except subprocess.TimeoutExpired:
                code = process.poll()   # reaped if it has just exited: then nothing is killed
                if code is None:
                    try:
                        os.killpg(process.pid, signal.SIGKILL)
                    except OSError:
                        process.kill()
                    code = process.wait()
                    problem = "script %s timed out after %g s" % (target, timeout)
            # Into the log, and so into the report's log_tail: the end of a
            # long output, where a failing script says why.
            out = os.pread(fd, TAIL, max(0, os.fstat(fd).st_size - TAIL))
        finally:
            os.close(fd)
    except OSError as exc:
        raise ActionError("script %s could not be started: %s" % (target, exc))
    for line in out.decode("utf-8", "replace").splitlines():
        LOG.info("  %s: %s", target, line)
    if problem is None and code:
        problem = ("script %s exited %d" % (target, code) if code > 0 else
                   "script %s was killed by signal %d" % (target, -code))
    if problem:
        LOG.error(problem)
        raise ActionError(problem)


def read_scripts(packed):
    """[(path parts, mode, content or None for a directory)] of the ctx-scripts tree PACKED (a gzip'd
    tar), checked whole: regular files and directories only, relative names without ".." parts, no
    file where a directory must be, at most MAX_SCRIPT_FILES entries and MAX_SCRIPTS_UNPACKED bytes;
    anything else is an InputError."""
    tree, total = [], 0
    try:   # inflated first, bounded (contents and their tar headers), so tarfile never inflates more
        with tarfile.open(fileobj=io.BytesIO(_gunzip(packed, 2 * MAX_SCRIPTS_UNPACKED, "scripts")), mode="r:") as tar:
            for member in tar:
                name, total, isfile = member.name, total + member.size, member.isfile()
                parts = [part for part in name.split("/") if part not in ("", ".")]
                if len(tree) >= MAX_SCRIPT_FILES or total > MAX_SCRIPTS_UNPACKED:
                    raise InputError("scripts: more than %d entries or %d bytes" % (MAX_SCRIPT_FILES, MAX_SCRIPTS_UNPACKED))
                if not (isfile and parts or member.isdir()) or name.startswith("/") or ".." in parts or not name.isprintable():
                    raise InputError("scripts: %s is not a regular file or directory with a relative name" % _show(name))
                tree.append((parts, 0o755 if member.mode & 0o111 else 0o644, tar.extractfile(member).read() if isfile else None))
    except tarfile.TarError as exc:
        raise InputError("scripts: not a tar (%s)" % exc)
    files = set(tuple(parts) for parts, _, content in tree if content is not None)
    for parts, _, content in tree:
        if any(tuple(parts[:i]) in files for i in range(1, len(parts) + (content is None))):
            raise InputError("scripts: %s is below a file, or both a file and a directory" % _show("/".join(parts)))
    return tree


def unpack_scripts(packed, target):
    """The ctx-scripts tree PACKED at TARGET, whole or not at all: checked (read_scripts), written (files
    0755 or 0644) into a private temporary directory beside TARGET, and that renamed."""
    tree = read_scripts(packed)
    temp = tempfile.mkdtemp(prefix=".unpacking.", dir=os.path.dirname(target))
    try:
        for parts, mode, content in tree:
            path = os.path.join(temp, *parts)
            os.makedirs(path if content is None else os.path.dirname(path), 0o755, exist_ok=True)
            if content is not None:
                atomic_write(path, content, mode)
        os.rename(temp, target)
    except BaseException:
        shutil.rmtree(temp, True)
        raise


def execute_plan(plan, paths, context_id, env, script_timeout):
    """Carry out a resolved plan in order; the first failure stops it."""
    files = {"hosts": paths.hosts_file, "known_hosts": paths.known_hosts_file}
    for action in plan:
        if action.kind == SCRIPT:
            run_script(paths, action.target, action.args, env, script_timeout)
            continue
        try:
            if action.kind == BLOCK:
                LOG.info("%d line(s) into the ctxd block of %s", len(action.args), files[action.target])
                update_managed_file(files[action.target], context_id, action.args)
            else:
                make_private_tree(paths.state_dir, os.path.dirname(action.target))
                atomic_write(action.target, action.content)
        except (OSError, ValueError) as exc:
            raise ActionError("could not write %s: %s" % (action.target, exc))


def apply_view(raw_view, context_id, node_id, paths, script_timeout, previous=None, resume=False, extra_env=()):
    """Validate a view and plan; only then write files and run scripts: the initial run
    (complete views only, unless RESUME: this node was contextualized before), or, after the
    raw view PREVIOUS was applied, what changed (watch mode). False if nothing had to be done.
    EXTRA_ENV: more for the scripts' environment (where the host credentials are).

    When an action fails, problem.sh (if present and executable) runs before
    the error is raised; its own outcome is ignored.
    """
    view = validate_view(raw_view, context_id, node_id)
    joined = departed = ()
    if previous is not None:
        plan, joined, departed = plan_change(validate_view(previous, context_id, node_id), view)
        if not plan:
            return False
    elif view.complete or resume:
        plan = plan_actions(view, paths.state_dir)
    else:
        raise InputError("view: not complete")
    plan = resolve_scripts(plan, paths)
    view_path = os.path.join(paths.state_dir, "view.json")
    try:
        atomic_write(view_path, json.dumps(raw_view, indent=1, sort_keys=True).encode("utf-8"))
    except OSError as exc:
        raise ActionError("could not write %s: %s" % (view_path, exc))
    env = dict(os.environ, CTX_VIEW=view_path, CTX_CONTEXT_ID=context_id, CTX_NODE_ID=node_id,
               CTX_EVENT="change" if previous is not None else "initial",
               CTX_JOINED=" ".join("%s,%s,%s" % (p.ip, p.hostname, p.fqdn) for p in joined),
               CTX_DEPARTED=" ".join("%s,%s,%s" % (p.ip, p.hostname, p.fqdn) for p in departed))
    env.update(extra_env)
    LOG.info("view revision %d%s: %d action(s)%s", view.revision, " is complete" if view.complete else "",
             len(plan), " (%d joined, %d departed)" % (len(joined), len(departed)) if previous else "")
    try:
        execute_plan(plan, paths, context_id, env, script_timeout)
    except Exception as exc:
        if _is_runnable(script_path(paths, "problem.sh")):
            env.update(CTX_EXIT_CODE=str(exit_code_for(exc)), CTX_ERROR=str(exc))
            try:
                run_script(paths, "problem.sh", (), env, script_timeout)
            except ActionError:
                pass
        raise
    return True


# ---------------------------------------------------------------------------
# Host credentials: certificates the broker signs for this node's vetted names

def tool(*argv, data=b"", what=None):
    """The output of the command ARGV (openssl, say): EnvironmentFailure when it is missing or fails, or
    when it fails on the input WHAT (DATA), InputError."""
    try:
        done = subprocess.run(argv, input=data, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        raise EnvironmentFailure("cannot run %s (for the host certificates): %s" % (argv[0], exc))
    if done.returncode:
        raise (InputError if what else EnvironmentFailure)("%s%s failed: %s" % (
            what + ": " if what else "", " ".join(argv[:2]), _show(done.stderr.decode("utf-8", "replace").strip(), 300)))
    return done.stdout


def certificate_names(cert, identity):
    """The names of IDENTITY that CERT (a Certificate) asks for, in its order, once each."""
    return list(collections.OrderedDict.fromkeys(getattr(identity, CERT_NAMES[n]) for n in cert.names))


def node_key(path, node_id):
    """Make sure PATH is a private key made for NODE_ID: one made (0600) when it is missing or its
    sidecar PATH.ctxd-node names no or another node (an image snapshotted from a contextualized VM
    carries the key: never shared with the VMs made from it). EnvironmentFailure for a PATH that is
    not a regular file (a symlink) of ours, 0600 or stricter."""
    sidecar = path + ".ctxd-node"
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        problem = ("is not a regular file" if not stat.S_ISREG(st.st_mode) else
                   "is owned by uid %d, not %d" % (st.st_uid, os.geteuid()) if st.st_uid != os.geteuid() else
                   "is accessible to others (mode 0%o)" % stat.S_IMODE(st.st_mode) if st.st_mode & 0o077 else None)
        if problem:
            raise EnvironmentFailure("refusing the key %s: it %s; remove it to have a new key made" % (path, problem))
        try:
            if (read_file(sidecar, 1024, True) or b"").strip() == node_id.encode():
                return
        except (OSError, InputError):
            pass   # a symlink, a larger file: a new key
    key = tool("openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256")
    os.makedirs(os.path.dirname(path), 0o755, exist_ok=True)
    atomic_write(path, key)    # first the key, then the sidecar: cut short, the next run makes another
    atomic_write(sidecar, node_id.encode() + b"\n")
    LOG.info("made the key %s%s", path, "" if st is None else " (the one there was not made for this node)")


def make_csr(cert, names, node_id):
    """A certificate request (PEM) for NAMES (the first as CN) with CERT's key, made for NODE_ID if need be."""
    node_key(cert.key, node_id)
    san = ",".join(("IP:" if _is_ip(n) else "DNS:") + n for n in names)
    return tool("openssl", "req", "-new", "-key", cert.key, "-subj", "/CN=" + names[0],
                "-addext", "subjectAltName=" + san).decode("ascii")


SAN = re.compile(r"X509v3 Subject Alternative Name:[^\n]*\n[ \t]*([^\n]*)")


def certified_names(text):
    """{("DNS", lower-case name) or ("IP", address)} and any other entry as it is, from the
    subjectAltName in openssl x509's output TEXT (-ext subjectAltName or -text)."""
    found = SAN.search(text)
    names = set()
    for entry in found.group(1).strip().split(", ") if found else ():
        kind, _, value = entry.partition(":")
        if kind == "DNS":
            names.add(("DNS", value.lower()))
        elif kind == "IP Address" and _is_ip(value):
            names.add(("IP", str(ipaddress.ip_address(value))))
        else:
            names.add((entry, ""))
    return names


def requested_names(names):
    """certified_names' form of NAMES."""
    return {("IP", str(ipaddress.ip_address(n))) if _is_ip(n) else ("DNS", n.lower()) for n in names}


def _pems(text, what, least):
    """The PEM certificates TEXT consists of, at least LEAST."""
    found = PEM.findall(_expect(text, str, what))
    if len(found) < least or "".join(PEM.split(text)).strip():
        raise InputError("%s: not PEM certificates only, at least %d" % (what, least))
    return [pem + "\n" for pem in found]


def _renewal(part, what):
    """The time two thirds into the validity of PART of a credentials reply."""
    times = [part.get(k) for k in ("not_before", "not_after")]
    if not all(type(t) in (int, float) for t in times) or not 0 <= times[0] < times[1] < 1e11:
        raise InputError("%s: invalid not_before, not_after %s" % (what, _show(times)))
    return times[0] + (times[1] - times[0]) * 2 / 3


def certified_key(line, keys, what):
    """Which of KEYS ("TYPE BASE64") the host certificate LINE ("TYPE-cert-v01@openssh.com BASE64") is for."""
    kind, _, data = line.partition(" ") if isinstance(line, str) else ("", "", "")
    blob = _b64decode(data, what) if SSH_KEY_B64.fullmatch(data) else b""
    head = len(kind).to_bytes(4, "big") + kind.encode()
    fields = len(head) + 4 + int.from_bytes(blob[len(head):len(head) + 4], "big")   # after the type and nonce
    for key in keys:
        key_type, _, key_data = key.partition(" ")
        own = _b64decode(key_data, key_type)[len(key_type) + 4:]   # the key's fields, after its type
        if (kind == key_type.replace("@openssh.com", "") + "-cert-v01@openssh.com" and blob.startswith(head)
                and blob[fields:].startswith(own)
                and blob[fields + len(own) + 8:fields + len(own) + 12] == b"\0\0\0\2"):   # after the serial: host
            return key
    raise InputError("%s: not a host certificate of one of this node's keys" % what)


def check_credentials(reply, view, names, host_keys, sshd_conf):
    """What a credentials REPLY for VIEW installs, checked whole: ([(path, text)], [(CA PEM, subject hash)],
    renewal time, scripts' environment). NAMES: the certificate's; HOST_KEYS: {key: path} of this host;
    SSHD_CONF: the sshd configuration file to write, or None."""
    cert, files, cas, renewals, env = view.certificate, [], [], [], {}
    if cert:
        what = "credentials reply.x509"
        x509 = _expect(reply.get("x509"), dict, what)
        leaf, chain, bundle = (_pems(x509.get(k), "%s.%s" % (what, k), least)
                               for k, least in (("certificate", 1), ("chain", 0), ("bundle", 1)))
        if len(leaf) > 1 or set(str(n).lower() for n in _expect(x509.get("names"), list, what + ".names")) != set(
                n.lower() for n in names):
            raise InputError("%s: not one certificate for %s" % (what, ", ".join(names)))
        x509_out = lambda pem, part, *args: tool("openssl", "x509", "-noout", *args, data=pem.encode(),
                                                 what=what + part)
        if x509_out(leaf[0], ".certificate", "-pubkey") != tool("openssl", "pkey", "-pubout", "-in", cert.key):
            raise InputError("%s.certificate: not for the key %s" % (what, cert.key))
        try:
            text = x509_out(leaf[0], ".certificate", "-ext", "subjectAltName")
        except InputError:   # OpenSSL before 1.1.1 has no -ext
            text = x509_out(leaf[0], ".certificate", "-text")
        if certified_names(text.decode("utf-8", "replace")) != requested_names(names):
            raise InputError("%s.certificate: its subjectAltName is not exactly %s" % (what, ", ".join(names)))
        cas = [(pem, x509_out(pem, ".bundle", "-subject_hash").decode().strip()) for pem in bundle]
        files += [(cert.certificate, "".join(leaf + chain)), (cert.bundle, "".join(bundle))]
        renewals.append(_renewal(x509, what))
        env.update(CTX_TLS_KEY=cert.key, CTX_TLS_CERT=cert.certificate, CTX_TLS_BUNDLE=cert.bundle)
        if cert.ca_dir:
            env["CTX_TLS_CA_DIR"] = cert.ca_dir
    if view.ssh_certificate is not None:
        what, me = "credentials reply.ssh", view.identity
        ssh = _expect(reply.get("ssh"), dict, what)
        ours = (me.hostname.lower(), me.fqdn.lower(), me.primary_ip)
        if not all(str(p).lower() in ours for p in _expect(ssh.get("principals", ssh.get("names")), list, what)):
            raise InputError("%s.principals: not this node's names" % what)
        certs = []
        for i, entry in enumerate(_expect(ssh.get("certificates"), list, what + ".certificates", MAX_SSH_KEYS)):
            where = "%s.certificates[%d]" % (what, i)
            key = certified_key(_expect(entry, dict, where).get("certificate"),
                                [k for k in host_keys if k.split()[0] == entry.get("type")], where)
            certs.append((host_keys[key][:-len(".pub")] + "-cert.pub", entry["certificate"] + "\n"))
        files += certs
        if sshd_conf:
            files.append((sshd_conf, "# ctxagent: the host certificates of ctxd (context %s)\n" % view.context_id
                          + "".join("HostCertificate %s\n" % path for path, _ in certs)))
        renewals.append(_renewal(ssh, what))
        env["CTX_SSH_CERTS"] = ":".join(path for path, _ in certs)
    return files, cas, min(renewals), env


def install(path, text):
    """Write TEXT to PATH (0644; parent directories made 0755) unless it is there already; whether it was not."""
    data = text.encode("utf-8")
    try:
        if read_file(path, len(data)) == data:
            return False
    except (OSError, InputError):
        pass   # a symlink, a larger file: replaced
    os.makedirs(os.path.dirname(path), 0o755, exist_ok=True)
    atomic_write(path, data, 0o644)
    return True


def install_ca_dir(ca_dir, context_id, cas):
    """The CA certificates CAS ([(PEM, subject hash)]) in the hashed directory CA_DIR (openssl's -CApath):
    ctxd-CID-I.pem and a symlink HASH.N to it each; what this or another context had there before
    (ctxd-ID-N.pem, the links to them: an image from another context must not trust its CA) is
    replaced, all else kept."""
    names = ["ctxd-%s-%d.pem" % (context_id, i) for i in range(len(cas))]
    for name, (pem, _) in zip(names, cas):
        install(os.path.join(ca_dir, name), pem)
    wanted, ours = set(zip(names, (h for _, h in cas))), re.compile(r"ctxd-%s-\d+\.pem" % ID.pattern)
    for entry in sorted(os.listdir(ca_dir)):
        path = os.path.join(ca_dir, entry)
        link = os.readlink(path) if os.path.islink(path) else None
        if (link, entry.split(".")[0]) in wanted:
            wanted.discard((link, entry.split(".")[0]))   # kept as it is
        elif link and ours.fullmatch(link) or not link and ours.fullmatch(entry) and entry not in names:
            os.unlink(path)
    for name, subject_hash in sorted(wanted):
        n = 0
        while os.path.lexists(os.path.join(ca_dir, "%s.%d" % (subject_hash, n))):
            n += 1
        os.symlink(name, os.path.join(ca_dir, "%s.%d" % (subject_hash, n)))


# ---------------------------------------------------------------------------
# This host

def group_addresses(pairs):
    """Identity interfaces from [(interface, address)], in first-seen order.

    Drops lo, loopback and IPv6 link-local addresses, invalid names, and so
    interfaces without an address.
    """
    table = collections.OrderedDict()
    for name, text in pairs:
        try:
            address = ipaddress.ip_address(text.split("%")[0])
            check_interface_name(name, "interface")
        except (ValueError, InputError):
            continue
        if name != "lo" and not address.is_loopback and not (
                address.version == 6 and address.is_link_local):
            family = table.setdefault(name, {"name": name, "ipv4": [], "ipv6": []})[
                "ipv%d" % address.version]
            if str(address) not in family and len(family) < MAX_ADDRESSES:
                family.append(str(address))
    return list(table.values())[:MAX_INTERFACES]


def parse_ip_addr(text):
    """[(interface, address)] from `ip -o addr show`."""
    fields = [line.split() for line in text.splitlines()]
    return [(f[1].rstrip(":").split("@")[0], f[3].split("/")[0])
            for f in fields if len(f) >= 4 and f[2] in ("inet", "inet6")]


def _kernel_pairs():
    """[(interface, address)] without `ip`: SIOCGIFADDR, /proc/net/if_inet6."""
    pairs = []
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with probe:
        for _, name in socket.if_nameindex():
            try:
                reply = fcntl.ioctl(probe.fileno(), 0x8915, name.encode()[:15].ljust(256, b"\0"))
                pairs.append((name, socket.inet_ntoa(reply[20:24])))
            except OSError:
                pass
    try:
        with open("/proc/net/if_inet6") as table:
            for f in (line.split() for line in table):
                pairs.append((f[5], str(ipaddress.IPv6Address(int(f[0], 16)))))
    except (OSError, ValueError, IndexError):
        pass
    return pairs


def discover_interfaces():
    """This host's non-loopback interfaces and their addresses."""
    ip = shutil.which("ip", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin:/usr/bin:/bin")
    if ip:
        try:
            return group_addresses(parse_ip_addr(subprocess.check_output(
                [ip, "-o", "addr", "show"], stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                universal_newlines=True, timeout=10)))
        except (OSError, subprocess.SubprocessError):
            pass
    return group_addresses(_kernel_pairs())


SSH_KEY_TYPE = re.compile(r"[a-z][a-z0-9.@-]{0,63}")   # a key type, if not one of ours (ssh-dss)


def read_ssh_host_keys(ssh_dir, paths=False):
    """The valid "TYPE BASE64" of SSH_DIR/ssh_host_*_key.pub, by file name (PATHS: {key: its file})."""
    keys = collections.OrderedDict()
    for path in sorted(glob.glob(os.path.join(ssh_dir, "ssh_host_*_key.pub"))):
        try:
            fields = (read_file(path, 16384) or b"").decode().split()[:2]
            if len(fields) == 2 and fields[0] not in SSH_KEY_TYPES and SSH_KEY_TYPE.fullmatch(fields[0]) \
                    and SSH_KEY_B64.fullmatch(fields[1]):   # a DSA key, which cloud-init may still make
                LOG.info("not reporting %s: SSH host key type %s is not supported", path, fields[0])
                continue
            key = check_ssh_key(" ".join(fields), path)
        except (OSError, ValueError, InputError) as exc:
            LOG.warning("ignoring %s: %s", path, exc)
            continue
        if key not in keys and len(keys) < MAX_SSH_KEYS:
            keys[key] = path
    return keys if paths else list(keys)


def local_names(hostname=None, fqdn=None):
    """(short name, FQDN); without a usable FQDN of our own, the short name twice."""
    short = hostname or socket.gethostname().split(".")[0]
    if fqdn:
        return short, fqdn
    candidate = socket.getfqdn()
    # "localhost.localdomain" is a valid FQDN, but not ours.
    if candidate.split(".")[0].lower() != short.lower():
        return short, short
    try:
        return short, check_fqdn(candidate, "fqdn")
    except InputError:
        return short, short


def wait_for_network(timeout):
    """Return once a non-loopback address exists; EnvironmentFailure after TIMEOUT."""
    deadline = time.monotonic() + timeout
    while not any(i["ipv4"] or i["ipv6"] for i in discover_interfaces()):
        if time.monotonic() >= deadline:
            raise EnvironmentFailure("no network: no non-loopback address after %g s" % timeout)
        time.sleep(1)


# ---------------------------------------------------------------------------
# Bootstrap sources

def read_bootstrap_source(source, options):
    """The bytes behind SOURCE, None when there are none; ConfigError for a FILE that is not there
    (what cloud-init saved may be absent: an instance without user-data)."""
    if source == "ec2" or source.startswith(("http://", "https://")):
        return _fetch_remote(source, options)
    path = options.cloud_init_user_data if source == "cloud-init" else source
    try:
        content = read_file(path, MAX_BOOTSTRAP)
    except OSError as exc:
        raise ConfigError("cannot read the bootstrap %s: %s" % (path, exc))
    if content is None and source != "cloud-init":
        raise ConfigError("the bootstrap file %s does not exist" % path)
    return content


def _get(opener, url, method="GET", headers=None):
    request = urllib.request.Request(url, None, headers or {}, method=method)
    with opener(request, timeout=REQUEST_TIMEOUT) as reply:
        return reply.read(MAX_BOOTSTRAP + 1)


def _fetch(source):
    if source != "ec2":
        return _get(urllib.request.urlopen, source)
    # IMDSv2. The metadata service is link-local: never through an http_proxy.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({})).open
    token = _get(opener, IMDS + "api/token", "PUT", {"X-aws-ec2-metadata-token-ttl-seconds": "21600"})
    return _get(opener, IMDS + "user-data", "GET", {"X-aws-ec2-metadata-token": token.decode().strip()})


def _fetch_remote(source, options):
    """The bootstrap at SOURCE, retried until --network-timeout; None on HTTP 404."""
    if not options.address:
        wait_for_network(options.network_timeout)
    deadline = time.monotonic() + options.network_timeout
    while True:
        try:
            return _fetch(source)
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            problem = "HTTP %d" % exc.code
            if exc.code < 500:
                raise EnvironmentFailure("cannot read the bootstrap from %s: %s" % (source, problem))
        except (OSError, http.client.HTTPException, ValueError) as exc:
            problem = str(exc)
        if time.monotonic() >= deadline:
            raise EnvironmentFailure("cannot read the bootstrap from %s: %s" % (source, problem))
        LOG.info("bootstrap from %s not available yet (%s)", source, problem)
        time.sleep(2)


# ---------------------------------------------------------------------------
# The broker

def is_verification_error(exc):
    """A TLS certificate verification failure: never worth retrying."""
    # ssl.CertificateError is SSLCertVerificationError from Python 3.7 on.
    return isinstance(exc, ssl.CertificateError) or (
        isinstance(exc, ssl.SSLError) and getattr(exc, "reason", "") == "CERTIFICATE_VERIFY_FAILED")


class _HTTPSConnection(http.client.HTTPSConnection):
    """http.client's HTTPS connection, offering a saved TLS session for resumption."""

    def __init__(self, host, port, tls, timeout, source_address, session):
        http.client.HTTPSConnection.__init__(self, host, port, timeout=timeout, source_address=source_address,
                                             context=tls)
        self.tls, self.session = tls, session

    def connect(self):
        http.client.HTTPConnection.connect(self)   # TCP (TCP_NODELAY set)
        keepalive(self.sock)
        self.sock = self.tls.wrap_socket(self.sock, server_hostname=self.host, session=self.session)


def keepalive(sock):
    """TCP keepalive probes (KEEPALIVE) where the platform has the options."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in zip(("TCP_KEEPIDLE", "TCP_KEEPINTVL", "TCP_KEEPCNT"), KEEPALIVE):
        if hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


# A kept-alive connection the broker (or a proxy) closed since its last answer fails like this
# on the next request, before any answer: reconnect and send that request again.
_CLOSED = (ConnectionError, http.client.BadStatusLine, ssl.SSLEOFError, ssl.SSLZeroReturnError)


class BrokerConnection(object):
    """HTTPS requests to the broker of a bootstrap, verified against its CA, on one kept-alive
    connection: a connection the broker closed is opened again (resuming the TLS session)."""

    def __init__(self, bootstrap, source=None):
        parts = urllib.parse.urlsplit(bootstrap["url"])
        self.host, self.port, self.prefix = parts.hostname, parts.port or 443, parts.path.rstrip("/")
        self.tls = make_tls_context(bootstrap["ca_pem"])
        self.local_address = None   # our end of the first connection
        self.reached = False        # whether any reply came back
        # The address we claim (--address): the broker checks that requests come from it,
        # so connect from it when it is one of ours (else, behind NAT, from any).
        self.source = source
        self.connection = None
        self.session = None         # the last TLS session, offered when connecting again
        self.retry_after = None     # the Retry-After header of the last reply
        self.opened = self.resumed = 0

    def connect(self, timeout=REQUEST_TIMEOUT):
        """Open the connection unless it is open; our address on it."""
        if self.connection is None:
            self.connection = self._open(timeout)
            sock = self.connection.sock
            self.opened += 1
            self.resumed += sock.session_reused
            LOG.debug("connected to %s:%s (TLS session %s)", self.host, self.port,
                      "resumed" if sock.session_reused else "new")
            if self.local_address is None:
                address = ipaddress.ip_address(sock.getsockname()[0].split("%")[0])
                self.local_address = str(getattr(address, "ipv4_mapped", None) or address)
        return self.local_address

    def _open(self, timeout):
        while True:
            source = (self.source, 0) if self.source is not None else None
            connection = _HTTPSConnection(self.host, self.port, self.tls, timeout, source, self.session)
            try:
                connection.connect()
                return connection
            except OSError as exc:
                connection.close()
                if source is None or exc.errno not in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT, errno.EINVAL):
                    raise
                LOG.info("cannot connect from %s (%s): connecting from any address", self.source, exc)
                self.source = None

    def close(self):
        if self.connection is not None:
            self.connection.close()
            self.connection = None

    def request(self, method, path, token=None, body=None, timeout=REQUEST_TIMEOUT):
        """(status, raw body); socket and TLS errors propagate (the connection closed)."""
        headers = {"User-Agent": "ctxagent/" + __version__}
        if body is not None:
            body = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        if token is not None:
            headers["Authorization"] = "Bearer " + token
        while True:
            kept = self.connection is not None
            self.connect(timeout)
            try:
                self.connection.sock.settimeout(timeout)
                self.connection.request(method, self.prefix + path, body, headers)
                reply = self.connection.getresponse()
                raw = reply.read(MAX_REPLY + 1)
            except _CLOSED as exc:
                self.close()
                if not kept:
                    raise
                LOG.debug("the broker closed the connection (%s): connecting again", exc)
                continue
            except BaseException:
                self.close()
                raise
            break
        self.reached, self.retry_after = True, reply.getheader("Retry-After")
        if reply.isclosed() and not reply.will_close:
            self.session = self.connection.sock.session   # TLS 1.3 tickets come after the handshake
        else:   # the broker said it closes, or the body was not read to its end
            self.close()
        LOG.debug("%s %s -> %d", method, path, reply.status)
        if len(raw) > MAX_REPLY:
            raise InputError("broker reply to %s %s is too large" % (method, path))
        return reply.status, raw


def decode_reply(raw, what):
    """The JSON object in RAW."""
    try:
        return _expect(json.loads(raw.decode("utf-8")), dict, what)
    except ValueError:
        raise InputError("%s: invalid JSON" % what)


def describe_error(status, raw):
    """'HTTP 410 join_token_expired: ...' for an error reply, bounded."""
    try:
        detail = "%(error)s: %(message)s" % json.loads(raw.decode("utf-8"))
    except (ValueError, TypeError, KeyError):
        detail = raw[:200].decode("utf-8", "replace")
    return "HTTP %d %s" % (status, _show(detail, 300))


# ---------------------------------------------------------------------------
# Logging

class Redactor(logging.Formatter):
    """UTC timestamps; every known secret and anything like a token removed."""

    def __init__(self):
        logging.Formatter.__init__(self, "%(asctime)s %(levelname)s %(message)s")
        self.secrets = set()

    def formatTime(self, record, datefmt=None):
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.created))

    def redact(self, text):
        for secret in self.secrets:
            text = text.replace(secret, "<redacted>")
        return TOKEN.sub(r"ctxd_\1_<redacted>", text)

    def format(self, record):
        return self.redact(logging.Formatter.format(self, record))


class RunLog(logging.Handler):
    """This run's log: kept for the reports' log_tail, copied to the log file once open."""

    def __init__(self):
        logging.Handler.__init__(self)
        self.lines = []
        self.stream = None

    def emit(self, record):
        self.lines.append(self.format(record) + "\n")
        if self.stream is not None:
            self.stream.write(self.lines[-1])
            self.stream.flush()

    def open_file(self, path):
        """Append to PATH (0600, not through a symlink), starting with what is logged so far."""
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | NOFOLLOW, 0o600)
        os.fchmod(fd, 0o600)
        self.stream = os.fdopen(fd, "a", encoding="utf-8", errors="replace")
        self.stream.write("".join(self.lines))

    def tail(self):
        return "".join(self.lines)[-MAX_LOG_TAIL:]

    def close(self):
        if self.stream is not None:
            self.stream.close()
        logging.Handler.close(self)


# ---------------------------------------------------------------------------
# The run

class Agent(object):
    """One run: bootstrap, enroll, poll, act, report."""

    def __init__(self, options, formatter, runlog):
        self.options, self.formatter, self.runlog = options, formatter, runlog
        self.bootstrap = self.broker = self.node = self.deadline = self.lock = self.renew_at = None
        self.retry_max, self.tls_env = RETRY_MAX, {}   # tls_env: the scripts' CTX_TLS_* and CTX_SSH_CERTS

    def state(self, name):
        return os.path.join(self.options.state_dir, name)

    def node_path(self, tail):
        return "/v1/contexts/%(context_id)s/nodes/%(node_id)s/" % self.node + tail

    def run(self):
        o = self.options
        self.bootstrap = b = parse_bootstrap(read_bootstrap_source(o.bootstrap, o))
        if b is None:
            LOG.info("no ctxd bootstrap in %s: nothing to do", o.bootstrap)
            return EXIT_OK
        self.formatter.secrets.add(b["join_token"])
        if o.leave:   # (while a watching run holds the lock)
            self.broker = BrokerConnection(b, o.address)
            self.deadline = time.monotonic() + o.timeout
            return self.leave()
        baked = check_scripts_dir(o.scripts_dir)
        try:
            make_private_dir(o.state_dir)
            # One run at a time (boot and cron); not inherited by scripts.
            self.lock = os.open(self.state("lock"), os.O_WRONLY | os.O_CREAT | NOFOLLOW, 0o600)
            os.fchmod(self.lock, 0o600)
            try:
                fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                LOG.info("another ctxagent run holds %s: nothing to do", self.state("lock"))
                return EXIT_OK
            self.runlog.open_file(self.state("ctxagent.log"))
        except OSError as exc:
            raise ConfigError("unusable state directory %s: %s" % (o.state_dir, exc))
        LOG.info("ctxagent %s: context %s, group %s, broker %s",
                 __version__, b["context_id"], b["group"], b["url"])
        if not o.address:
            wait_for_network(o.network_timeout)
        self.broker = BrokerConnection(b, o.address)
        self.deadline = time.monotonic() + o.timeout
        # Three requests on one connection: enroll (or update the saved node's identity),
        # which also starts the attempt (the node is contextualizing); the view's long-polls;
        # the report. (And the scripts the view delivers; why it waits, when it waits long.)
        self.retrying("connecting", lambda: (0, self.broker.connect()))   # learns our address
        progress = self.ensure_node(self.local_identity())
        # In watch mode a node contextualized before (a reboot, a restart) applies the view as it
        # is: its group may have lost a node for good, and so never be complete again.
        applied = self.load_applied() if o.watch else None
        view = self.poll_view(applied is not None, progress)
        done = threading.Event()
        if applied is not None:   # a watching node: its lease runs
            self.heartbeat(view, done)
        try:
            paths = Paths(o.scripts_dir, o.state_dir, o.hosts_file, o.known_hosts_file, self.delivered_scripts(view))
            if not (baked or paths.delivered):
                if o.scripts_dir_given:
                    raise ConfigError("scripts directory %s is missing and the view delivers none" % o.scripts_dir)
                LOG.info("no scripts directory %s: only the managed blocks are written", o.scripts_dir)
            self.renew_at = self.credentials(view)   # before any script, which may use them
            apply_view(view, b["context_id"], self.node["node_id"], paths, o.script_timeout, resume=applied is not None,
                       extra_env=self.tls_env)
        finally:
            done.set()
        LOG.info("contextualization done")
        self.report("ok", max(self.deadline, time.monotonic() + FINAL_REPORT_BUDGET))
        LOG.debug("%d connection(s) to the broker, %d resumed", self.broker.opened, self.broker.resumed)
        if o.watch:
            self.save_applied(view)
            return self.watch(view, paths)
        return EXIT_OK

    def delivered_scripts(self, raw):
        """The ctx-scripts tree the view RAW delivers, in STATE/scripts/SHA256: fetched, checked against
        the view's size and SHA-256, and unpacked unless it is there already; None without one."""
        spec = validate_view(raw, self.node["context_id"], self.node["node_id"]).scripts
        if spec is None:
            return None
        (digest, size), top = spec, self.state("scripts")
        target = os.path.join(top, digest)
        if os.path.isdir(target):
            return target
        status, packed = self.call("GET", self.node_path("scripts"), self.node["node_token"])
        if status != 200:
            raise self.refused("scripts", status, packed)
        found = hashlib.sha256(packed).hexdigest()
        if (len(packed), found) != (size, digest):
            raise InputError("scripts: %d bytes with SHA-256 %s, not the view's %d bytes with %s"
                             % (len(packed), found, size, digest))
        try:
            for entry in os.listdir(make_private_dir(top)):   # another context's tree, an unpacking cut short
                shutil.rmtree(os.path.join(top, entry), True)
            unpack_scripts(packed, target)
        except (OSError, ValueError) as exc:   # ValueError: a name this file system cannot encode
            raise ActionError("could not unpack the scripts in %s: %s" % (top, exc))
        LOG.info("scripts: %d bytes unpacked into %s", size, target)
        return target

    def load_applied(self):
        """The full view this node applied last (watch mode), if valid and this node's."""
        try:
            view = decode_reply(read_file(self.state("applied.json"), MAX_REPLY, True) or b"{}", "applied.json")
            if view:
                validate_view(view, self.node["context_id"], self.node["node_id"])
                LOG.info("contextualized before: applying view revision %d as it is", view["revision"])
                return view
        except (InputError, OSError) as exc:
            LOG.info("ignoring %s", exc)
        return None

    def save_applied(self, view):
        atomic_write(self.state("applied.json"), json.dumps(view).encode("utf-8"))

    def watch(self, applied, paths):
        """Follow the view: re-run what each change concerns (batched by the settle window) and
        report, backing off while the broker is away. Ends when the broker refuses this node
        (it departed: exit 6)."""
        o, cid, nid = self.options, self.node["context_id"], self.node["node_id"]
        self.deadline = float("inf")   # every request retried for as long as it takes
        # errored: False, True (a re-run failed: the next one reports ok) or "renewal" (a renewal did).
        held, first, last, errored, delay = applied, None, None, False, RENEW_RETRY
        while True:
            now = time.monotonic()
            if self.renew_at is not None and time.time() >= self.renew_at:   # no script runs
                try:
                    self.renew_at, delay = self.credentials(held), RENEW_RETRY
                    if errored == "renewal":
                        self.report("ok", self.deadline)
                        errored = False
                except AgentError as exc:
                    LOG.error("renewing the host certificates failed: %s", exc)
                    self.fail(exc)
                    self.renew_at, delay, errored = time.time() + delay, min(delay * 2, 3600), errored or "renewal"
                continue
            if first and (now - last >= o.settle or now - first >= o.settle_max):
                first, done = None, threading.Event()
                self.heartbeat(held, done)
                try:
                    if errored:
                        self.report("contextualizing", self.deadline)
                    if apply_view(held, cid, nid, paths, o.script_timeout, applied, extra_env=self.tls_env) or errored:
                        self.report("ok", self.deadline)
                    applied, errored = held, False
                    self.save_applied(held)
                except AgentError as exc:   # the next change retries from what was applied
                    LOG.error("re-run failed: %s", exc)
                    self.fail(exc)
                    errored = True
                finally:
                    done.set()
                continue
            lease = held.get("lease") or MAX_WAIT * 3
            # The wait ends in time for the settle window and the certificates' renewal.
            wait = max(1, int(0.99 + min(o.poll_wait, lease // 3,
                                         min(o.settle - now + last, o.settle_max - now + first) if first else MAX_WAIT,
                                         self.renew_at - time.time() if self.renew_at else MAX_WAIT)))
            status, raw = self.call("GET", self.node_path("view?since=%d&wait=%d&delta=1" % (held["revision"], wait)),
                                    self.node["node_token"], timeout=wait + REQUEST_TIMEOUT)
            if status == 304:
                continue
            if status != 200:
                raise self.refused("view", status, raw)
            try:
                new = decode_reply(raw, "view")
                new = merge_delta(held, new) if new.get("delta") is True else new
                if view_progress(new)[0] > held["revision"]:
                    held, last = new, time.monotonic()
                    first = first or last
            except InputError as exc:
                LOG.error("refusing the view: %s", exc)
                self.fail(exc)
                errored = True
                time.sleep(self.retry_max)

    def credentials(self, raw):
        """Ask for the host certificates the view RAW opts in to and install them; when to renew
        them (time.time()), None without any."""
        o, cid = self.options, self.node["context_id"]
        view = validate_view(raw, cid, self.node["node_id"])
        cert, sshd = view.certificate, view.ssh_certificate
        if cert is None and sshd is None:
            return None
        body, names = {} if sshd is None else {"ssh": True}, cert and certificate_names(cert, view.identity)
        try:
            if cert:
                body["csr"] = make_csr(cert, names, self.node["node_id"])
            for attempt in range(RATE_LIMITED_RETRIES + 1):
                status, raw = self.call("POST", self.node_path("credentials"), self.node["node_token"], body)
                if status != 429 or attempt == RATE_LIMITED_RETRIES:
                    break
                pause = retry_after(getattr(self.broker, "retry_after", None))
                LOG.warning("credentials: %s; asking again in %d s", describe_error(status, raw), pause)
                time.sleep(pause)
            if status in (403, 409):   # certificate_refused, not_enabled, ca_key_lost: the node credential works
                raise CredentialsRefused("host credentials refused by the broker: %s" % describe_error(status, raw))
            if status != 200:
                raise self.refused("credentials", status, raw)
            files, cas, renew, self.tls_env = check_credentials(
                decode_reply(raw, "credentials reply"), view, names, read_ssh_host_keys(o.ssh_dir, True),
                sshd and os.path.join(o.sshd_config_dir, "ctxd-host-certificates.conf"))
            changed = [path for path, text in files if install(path, text)]
            if cert and cert.ca_dir:
                install_ca_dir(cert.ca_dir, cid, cas)
        except OSError as exc:
            raise ActionError("could not install the host credentials: %s" % exc)
        LOG.info("host credentials: %d file(s) changed, renewal in %d s", len(changed), renew - time.time())
        try:   # sshd loads its host certificates when it starts or reloads
            if sshd and changed:
                tool("systemctl", "try-reload-or-restart", "ssh.service", "sshd.service")
        except AgentError as exc:
            LOG.warning("sshd not reloaded: %s", exc)
        # Not at once again when the broker (its clock behind ours) answered with the certificates it had issued.
        return max(renew, time.time() + RENEW_RETRY)

    def heartbeat(self, view, done):
        """With a lease in VIEW: a request every third of it on a connection of its own, until DONE
        is set (while scripts run, no long-poll tells the broker this node is alive); backoff
        no longer than that either."""
        lease = view.get("lease")
        self.retry_max = min(RETRY_MAX, lease / 3.0) if lease else RETRY_MAX
        if lease:
            threading.Thread(target=self._beat, args=(done,), daemon=True).start()

    def _beat(self, done):
        broker = BrokerConnection(self.bootstrap, self.options.address)
        while not done.wait(self.retry_max):
            try:   # since: beyond any revision, so the answer is an empty 304
                broker.request("GET", self.node_path("view?since=%d&wait=0" % (1 << 62)), self.node["node_token"])
            except (OSError, http.client.HTTPException, ssl.CertificateError, InputError):
                pass
        broker.close()

    def leave(self):
        """--leave: this node departs (its credential stops working); no script runs."""
        self.node = self.load_node()
        if self.node is not None:
            status, raw = self.call("POST", self.node_path("leave"), self.node["node_token"])
            if status not in (200, 401):
                raise self.refused("leave", status, raw)
            os.unlink(self.state("node.json"))
            LOG.info("node %s %s", self.node["node_id"], "left" if status == 200 else "had departed")
            self.node = None
        return EXIT_OK

    def local_identity(self):
        o = self.options
        hostname, fqdn = local_names(o.hostname, o.fqdn)
        identity = {"hostname": hostname, "fqdn": fqdn,
                    "primary_ip": o.address or self.broker.local_address,
                    "interfaces": discover_interfaces(),
                    "ssh_host_keys": read_ssh_host_keys(o.ssh_dir)}
        try:
            validate_identity(identity, "this host")
        except InputError as exc:
            raise ConfigError("%s (see --hostname, --fqdn, --address)" % exc)
        LOG.info("identity: %(primary_ip)s %(fqdn)s %(hostname)s", identity)
        return identity

    def call(self, method, path, token=None, body=None, deadline=None, timeout=REQUEST_TIMEOUT):
        """(status, raw) of a request; connection errors and 5xx retried until DEADLINE."""
        return self.retrying("%s %s" % (method, path.split("?")[0]),
                             lambda: self.broker.request(method, path, token, body, timeout), deadline)

    def retrying(self, what, attempt, deadline=None):
        """ATTEMPT()'s (status, result); connection errors and 5xx answers retried until
        DEADLINE, backing off with jitter from a fraction of a second (a storm's refused
        connections clear in well under one)."""
        delay = RETRY_FIRST
        while True:
            try:
                status, result = attempt()
                if status < 500:
                    return status, result
                problem = describe_error(status, result)
            except (OSError, http.client.HTTPException, ssl.CertificateError) as exc:
                if is_verification_error(exc):
                    raise EnvironmentFailure("TLS verification of %s failed: %s"
                                             % (self.bootstrap["url"], exc))
                problem = "%s: %s" % (type(exc).__name__, exc)
            remaining = (deadline or self.deadline) - time.monotonic()
            if remaining <= 0:
                raise self.timed_out(problem)
            pause = min(remaining, random.uniform(delay / 2, delay))
            LOG.warning("%s failed (%s); retry in %.2f s", what, problem, pause)
            time.sleep(pause)
            delay = min(delay * 2, self.retry_max)

    def timed_out(self, problem):
        if self.broker.reached:
            return IncompleteError("no complete view within %g s (%s)" % (self.options.timeout, problem))
        return EnvironmentFailure("broker %s unreachable for %g s (%s)"
                                  % (self.bootstrap["url"], self.options.timeout, problem))

    def refused(self, what, status, raw):
        """The error for an unexpected reply: RefusedError for 401/403/404/409/410."""
        kind = RefusedError if status in REFUSED else InputError
        return kind("%s refused by the broker: %s" % (what, describe_error(status, raw)))

    def instance_key(self):
        """This VM's enrollment secret; made and saved before its first use.

        Created exclusively and complete: two racing runs get the same key.
        """
        path = self.state("instance_key")
        try:
            atomic_write(path, secrets.token_urlsafe(32).encode("ascii") + b"\n", exclusive=True)
        except FileExistsError:
            pass
        try:
            key = read_file(path, 1024, True).decode("ascii", "replace").strip()
        except OSError:   # a symlink, say
            key = ""
        if not SECRET.fullmatch(key):
            raise ConfigError("%s is corrupt; remove it to enroll as a new node" % path)
        self.formatter.secrets.add(key)
        return key

    def load_node(self):
        """The saved node credential, if valid and for this bootstrap's context and group."""
        path, b = self.state("node.json"), self.bootstrap
        try:
            data = read_file(path, 65536, True)
            if data is None:
                return None
            node = decode_reply(data, path)
            token = node.get("node_token")
            if not (isinstance(token, str) and token.startswith("ctxd_node_")):
                raise InputError("%s: no node token" % path)
            check_id(node.get("node_id"), path)
        except (InputError, OSError) as exc:   # a symlink: replaced on enrollment
            LOG.warning("ignoring %s", exc)
            return None
        self.formatter.secrets.add(token)
        if (node.get("context_id"), node.get("group")) != (b["context_id"], b["group"]):
            LOG.info("%s is for another context or group", path)
            return None
        return node

    def ensure_node(self, identity):
        """Reuse the saved node credential, or (re-)enroll; where the view stands, as
        view_progress() gives it, when the reply carries it (older brokers: None)."""
        key = self.instance_key()   # even when unused: checked, 0600, redacted
        self.node = self.load_node()
        if self.node is not None:
            status, raw = self.call("PUT", self.node_path("identity"), self.node["node_token"], identity)
            if status == 200:
                LOG.info("node %s: identity updated", self.node["node_id"])
                return reply_progress(decode_reply(raw, "identity update reply"), "identity update reply")
            if status not in (401, 403, 404):
                raise self.refused("identity update", status, raw)
            LOG.info("saved credential refused (%s): enrolling again", describe_error(status, raw))
        b = self.bootstrap
        body = {"instance_key": key, "identity": identity}
        status, raw = self.call("POST", "/v1/contexts/%s/enroll" % b["context_id"], b["join_token"], body)
        if status not in (200, 201):
            raise self.refused("enrollment", status, raw)
        reply = decode_reply(raw, "enrollment reply")
        token = reply.get("node_token")
        if (reply.get("context_id"), reply.get("group")) != (b["context_id"], b["group"]) or not (
                isinstance(token, str) and token.startswith("ctxd_node_") and SECRET.fullmatch(token)):
            raise InputError("enrollment reply: no node credential for our context and group")
        self.formatter.secrets.add(token)
        self.node = {"url": b["url"], "context_id": b["context_id"], "group": b["group"],
                     "node_id": check_id(reply.get("node_id"), "enrollment reply"), "node_token": token}
        atomic_write(self.state("node.json"), json.dumps(self.node).encode("utf-8"))
        LOG.info("enrolled as node %s (%s)", self.node["node_id"], "new" if status == 201 else "again")
        return reply_progress(reply, "enrollment reply")

    def report(self, state, deadline):
        body = {"state": state, "watch": True} if self.options.watch else {"state": state}
        if state == "ok":
            body["log_tail"] = self.runlog.tail()
        status, raw = self.call("POST", self.node_path("report"), self.node["node_token"], body, deadline)
        if status != 200:
            raise self.refused("report " + state, status, raw)
        LOG.info("reported %s", state)

    def poll_view(self, resume=False, progress=None):
        """Long-poll until the view is complete (RESUME: the first view); the raw view.

        PROGRESS (revision, complete, waiting_for), from the enrollment's reply: an incomplete
        view is not fetched, the first long-poll waits for its next revision.
        Why it waits goes to the broker as the message of a contextualizing report (advisory)
        once it has waited WAIT_REPORT_AFTER seconds, then when the reason changes, at most every
        WAIT_REPORT_EVERY seconds: a long-poll ends in time for it."""
        since, waiting, longest = -1, None, MAX_WAIT
        if progress is not None and not progress[1] and not resume:
            since, waiting = progress[0], progress[2]
            LOG.info("view revision %d: waiting for %s", since, "; ".join(waiting) or "(nothing named)")
        told, due = None, time.monotonic() + WAIT_REPORT_AFTER   # the reason last reported; when the next may go
        while True:
            now = time.monotonic()
            reason = "; ".join(waiting or ()) or "(nothing named)"
            if waiting is not None and reason != told and now >= due:
                self.advise({"state": "contextualizing", "message": "waiting: " + reason})
                told, due = reason, now + WAIT_REPORT_EVERY
            remaining = self.deadline - now
            if remaining <= 0:
                raise self.timed_out("no view received" if waiting is None else "waiting for " + reason)
            wait = max(0, min(self.options.poll_wait, longest, int(remaining),
                              MAX_WAIT if waiting is None or reason == told else int(0.99 + due - now)))
            status, raw = self.call("GET", self.node_path("view?since=%d&wait=%d" % (since, wait)),
                                    self.node["node_token"], timeout=wait + REQUEST_TIMEOUT)
            if status == 304:
                continue
            if status == 400 and wait > OLD_MAX_WAIT and longest > OLD_MAX_WAIT:
                LOG.info("the broker refused a %d s wait (ctxd before 0.2?): waiting %d s per request",
                         wait, OLD_MAX_WAIT)
                longest = OLD_MAX_WAIT
                continue
            if status != 200:
                raise self.refused("view", status, raw)
            view = decode_reply(raw, "view")
            revision, complete, now_waiting = view_progress(view)
            if complete or resume:
                return view
            if now_waiting != waiting:
                LOG.info("view revision %d: waiting for %s", revision, "; ".join(now_waiting))
                waiting = now_waiting
            if revision <= since:
                time.sleep(1)   # a broker that does not wait must not make us spin
            since = revision

    def fail(self, exc, message=None):
        """Report the failure EXC (MESSAGE: what to say, else str(EXC)), best effort and briefly, when we
        hold a credential that works."""
        code, message = exit_code_for(exc), message or str(exc)
        # Not to a broker that refused us (but for the host certificates only) or never answered
        # (but exit 3 for a missing openssl, say).
        if self.node is None or code == EXIT_REFUSED and not getattr(exc, "credential_works", False) or (
                code == EXIT_ENVIRONMENT and not self.broker.reached):
            return
        self.advise({"state": "error", "exit_code": code, "message": message, "log_tail": self.runlog.tail()},
                    ERROR_REPORT_TIMEOUT)

    def advise(self, body, timeout=REQUEST_TIMEOUT):
        """Send the report BODY once, its message redacted and bounded; a failure is logged, not raised."""
        body["message"] = self.formatter.redact(body["message"])[:MAX_MESSAGE]
        if self.options.watch:
            body["watch"] = True
        try:
            status, raw = self.broker.request("POST", self.node_path("report"), self.node["node_token"], body, timeout)
            problem = None if status == 200 else describe_error(status, raw)
        except (OSError, http.client.HTTPException, ssl.CertificateError, InputError) as exc:
            problem = str(exc)
        if problem:
            LOG.warning("could not report %s: %s", body["state"], problem)
        else:
            LOG.info("reported %s", body["state"])


# ---------------------------------------------------------------------------
# Command line

def _number(low, high, kind=float):
    def convert(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not low < value <= high:
            raise argparse.ArgumentTypeError("not in (%g, %g]: %r" % (low, high, text))
        return value
    return convert


def _checked(check):
    def convert(text):
        try:
            return check(text, "value")
        except InputError as exc:
            raise argparse.ArgumentTypeError(str(exc))
    return convert


def parse_args(argv):
    """The options in ARGV (argparse's SystemExit for a usage error or --help)."""
    # The epilog is the docstring's table (none under python -OO).
    epilog = __doc__ and "exit codes:" + __doc__.split("Exit codes:")[1].split("\n\n")[0]
    parser = argparse.ArgumentParser(prog="ctxagent.py", epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     description="Enroll, wait for the cluster's view, configure.")
    add = parser.add_argument
    seconds = _number(0, 1e9)
    add("--bootstrap", required=True, metavar="SOURCE", help="FILE, http(s)://URL, ec2 or cloud-init")
    add("--scripts-dir", metavar="DIR", help="[/opt/ctx-scripts, may be missing]")
    add("--state-dir", metavar="DIR", default="/var/lib/ctxagent", help="[%(default)s]")
    add("--timeout", type=seconds, default=1800.0, metavar="S", help="to reach a complete view [%(default)g]")
    add("--hosts-file", metavar="FILE", default="/etc/hosts", help="[%(default)s]")
    add("--known-hosts-file", metavar="FILE", default="/etc/ssh/ssh_known_hosts", help="[%(default)s]")
    add("--ssh-dir", metavar="DIR", default="/etc/ssh", help="with ssh_host_*_key.pub [%(default)s]")
    add("--sshd-config-dir", metavar="DIR", default="/etc/ssh/sshd_config.d", help="for HostCertificate [%(default)s]")
    add("--address", type=_checked(check_ip), metavar="IP",
        help="to report [ours on the connection to the broker]")
    add("--hostname", type=_checked(check_hostname), metavar="SHORT", help="to report")
    add("--fqdn", type=_checked(check_fqdn), metavar="FQDN", help="to report")
    add("--network-timeout", type=seconds, default=120.0, metavar="S", help="for a network address [%(default)g]")
    add("--poll-wait", type=_number(-1, MAX_WAIT, int), default=POLL_WAIT, metavar="S",
        help="0..%d [%%(default)d]" % MAX_WAIT)
    add("--script-timeout", type=seconds, default=600.0, metavar="S", help="[%(default)s]")
    add("--watch", action="store_true", help="after the first run, keep following the view")
    add("--settle", type=seconds, default=2.0, metavar="S", help="watch: quiet time before a re-run [%(default)g]")
    add("--settle-max", type=seconds, default=30.0, metavar="S", help="watch: longest batching [%(default)g]")
    add("--leave", action="store_true", help="depart from the context, run no script")
    add("--cloud-init-user-data", metavar="FILE", default="/var/lib/cloud/instance/user-data.txt",
        help="[%(default)s]")
    add("-v", "--verbose", action="store_true")
    options = parser.parse_args(argv)
    options.scripts_dir_given = options.scripts_dir is not None
    # Absolute, so CTX_VIEW and data paths work from a script's cwd; the state dir
    # resolved once, as no symlink below it is ever followed (make_private_dir).
    options.scripts_dir = os.path.abspath(options.scripts_dir or "/opt/ctx-scripts")
    options.state_dir = os.path.realpath(options.state_dir)
    return options


def main(argv):
    """Run the agent with ARGV; the exit code."""
    try:
        options = parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_CONFIG
    formatter, runlog, console = Redactor(), RunLog(), logging.StreamHandler(sys.stderr)
    saved = LOG.level, LOG.propagate
    LOG.setLevel(logging.DEBUG if options.verbose else logging.INFO)
    LOG.propagate = False
    for handler in (runlog, console):
        handler.setFormatter(formatter)
        LOG.addHandler(handler)
    agent = Agent(options, formatter, runlog)
    try:
        return agent.run()
    except Exception as exc:   # every failure ends as a documented exit code
        code, message = exit_code_for(exc), str(exc) or type(exc).__name__
        if code in (EXIT_BUG, EXIT_UNCAUGHT):
            LOG.exception("internal error")
            message = "internal error: %s: %s" % (type(exc).__name__, message)
        LOG.error("failed (exit %d): %s", code, message)
        agent.fail(exc, message)
        return code
    finally:
        if agent.broker is not None:
            agent.broker.close()
        if agent.lock is not None:
            os.close(agent.lock)
        for handler in (runlog, console):
            LOG.removeHandler(handler)
            handler.close()
        LOG.setLevel(saved[0])
        LOG.propagate = saved[1]


def console_main():
    """Entry point of the ctxagent console script."""
    sys.exit(main(sys.argv[1:]))


if __name__ == "__main__":
    console_main()
