"""What the broker accepts: the one definition of every name, id and size rule.

The broker (ctxd/validate.py, ctxd/model.py, ctxd/api.py), the cluster-file reader and
ctxctl import these. ctxagent.py, which must stay one standard-library file, keeps its
own copy; tests/test_rules.py checks that the copy says the same. Patterns are matched
whole (``fullmatch``). docs/api.md and docs/cluster-file.md describe them for users.
"""

import re

# -- names and ids -----------------------------------------------------------

#: Group, role, data and deployer names. The first character is a letter or a digit,
#: so "." and ".." (or an option such as "-x") can never be a name.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
NAME_RULE = "1-64 of A-Z a-z 0-9 _ . - starting with a letter or digit"

#: Context and node ids: 128 random bits, URL-safe base64 (ctxd.tokens.new_id).
ID_RE = re.compile(r"[A-Za-z0-9_-]{22}")
ID_RULE = "22 characters of A-Z a-z 0-9 _ -"

#: A deployer's or a node's bearer token at most this long (ctxd.tokens).
MAX_TOKEN = 128

#: The secret an agent makes once per VM to prove it enrolled before.
INSTANCE_KEY_RE = re.compile(r"[A-Za-z0-9_-]{16,128}")

# -- what a node reports about itself ----------------------------------------

#: One RFC 1123 label: a short host name, or one part of a fully qualified one.
LABEL_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
MAX_FQDN = 253
#: Interface names as Linux spells them (at most 16 characters).
IFACE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@-]{0,15}")
MAX_INTERFACES = 64
MAX_ADDRESSES = 64  # per address family of one interface
#: SSH host key types ssh(1) accepts in known_hosts.
SSH_KEY_TYPES = (
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
)
SSH_KEY_B64_RE = re.compile(r"[A-Za-z0-9+/]+={0,2}")
MAX_SSH_KEY = 4096  # "TYPE BASE64", as stored
MAX_SSH_KEYS = 16
#: What one node may store about itself: its identity as compact JSON, in bytes.
MAX_IDENTITY = 16 * 1024

# -- contexts ----------------------------------------------------------------

MAX_CONTEXT_NAME = 128
MAX_GROUPS = 64
MAX_ROLES = 64  # provides, or requires, of one group
MAX_DATA_ITEMS = 64
MAX_VALUES = 1024  # of one data item
MAX_QUANTITY = 100_000
DAY = 86400
MIN_SECONDS = 60  # shortest expires_in and join_token_ttl
DEFAULT_EXPIRES_IN = 7 * DAY
MAX_EXPIRES_IN = 365 * DAY
DEFAULT_JOIN_TOKEN_TTL = DAY
#: A group's lease (a watching node silent this long departs), in seconds.
MIN_LEASE = 10
MAX_LEASE = 30 * DAY

# -- host credentials (docs/credentials.md) ------------------------------------

#: A host certificate's validity (X.509 or SSH), in seconds: an hour to 397 days (the
#: CA/Browser Forum's ceiling for TLS server certificates), 30 days unless the group says.
MIN_CERT_VALIDITY = 3600
MAX_CERT_VALIDITY = 397 * DAY
DEFAULT_CERT_VALIDITY = 30 * DAY
#: Which of a node's vetted names a group's certificates may carry: its identity's fqdn,
#: hostname (short) and primary_ip.
CERT_NAMES = ("fqdn", "hostname", "ip")
#: Where the agent puts a group's X.509 key, certificate and CA bundle unless it says.
CERT_PATHS = {
    "key": "/etc/ctxd/tls/host.key",
    "certificate": "/etc/ctxd/tls/host.crt",
    "bundle": "/etc/ctxd/tls/ca.pem",
}
MAX_PATH = 4096
#: A certificate signing request, as PEM, at most this long.
MAX_CSR = 16 * 1024

#: A context's ctx-scripts tree (the cluster file's ``scripts``): a gzip'd tar of at most this
#: many bytes (in base64 it must fit a create request of MAX_BODY with the rest of the cluster),
#: unpacking to at most MAX_SCRIPTS_UNPACKED bytes in at most MAX_SCRIPT_FILES entries.
MAX_SCRIPTS = 512 * 1024
MAX_SCRIPTS_UNPACKED = 16 * 1024 * 1024
MAX_SCRIPT_FILES = 1024

# -- requests ----------------------------------------------------------------

#: The largest request body, unless the site sets --max-body.
MAX_BODY = 1024 * 1024
#: The largest data file a cluster file may name: base64 makes it 4/3 larger, so a larger
#: one could never fit in a request of :data:`MAX_BODY` (and reading /dev/zero must not eat
#: memory). A request still too large with the rest of it is refused before it is sent.
MAX_DATA_FILE = 768 * 1024
#: The longest long-poll a node may ask for, in seconds (ctxd before 0.2: 60). An agent waits
#: 120 s by default: an idle node costs the broker a request every two minutes.
MAX_WAIT = 300
#: A node's report: its message and the tail of its log, in characters.
MAX_MESSAGE = 4096
MAX_LOG_TAIL = 65536


def is_name(value: object) -> bool:
    return isinstance(value, str) and NAME_RE.fullmatch(value) is not None


def is_id(value: object) -> bool:
    return isinstance(value, str) and ID_RE.fullmatch(value) is not None


def is_hostname(value: object) -> bool:
    return isinstance(value, str) and LABEL_RE.fullmatch(value) is not None


def is_fqdn(value: object) -> bool:
    """Dotted labels, at most :data:`MAX_FQDN` characters, the last one not all digits:
    resolvers read "10.0.0.1", "10.1" or "167772161" as addresses (inet_aton), and a
    name in a hosts line must be a name (RFC 1123: top-level labels are alphabetic)."""
    if not isinstance(value, str) or not 0 < len(value) <= MAX_FQDN:
        return False
    labels = value.split(".")
    return all(LABEL_RE.fullmatch(label) for label in labels) and not labels[-1].isdigit()


def is_ssh_key(value: object) -> bool:
    """``TYPE BASE64`` exactly (no comment) of a known type, at most :data:`MAX_SSH_KEY` long."""
    if not isinstance(value, str) or len(value) > MAX_SSH_KEY:
        return False
    kind, _, key = value.partition(" ")
    return kind in SSH_KEY_TYPES and SSH_KEY_B64_RE.fullmatch(key) is not None


def in_domain(fqdn: str, domain: str) -> bool:
    """Whether ``fqdn`` is ``domain`` or a name below it (names compare case-insensitively)."""
    fqdn, domain = fqdn.lower(), domain.lower()
    return fqdn == domain or fqdn.endswith("." + domain)


def is_vm_path(value: object) -> bool:
    """An absolute path on a VM without "." or ".." parts or control characters."""
    if not isinstance(value, str) or not 1 < len(value) <= MAX_PATH or not value.startswith("/"):
        return False
    parts = value.split("/")[1:]
    return value.isprintable() and all(p not in ("", ".", "..") for p in parts)


def ssh_ca_pattern(domain: str) -> str:
    """The host pattern of a context's ``@cert-authority`` line: its domain's names, or any
    host when it declares none (docs/credentials.md says why that trusts no more than the
    per-host lines would)."""
    return f"*.{domain}" if domain else "*"


def is_context_name(value: object) -> bool:
    """1 to :data:`MAX_CONTEXT_NAME` printable characters, not only spaces."""
    return (isinstance(value, str) and 0 < len(value) <= MAX_CONTEXT_NAME and value.isprintable()
            and bool(value.strip()))
