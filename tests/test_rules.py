"""One rule per limit: ctxagent.py's standard-library copy of ctxd/rules.py says the same,
and the broker's validators, ctxctl and the agent accept exactly the same values."""

import pytest

import ctxagent
from ctxd import rules, validate
from ctxd.errors import RequestError


def test_agent_patterns_are_the_brokers():
    """Every pattern and limit the agent checks a view with is the broker's, to the letter."""
    assert ctxagent.NAME.pattern == rules.NAME_RE.pattern
    assert ctxagent.ID.pattern == rules.ID_RE.pattern
    assert ctxagent.LABEL.pattern == rules.LABEL_RE.pattern
    assert ctxagent.IFACE.pattern == rules.IFACE_RE.pattern
    assert ctxagent.SSH_KEY_B64.pattern == rules.SSH_KEY_B64_RE.pattern
    assert ctxagent.SSH_KEY_TYPES == rules.SSH_KEY_TYPES
    assert ctxagent.SECRET.pattern == rules.INSTANCE_KEY_RE.pattern and rules.MAX_TOKEN == 128
    assert (ctxagent.MAX_FQDN, ctxagent.MAX_INTERFACES, ctxagent.MAX_ADDRESSES, ctxagent.MAX_SSH_KEY,
            ctxagent.MAX_SSH_KEYS) == (rules.MAX_FQDN, rules.MAX_INTERFACES, rules.MAX_ADDRESSES,
                                       rules.MAX_SSH_KEY, rules.MAX_SSH_KEYS)
    assert (ctxagent.MAX_MESSAGE, ctxagent.MAX_LOG_TAIL, ctxagent.MAX_WAIT) == (
        rules.MAX_MESSAGE, rules.MAX_LOG_TAIL, rules.MAX_WAIT)
    assert (ctxagent.MIN_LEASE, ctxagent.MAX_LEASE) == (rules.MIN_LEASE, rules.MAX_LEASE)
    assert (ctxagent.MAX_SCRIPTS, ctxagent.MAX_SCRIPTS_UNPACKED, ctxagent.MAX_SCRIPT_FILES) == (
        rules.MAX_SCRIPTS, rules.MAX_SCRIPTS_UNPACKED, rules.MAX_SCRIPT_FILES)


KEY = "AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"

# (kind, value, valid?) - edges of every rule, each must get the same answer everywhere.
TABLE = [
    ("name", "torquemaster", True), ("name", "0", True), ("name", "a..b", True), ("name", "x" * 64, True),
    ("name", "x" * 65, False), ("name", ".", False), ("name", "..", False), ("name", "-x", False),
    ("name", "_x", False), ("name", "a b", False), ("name", "a\n", False), ("name", "", False),
    ("name", "é", False), ("name", 7, False),
    ("id", "A" * 22, True), ("id", "a-_" + "b" * 19, True), ("id", "A" * 21, False), ("id", "A" * 23, False),
    ("id", "A" * 21 + "\n", False), ("id", "A" * 21 + "!", False),
    ("hostname", "head", True), ("hostname", "a", True), ("hostname", "a" * 63, True),
    ("hostname", "a" * 64, False), ("hostname", "-a", False), ("hostname", "a-", False),
    ("hostname", "a.b", False), ("hostname", "a_b", False), ("hostname", "", False), ("hostname", None, False),
    ("fqdn", "head.cluster.example.org", True), ("fqdn", "head", True), ("fqdn", "a1.b2", True),
    ("fqdn", "10.0.0.1", False), ("fqdn", "10.1", False), ("fqdn", "node.123", False), ("fqdn", "123", False),
    ("fqdn", "a..b", False), ("fqdn", ".a", False), ("fqdn", "a." * 125 + "abc", True),
    ("fqdn", "a." * 125 + "abcd", False), ("fqdn", "x\ny", False), ("fqdn", "", False),
    ("ssh_key", "ssh-ed25519 " + KEY, True), ("ssh_key", "ecdsa-sha2-nistp521 " + KEY, True),
    ("ssh_key", "sk-ssh-ed25519@openssh.com " + KEY, True), ("ssh_key", "ssh-dss " + KEY, False),
    ("ssh_key", "ssh-ed25519 " + KEY + " root@host", False), ("ssh_key", "ssh-ed25519\t" + KEY, False),
    ("ssh_key", "ssh-ed25519 " + KEY + "===", False), ("ssh_key", "ssh-ed25519", False),
    ("ssh_key", "ssh-rsa " + "A" * (4096 - 8), True), ("ssh_key", "ssh-rsa " + "A" * (4096 - 7), False),
]


def _broker_stores(kind, value):
    """The value as the broker stores it, or None if it refuses it. (Ids in paths are
    checked with rules.is_id itself.)"""
    check = {"name": validate.name, "hostname": validate.hostname, "fqdn": validate.fqdn,
             "ssh_key": validate.ssh_key, "id": lambda v, f: v if rules.is_id(v) else None}[kind]
    try:
        return check(value, "field")
    except RequestError:
        return None


def _agent_accepts(kind, value):
    check = {"name": ctxagent.check_name, "id": ctxagent.check_id, "hostname": ctxagent.check_hostname,
             "fqdn": ctxagent.check_fqdn, "ssh_key": ctxagent.check_ssh_key}[kind]
    try:
        check(value, "field")
    except ctxagent.InputError:
        return False
    return True


@pytest.mark.parametrize("kind, value, valid", TABLE, ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(TABLE)])
def test_broker_and_agent_accept_the_same(kind, value, valid):
    """What the broker accepts, every agent accepts; what it refuses, the agent refuses too."""
    assert getattr(rules, "is_" + kind)(value) is valid
    assert _agent_accepts(kind, value) is valid
    stored = _broker_stores(kind, value)
    if stored is not None:
        assert _agent_accepts(kind, stored), "the broker stored what an agent refuses"
    # The broker normalises only an SSH key's comment and white space away.
    normalised = rules.is_ssh_key(" ".join(value.split()[:2])) if kind == "ssh_key" else valid
    assert (stored is not None) is normalised


@pytest.mark.parametrize("raw", ["ssh-ed25519 " + KEY + " root@host", "ssh-ed25519\t" + KEY, " ssh-ed25519 " + KEY])
def test_broker_normalises_ssh_keys_to_what_agents_accept(raw):
    """A key with a comment or other white space is stored as "TYPE BASE64", which agents accept."""
    assert validate.ssh_key(raw, "k") == "ssh-ed25519 " + KEY
    assert _agent_accepts("ssh_key", validate.ssh_key(raw, "k"))
