"""Validation of everything that crosses the broker's trust boundary.

Each checker takes decoded JSON, returns a clean copy (only known keys, normalised
values) and raises :class:`ctxd.errors.RequestError` subclasses naming the field.
"""

import base64
import binascii
import hashlib
import hmac
import io
import ipaddress
import json
import re
import tarfile
import zlib
from typing import Any, Dict, List, Optional, Set

from ctxd import rules
from ctxd.errors import BadRequest, InvalidCluster, InvalidName

def name(value: Any, field: str) -> str:
    """A role, data or group name."""
    if not rules.is_name(value):
        raise InvalidName(f"{field}: {value!r:.80} is not a valid name ({rules.NAME_RE.pattern})")
    return value


def hostname(value: Any, field: str) -> str:
    """A short host name: one RFC 1123 label."""
    if not rules.is_hostname(value):
        raise BadRequest(f"{field}: {value!r:.80} is not a valid host name")
    return value


def fqdn(value: Any, field: str) -> str:
    """A fully qualified name (:func:`ctxd.rules.is_fqdn`; a trailing dot is dropped)."""
    if isinstance(value, str) and value.endswith("."):
        value = value[:-1]
    if not rules.is_fqdn(value):
        raise BadRequest(f"{field}: {value!r:.80} is not a valid domain name")
    return value


# A dotted quad as ipaddress writes it (no leading zeros): already canonical, so a join storm's
# addresses skip ipaddress's parser (a tenth of an enrollment's CPU).
_CANONICAL_IPV4 = re.compile(r"(?:(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}"
                             r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])")


def ip(value: Any, field: str) -> str:
    """An IPv4 or IPv6 address without a scope id, in canonical form (IPv6 ones, and only
    they, contain a colon)."""
    if not isinstance(value, str) or "%" in value:
        raise BadRequest(f"{field}: {value!r:.80} is not an IP address")
    if _CANONICAL_IPV4.fullmatch(value):
        return value
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise BadRequest(f"{field}: {value!r:.80} is not an IP address") from None


def ssh_key(value: Any, field: str) -> str:
    """An SSH public key ``TYPE BASE64`` (a comment, if any, is dropped)."""
    parts = value.split() if isinstance(value, str) and len(value) <= rules.MAX_SSH_KEY else []
    key = " ".join(parts[:2])
    if not rules.is_ssh_key(key):
        raise BadRequest(f"{field}: not an SSH public key")
    return key


def boolean(value: Any, field: str) -> bool:
    if not isinstance(value, bool):
        raise BadRequest(f"{field}: must be true or false")
    return value


def integer(value: Any, field: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BadRequest(f"{field}: must be an integer from {low} to {high}")
    return value


def string(value: Any, field: str, max_length: int) -> str:
    if not isinstance(value, str) or len(value) > max_length:
        raise BadRequest(f"{field}: must be a string of at most {max_length} characters")
    return value


def obj(value: Any, field: str, required=(), optional=()) -> Dict[str, Any]:
    """A JSON object with exactly these keys allowed (unknown keys are rejected)."""
    if not isinstance(value, dict):
        raise BadRequest(f"{field}: must be a JSON object")
    unknown = set(value) - set(required) - set(optional)
    if unknown:
        raise BadRequest(f"{field}: unknown field {sorted(unknown)[0]!r:.80}")
    for key in required:
        if key not in value:
            raise BadRequest(f"{field}: missing field {key!r}")
    return value


def array(value: Any, field: str, max_items: int) -> List[Any]:
    if not isinstance(value, list) or len(value) > max_items:
        raise BadRequest(f"{field}: must be a list of at most {max_items} items")
    return value


def data_values(value: Any, field: str, max_items: int = rules.MAX_VALUES) -> List[str]:
    """A list of ``{"b64": ...}`` data values; returns the canonical base64 strings."""
    out = []
    for i, item in enumerate(array(value, field, max_items)):
        item = obj(item, f"{field}[{i}]", required=("b64",))
        encoded = item["b64"]
        if not isinstance(encoded, str):
            raise BadRequest(f"{field}[{i}].b64: must be a base64 string")
        try:
            raw = base64.b64decode(encoded.encode("ascii"), validate=True)
        except (binascii.Error, ValueError, UnicodeEncodeError):
            raise BadRequest(f"{field}[{i}].b64: not valid base64") from None
        out.append(base64.b64encode(raw).decode("ascii"))
    return out


def identity(value: Any, field: str = "identity") -> Dict[str, Any]:
    """An agent-reported identity (see docs/api.md), normalised."""
    value = obj(
        value,
        field,
        required=("hostname", "fqdn", "primary_ip"),
        optional=("interfaces", "ssh_host_keys"),
    )
    interfaces = []
    for i, iface in enumerate(array(value.get("interfaces", []), f"{field}.interfaces", rules.MAX_INTERFACES)):
        where = f"{field}.interfaces[{i}]"
        iface = obj(iface, where, required=("name",), optional=("ipv4", "ipv6"))
        if not isinstance(iface["name"], str) or not rules.IFACE_RE.fullmatch(iface["name"]):
            raise BadRequest(f"{where}.name: not a valid interface name")
        v4 = [ip(a, f"{where}.ipv4") for a in array(iface.get("ipv4", []), f"{where}.ipv4", rules.MAX_ADDRESSES)]
        v6 = [ip(a, f"{where}.ipv6") for a in array(iface.get("ipv6", []), f"{where}.ipv6", rules.MAX_ADDRESSES)]
        if any(":" in a for a in v4) or not all(":" in a for a in v6):
            raise BadRequest(f"{where}: address listed under the wrong family")
        interfaces.append({"name": iface["name"], "ipv4": v4, "ipv6": v6})
    keys = [
        ssh_key(k, f"{field}.ssh_host_keys[{i}]")
        for i, k in enumerate(array(value.get("ssh_host_keys", []), f"{field}.ssh_host_keys", rules.MAX_SSH_KEYS))
    ]
    clean = {
        "hostname": hostname(value["hostname"], f"{field}.hostname"),
        "fqdn": fqdn(value["fqdn"], f"{field}.fqdn"),
        "primary_ip": peer_address(value["primary_ip"], f"{field}.primary_ip"),
        "interfaces": interfaces,
        "ssh_host_keys": keys,
    }
    size = len(json.dumps(clean, separators=(",", ":")))
    if size > rules.MAX_IDENTITY:
        raise BadRequest(f"{field}: {size} bytes of JSON, more than the {rules.MAX_IDENTITY} a node may store")
    return clean


def peer_address(value: Any, field: str) -> str:
    """An address peers can reach a node at: not link-local (the same on every VM, and
    useless without an interface), unspecified or multicast."""
    address = ip(value, field)
    parsed = ipaddress.ip_address(address)
    if parsed.is_link_local or parsed.is_unspecified or parsed.is_multicast:
        raise BadRequest(f"{field}: {address} cannot be a peer's address (link-local, unspecified or multicast)")
    return address


def cluster(body: Any) -> Dict[str, Any]:
    """A create-context request body (docs/cluster-file.md), validated; its clean form."""
    body = obj(
        body,
        "body",
        required=("name", "groups"),
        optional=("open_for_injection", "expires_in", "join_token_ttl", "data", "domain", "scripts"),
    )
    context_name = body["name"]
    if not rules.is_context_name(context_name):
        raise BadRequest(f"name: must be 1-{rules.MAX_CONTEXT_NAME} printable characters, not only spaces")
    open_ = boolean(body.get("open_for_injection", False), "open_for_injection")
    expires_in = integer(
        body.get("expires_in", rules.DEFAULT_EXPIRES_IN), "expires_in", rules.MIN_SECONDS, rules.MAX_EXPIRES_IN
    )
    join_ttl = integer(
        body.get("join_token_ttl", min(rules.DEFAULT_JOIN_TOKEN_TTL, expires_in)), "join_token_ttl",
        rules.MIN_SECONDS, expires_in
    )
    domain = fqdn(body["domain"], "domain").lower() if "domain" in body else ""
    data = _cluster_data(body.get("data", {}), open_)
    groups = []
    seen: Set[str] = set()
    for i, g in enumerate(array(body["groups"], "groups", rules.MAX_GROUPS)):
        groups.append(_cluster_group(g, f"groups[{i}]", data, seen))
    if not groups:
        raise InvalidCluster("groups: at least one group is needed", code="no_groups")
    provided = {role for g in groups for role in g["provides"]}
    for i, g in enumerate(groups):
        for r in g["requires"]:
            if r["role"] not in provided:
                raise InvalidCluster(
                    f"groups[{i}].requires: no group provides role {r['role']!r}", code="unknown_role"
                )
    _check_cycle(groups)
    for i, g in enumerate(groups):
        cert = g.get("certificate")
        if cert is not None and cert["issuer"] == "site" and (not domain or cert["names"] != ["fqdn"]):
            # The site's CA is trusted beyond this context: only names no other context can hold.
            raise InvalidCluster(
                f"groups[{i}].certificate: a site-issued certificate needs the context's domain and "
                'names = ["fqdn"] (short names and addresses repeat across contexts)'
            )
    clean = {
        "name": context_name,
        "open_for_injection": open_,
        "expires_in": expires_in,
        "join_token_ttl": join_ttl,
        "groups": groups,
        "data": data,
        "domain": domain,
    }
    if "scripts" in body:   # only then: the records of contexts without stay as they were
        clean["scripts"] = scripts(body["scripts"], "scripts")
    return clean


def scripts(value: Any, field: str) -> Dict[str, Any]:
    """A context's ctx-scripts tree: ``{"b64", "sha256"}`` of a gzip'd tar of regular files and
    directories with relative names (docs/cluster-file.md), checked whole by the rules every agent
    applies (ctxagent.read_scripts); its clean form adds ``size``."""
    value = obj(value, field, required=("b64", "sha256"))
    packed = _b64(value["b64"], f"{field}.b64", rules.MAX_SCRIPTS)
    if len(packed) > rules.MAX_SCRIPTS:
        raise BadRequest(f"{field}.b64: must be base64 of at most {rules.MAX_SCRIPTS} bytes")
    claimed = value["sha256"]
    if not isinstance(claimed, str) or not SHA256_RE.fullmatch(claimed):
        raise BadRequest(f"{field}.sha256: must be 64 hexadecimal digits")
    digest = hashlib.sha256(packed).hexdigest()
    if not hmac.compare_digest(digest, claimed.lower()):
        raise BadRequest(f"{field}.sha256: is not the SHA-256 of the tree ({digest})")
    problem = scripts_problem(packed)
    if problem:
        raise InvalidCluster(f"{field}: {problem}")
    return {"b64": value["b64"], "sha256": digest, "size": len(packed)}


SHA256_RE = re.compile(r"[0-9a-fA-F]{64}")


def scripts_problem(packed: bytes) -> Optional[str]:
    """What makes a packed ctx-scripts tree one an agent refuses, or None. The agent's rules
    (ctxagent.read_scripts), the same ones: inflated first with a bound (contents and tar headers:
    tarfile never inflates more), then regular files and directories only, relative printable
    names without ".." parts, no file where a directory must be, at most MAX_SCRIPT_FILES entries
    and MAX_SCRIPTS_UNPACKED bytes; and names a file system takes (at most 1024 characters, 255 a
    part), which the agent would find out only when it writes."""
    limit = 2 * rules.MAX_SCRIPTS_UNPACKED
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        raw = inflater.decompress(packed, limit + 1)
    except zlib.error as e:
        return f"not a gzip'd tar (corrupt gzip data: {e})"
    if len(raw) > limit or not inflater.eof:
        return f"it inflates to more than {limit} bytes, or its gzip data is truncated"
    total, count = 0, 0
    files, entries = set(), []
    try:
        with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tar:
            for member in tar:
                name = member.name
                parts = tuple(part for part in name.split("/") if part not in ("", "."))
                count, total = count + 1, total + member.size
                if count > rules.MAX_SCRIPT_FILES or total > rules.MAX_SCRIPTS_UNPACKED:
                    return f"more than {rules.MAX_SCRIPT_FILES} entries or {rules.MAX_SCRIPTS_UNPACKED} bytes"
                if not (member.isfile() and parts or member.isdir()) or name.startswith("/") or ".." in parts \
                        or not name.isprintable() or len(name) > 1024 or any(len(p) > 255 for p in parts):
                    return f"{name[:80]!r} is not a regular file or a directory with a relative name"
                if member.isfile():
                    files.add(parts)
                entries.append((parts, member.isfile()))
    except (tarfile.TarError, ValueError, OSError, EOFError) as e:
        return f"not a tar ({e})"
    for parts, isfile in entries:
        if any(parts[:i] in files for i in range(1, len(parts) + (not isfile))):
            return f"{'/'.join(parts)[:80]!r} is below a file, or both a file and a directory"
    return None


def _b64(value: Any, field: str, limit: int) -> bytes:
    if not isinstance(value, str) or len(value) > (limit + 2) // 3 * 4:
        raise BadRequest(f"{field}: must be base64 of at most {limit} bytes")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{field}: not valid base64") from None


def _cluster_data(data_in: Any, open_for_injection: bool) -> Dict[str, List[str]]:
    if not isinstance(data_in, dict):
        raise BadRequest("data: must be a JSON object")
    if len(data_in) > rules.MAX_DATA_ITEMS:
        raise BadRequest(f"data: at most {rules.MAX_DATA_ITEMS} items")
    data = {}
    for key, values in data_in.items():
        name(key, f"data name {key!r:.80}")
        data[key] = data_values(values, f"data.{key}")
        if not data[key] and not open_for_injection:
            raise InvalidCluster(
                f"data.{key}: has no value, and the context is not open for injection", code="missing_data"
            )
    return data


def _cluster_group(g: Any, where: str, data: Dict[str, List[str]], seen: Set[str]) -> Dict[str, Any]:
    """One group of a create request; ``seen`` collects the group names so far."""
    g = obj(g, where, required=("name", "quantity"),
            optional=("provides", "requires", "data", "all_identities", "source_check", "lease", "watch",
                      "certificate", "ssh_certificate"))
    gname = name(g["name"], f"{where}.name")
    if gname in seen:
        raise InvalidCluster(f"{where}.name: duplicate group {gname!r}", code="duplicate_group")
    seen.add(gname)
    requires = []
    for j, r in enumerate(array(g.get("requires", []), f"{where}.requires", rules.MAX_ROLES)):
        r = obj(r, f"{where}.requires[{j}]", required=("role",), optional=("ready",))
        requires.append(
            {
                "role": name(r["role"], f"{where}.requires[{j}].role"),
                "ready": boolean(r.get("ready", False), f"{where}.requires[{j}].ready"),
            }
        )
    if len({r["role"] for r in requires}) != len(requires):
        raise InvalidCluster(f"{where}.requires: a role is listed twice", code="duplicate_role")
    provides = _names(g.get("provides", []), f"{where}.provides", rules.MAX_ROLES)
    gdata = _names(g.get("data", []), f"{where}.data", rules.MAX_DATA_ITEMS)
    for d in gdata:
        if d not in data:
            raise InvalidCluster(f"{where}.data: {d!r} is not declared in data", code="unknown_data")
    group = {
        "name": gname,
        "quantity": integer(g["quantity"], f"{where}.quantity", 1, rules.MAX_QUANTITY),
        "provides": sorted(set(provides)),
        "requires": requires,
        "data": sorted(set(gdata)),
        "all_identities": boolean(g.get("all_identities", False), f"{where}.all_identities"),
        "source_check": boolean(g.get("source_check", True), f"{where}.source_check"),
        "lease": lease(g.get("lease"), f"{where}.lease"),
        # Whether its agents run in watch mode (ctxctl's user-data): a leased group's must.
        "watch": boolean(g.get("watch", g.get("lease") is not None), f"{where}.watch"),
    }
    # Only when opted in: the records of groups without them stay as they were.
    if "certificate" in g:
        group["certificate"] = certificate(g["certificate"], f"{where}.certificate")
    if "ssh_certificate" in g:
        group["ssh_certificate"] = ssh_certificate(g["ssh_certificate"], f"{where}.ssh_certificate")
    return group


def certificate(value: Any, field: str) -> Dict[str, Any]:
    """A group's X.509 host certificate (docs/cluster-file.md), defaults filled in."""
    value = obj(value, field, optional=("names", "validity", "key", "certificate", "bundle", "ca_dir", "issuer"))
    names = array(value.get("names", list(rules.CERT_NAMES)), f"{field}.names", len(rules.CERT_NAMES))
    if not names or any(n not in rules.CERT_NAMES for n in names) or len(set(names)) != len(names):
        raise InvalidCluster(f"{field}.names: one or more of {', '.join(rules.CERT_NAMES)}, each once")
    issuer = value.get("issuer", "context")
    if issuer not in ("context", "site"):
        raise InvalidCluster(f"{field}.issuer: must be \"context\" or \"site\"")
    spec = {"names": names, "validity": _validity(value, field), "issuer": issuer}
    for key, default in rules.CERT_PATHS.items():
        spec[key] = vm_path(value.get(key, default), f"{field}.{key}")
    ca_dir = value.get("ca_dir")
    spec["ca_dir"] = None if ca_dir is None else vm_path(ca_dir, f"{field}.ca_dir")
    paths = [spec[k] for k in ("key", "certificate", "bundle")]
    if len(set(paths)) != len(paths):
        raise InvalidCluster(f"{field}: key, certificate and bundle must be three different files")
    return spec


def ssh_certificate(value: Any, field: str) -> Dict[str, Any]:
    """A group's SSH host certificates (docs/cluster-file.md), defaults filled in."""
    value = obj(value, field, optional=("validity", "sshd"))
    return {"validity": _validity(value, field), "sshd": boolean(value.get("sshd", False), f"{field}.sshd")}


def _validity(value: Dict[str, Any], field: str) -> int:
    return integer(value.get("validity", rules.DEFAULT_CERT_VALIDITY), f"{field}.validity",
                   rules.MIN_CERT_VALIDITY, rules.MAX_CERT_VALIDITY)


def vm_path(value: Any, field: str) -> str:
    """An absolute path on a VM (:func:`ctxd.rules.is_vm_path`)."""
    if not rules.is_vm_path(value):
        raise InvalidCluster(f"{field}: {value!r:.80} is not an absolute path without . or .. parts")
    return value


def lease(value: Any, field: str) -> Optional[int]:
    """A group's lease in seconds (None: no lease)."""
    if value is None:
        return None
    return integer(value, field, rules.MIN_LEASE, rules.MAX_LEASE)


def _names(value: Any, field: str, max_items: int) -> List[str]:
    return [name(item, f"{field}[{j}]") for j, item in enumerate(array(value, field, max_items))]


def _check_cycle(groups: List[Dict[str, Any]]) -> None:
    """Reject ready-requirements that form a cycle (they would deadlock)."""
    providers: Dict[str, List[str]] = {}
    for g in groups:
        for role in g["provides"]:
            providers.setdefault(role, []).append(g["name"])
    edges: Dict[str, List[str]] = {g["name"]: [] for g in groups}
    for g in groups:
        for r in g["requires"]:
            if r["ready"]:
                for p in providers[r["role"]]:
                    if p not in edges[g["name"]]:
                        edges[g["name"]].append(p)
    colour = {name: _WHITE for name in edges}
    for name in edges:
        if colour[name] == _WHITE:
            _visit(name, edges, colour, [])


_WHITE, _GREY, _BLACK = 0, 1, 2


def _visit(name: str, edges: Dict[str, List[str]], colour: Dict[str, int], stack: List[str]) -> None:
    """Depth-first search of :func:`_check_cycle`. (A module function, not a closure that
    refers to itself: that would leave a reference cycle behind on every create.)"""
    colour[name] = _GREY
    stack.append(name)
    for nxt in edges[name]:
        if colour[nxt] == _GREY:
            cycle = stack[stack.index(nxt):] + [nxt]
            raise InvalidCluster(
                "ready requirements form a cycle: " + " -> ".join(cycle),
                code="ready_cycle",
            )
        if colour[nxt] == _WHITE:
            _visit(nxt, edges, colour, stack)
    stack.pop()
    colour[name] = _BLACK
