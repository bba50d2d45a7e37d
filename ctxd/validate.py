"""Validation of everything that crosses the broker's trust boundary.

Each checker takes decoded JSON, returns a clean copy (only known keys, normalised
values) and raises :class:`ctxd.errors.RequestError` subclasses naming the field.
"""

import base64
import binascii
import ipaddress
from typing import Any, Dict, List

from ctxd import rules
from ctxd.errors import BadRequest, InvalidName

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


def ip(value: Any, field: str) -> str:
    """An IPv4 or IPv6 address without a scope id, in canonical form."""
    if not isinstance(value, str) or "%" in value:
        raise BadRequest(f"{field}: {value!r:.80} is not an IP address")
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
        if any(ipaddress.ip_address(a).version != 4 for a in v4) or any(
            ipaddress.ip_address(a).version != 6 for a in v6
        ):
            raise BadRequest(f"{where}: address listed under the wrong family")
        interfaces.append({"name": iface["name"], "ipv4": v4, "ipv6": v6})
    keys = [
        ssh_key(k, f"{field}.ssh_host_keys[{i}]")
        for i, k in enumerate(array(value.get("ssh_host_keys", []), f"{field}.ssh_host_keys", rules.MAX_SSH_KEYS))
    ]
    return {
        "hostname": hostname(value["hostname"], f"{field}.hostname"),
        "fqdn": fqdn(value["fqdn"], f"{field}.fqdn"),
        "primary_ip": ip(value["primary_ip"], f"{field}.primary_ip"),
        "interfaces": interfaces,
        "ssh_host_keys": keys,
    }
