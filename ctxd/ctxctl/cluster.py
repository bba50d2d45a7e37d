"""Cluster files: the TOML a deployer writes, turned into a ``POST /v1/contexts`` body.

docs/cluster-file.md is the reference of the format: every key, its default and every
error. The rules on names and sizes are ctxd.rules', shared with the broker. The body is
then checked with the broker's own validation (ctxd.validate.cluster: ready-requirement
cycles, the scripts tree), so that what the broker would refuse is refused before anything
is created; the broker checks it again, and alone checks its quotas.

Every problem is reported as ONE line naming the field, e.g.
``cluster.toml: group[1].quantity: must be an integer >= 1``. Group and list
indexes count from 0, like the JSON paths in the broker's errors.

This module is pure apart from reading the data files (through a callable that
tests replace); it never imports Twisted.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from typing import Any, Callable, Dict, List, Mapping, Optional

from ctxd import rules, validate
from ctxd.ctxctl.scripts import ScriptsError, pack_tree
from ctxd.errors import RequestError
from ctxd.rules import MAX_DATA_ITEMS, MAX_GROUPS, MAX_QUANTITY, MAX_ROLES, MAX_VALUES

try:
    import tomllib
except ImportError:  # Python < 3.11; setup.py installs tomli there.
    import tomli as tomllib  # type: ignore[no-redef]

__all__ = [
    "ClusterFileError",
    "load_cluster_file",
    "parse_cluster_text",
    "build_create_request",
    "parse_duration",
    "DURATION_RULE",
]

_TOP_KEYS = ("name", "open_for_injection", "expires_in", "join_token_ttl", "domain", "group", "data", "scripts")
_GROUP_KEYS = ("name", "quantity", "provides", "requires", "data", "all_identities", "certificate",
               "ssh_certificate", "source_check", "lease", "watch")
_REQUIRE_KEYS = ("role", "ready")
_DATA_KEYS = ("file", "files", "value", "inject")
_CERTIFICATE_KEYS = ("names", "validity", "key", "certificate", "bundle", "ca_dir", "issuer")
_SSH_CERTIFICATE_KEYS = ("validity", "sshd")
_ISSUERS = ("context", "site")

ReadFile = Callable[[str], bytes]
#: Packs the scripts directory a cluster file names (as written there) into a gzip'd tar.
PackScripts = Callable[[str], bytes]


class ClusterFileError(Exception):
    """A cluster file that cannot be turned into a create request; ``str()`` is one line."""


_JSON_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*(?:\[[0-9]+\](?:\.[A-Za-z_][A-Za-z0-9_.-]*)?)*")
_DURATION_RE = re.compile(r"([0-9]{1,12})([smhd]?)")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
DURATION_RULE = 'a number of seconds, or a number with a unit s, m, h or d, e.g. "90s", "10m", "12h", "30d"'


def parse_duration(text: str) -> int:
    """The seconds ``text`` says: "45s", "90m", "12h", "30d" or a plain number of seconds.

    ValueError for anything else (a sign, a fraction, spaces, two units such as "1h30m"):
    a duration in a cluster file or on the command line is read one way only.
    """
    m = _DURATION_RE.fullmatch(text) if isinstance(text, str) else None
    if m is None:
        raise ValueError(f"{_short(str(text))} is not a duration: {DURATION_RULE}")
    return int(m.group(1)) * _UNIT_SECONDS[m.group(2)]


def load_cluster_file(path: str) -> Dict[str, Any]:
    """Read the cluster file at ``path`` and return the ``POST /v1/contexts`` body.

    Data files are read relative to the directory of ``path``. Error messages
    start with ``path`` as given.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except (OSError, ValueError) as e:
        raise ClusterFileError(f"{path}: cannot read: {_os_reason(e)}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ClusterFileError(f"{path}: not UTF-8 text (byte {e.start})") from None
    base_dir = os.path.dirname(os.path.abspath(path))
    return parse_cluster_text(text, label=path, read_file=_file_reader(base_dir),
                              pack_scripts=_scripts_packer(base_dir))


def parse_cluster_text(text: str, label: str = "cluster.toml",
                       read_file: Optional[ReadFile] = None,
                       pack_scripts: Optional[PackScripts] = None) -> Dict[str, Any]:
    """Parse TOML ``text`` and return the create-request body (see :func:`build_create_request`)."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ClusterFileError(f"{label}: invalid TOML: {_one_line(str(e))}") from None
    except (ValueError, TypeError, RecursionError) as e:  # pragma: no cover - defensive
        raise ClusterFileError(f"{label}: invalid TOML: {_one_line(str(e))}") from None
    return build_create_request(document, label=label, read_file=read_file, pack_scripts=pack_scripts)


def build_create_request(document: Mapping[str, Any], label: str = "cluster.toml",
                         read_file: Optional[ReadFile] = None,
                         pack_scripts: Optional[PackScripts] = None) -> Dict[str, Any]:
    """Validate a parsed cluster document and build the create-request body.

    ``read_file(path)`` returns a data file's bytes (``path`` as written in the
    cluster file); it defaults to reading relative to the current directory, and so
    does ``pack_scripts(path)``, which packs the ``scripts`` directory. The body spells
    out every default but ``expires_in`` and ``join_token_ttl``, which the broker fills
    in (docs/cluster-file.md).
    """
    if read_file is None:
        read_file = _file_reader(os.getcwd())
    if pack_scripts is None:
        pack_scripts = _scripts_packer(os.getcwd())
    v = _Validator(label)
    if not isinstance(document, Mapping):
        raise v.error("", "must be a table")
    v.reject_unknown("", document, _TOP_KEYS)

    body: Dict[str, Any] = {"name": v.context_name("name", document.get("name"))}
    open_for_injection = v.boolean("open_for_injection", document.get("open_for_injection", False))
    body["open_for_injection"] = open_for_injection

    expires_in = document.get("expires_in")
    if expires_in is not None:
        body["expires_in"] = v.integer("expires_in", expires_in, rules.MIN_SECONDS, rules.MAX_EXPIRES_IN,
                                       unit=" (seconds)")
    ttl = document.get("join_token_ttl")
    if ttl is not None:
        body["join_token_ttl"] = v.integer("join_token_ttl", ttl, rules.MIN_SECONDS, rules.MAX_EXPIRES_IN,
                                           unit=" (seconds)")
        if expires_in is not None and body["join_token_ttl"] > body["expires_in"]:
            raise v.error("join_token_ttl", f"must not exceed expires_in ({body['expires_in']})")
        if expires_in is None and body["join_token_ttl"] > rules.DEFAULT_EXPIRES_IN:
            raise v.error("join_token_ttl", f"must not exceed expires_in, which is not in the file: its default "
                                            f"is {rules.DEFAULT_EXPIRES_IN} (7 days)")

    domain = document.get("domain")
    if domain is not None:
        if not isinstance(domain, str) or not rules.is_fqdn(domain.rstrip(".")):
            raise v.error("domain", f"{_short(str(domain))} is not a domain name (dotted labels, the last "
                                    "not all digits)")
        body["domain"] = domain.rstrip(".").lower()
    data = _data_items(v, document.get("data", {}), open_for_injection, read_file)
    body["groups"] = _groups(v, document.get("group"), data, body.get("domain"))
    body["data"] = data
    if "scripts" in document:
        # Sent only when given: a broker older than scripts refuses the key.
        body["scripts"] = v.scripts("scripts", document["scripts"], pack_scripts)
    try:
        # The broker's own checks of the body, here before anything is created (the cycles
        # of ready requirements are found only there); its messages use the body's JSON paths.
        validate.cluster(body)
    except RequestError as e:
        if e.code == "ready_cycle":
            raise v.error("group", f"{e.message}: each of these groups waits for the next to be ok, so none "
                                   "ever is (make one of these requirements ready = false)") from None
        # "groups[1].lease: ..." names the field as the request does: as the file does, if it can.
        path, _, problem = e.message.partition(": ")
        if problem and _JSON_PATH.fullmatch(path) and not path.startswith("body"):
            raise v.error(re.sub(r"^groups\[", "group[", path), f"{problem} (the broker's rule)") from None
        raise v.error("", f"the broker would refuse it: {e.message}") from None
    return body


def _groups(v: "_Validator", raw: Any, data: Mapping[str, Any], domain: Optional[str]) -> List[Dict[str, Any]]:
    if raw is None:
        raise v.error("group", "at least one [[group]] is required")
    if not isinstance(raw, list) or not all(isinstance(g, Mapping) for g in raw):
        raise v.error("group", "must be an array of tables ([[group]])")
    if not raw:
        raise v.error("group", "at least one [[group]] is required")
    if len(raw) > MAX_GROUPS:
        raise v.error("group", f"at most {MAX_GROUPS} groups (got {len(raw)})")

    groups: List[Dict[str, Any]] = []
    seen: Dict[str, int] = {}
    for i, g in enumerate(raw):
        where = f"group[{i}]"
        v.reject_unknown(where, g, _GROUP_KEYS)
        name = v.name(f"{where}.name", g.get("name"), required=True)
        if name in seen:
            raise v.error(f"{where}.name", f"duplicate group name {name!r} (also group[{seen[name]}])")
        seen[name] = i
        if "quantity" not in g:
            raise v.error(f"{where}.quantity", f"is required (an integer 1..{MAX_QUANTITY})")
        quantity = v.integer(f"{where}.quantity", g["quantity"], 1, MAX_QUANTITY)
        provides = v.name_list(f"{where}.provides", g.get("provides", []), MAX_ROLES)
        requires = _requires(v, where, g.get("requires", []))
        group_data = v.name_list(f"{where}.data", g.get("data", []), MAX_DATA_ITEMS)
        for j, item in enumerate(group_data):
            if item not in data:
                raise v.error(f"{where}.data[{j}]", f"{item!r} is not declared in [data]")
        group: Dict[str, Any] = {
            "name": name,
            "quantity": quantity,
            "provides": provides,
            "requires": requires,
            "data": group_data,
            "all_identities": v.boolean(f"{where}.all_identities", g.get("all_identities", False)),
            "source_check": v.boolean(f"{where}.source_check", g.get("source_check", True)),
        }
        if "lease" in g:
            # Sent only when given: a broker older than leases refuses the key.
            group["lease"] = v.lease(f"{where}.lease", g["lease"], name)
        if "watch" in g:
            group["watch"] = v.boolean(f"{where}.watch", g["watch"])
            if "lease" in g and not group["watch"]:
                raise v.error(f"{where}.watch", f"group {name!r} has a lease: its agents must watch "
                                                "(a node that does not watch is never heard from)")
        # Host credentials: sent only when opted in (a broker older than them refuses the keys).
        if "certificate" in g:
            group["certificate"] = _certificate(v, f"{where}.certificate", g["certificate"], name, domain)
        if "ssh_certificate" in g:
            group["ssh_certificate"] = _ssh_certificate(v, f"{where}.ssh_certificate", g["ssh_certificate"], name)
        groups.append(group)

    provided = {role for g in groups for role in g["provides"]}
    for i, g in enumerate(groups):
        for j, req in enumerate(g["requires"]):
            if req["role"] not in provided:
                raise v.error(f"group[{i}].requires[{j}].role",
                              f"no group provides role {req['role']!r}")
    # Ready-requirement cycles: ctxd.validate.cluster's check (one implementation of that
    # rule), run on the whole body by build_create_request.
    return groups


def _certificate(v: "_Validator", field: str, raw: Any, group: str, domain: Optional[str]) -> Dict[str, Any]:
    """A group's ``[group.certificate]`` table as the broker's JSON, every default written out."""
    if not isinstance(raw, Mapping):
        raise v.error(field, "must be a table: [group.certificate] after the group's [[group]] line")
    v.reject_unknown(field, raw, _CERTIFICATE_KEYS)
    names = raw.get("names", list(rules.CERT_NAMES))
    choices = ", ".join(f'"{n}"' for n in rules.CERT_NAMES)
    if not isinstance(names, list) or not names:
        raise v.error(f"{field}.names", f"must be a non-empty array of {choices}, e.g. [\"fqdn\"]")
    for i, item in enumerate(names):
        if item not in rules.CERT_NAMES:
            shown = f"{_short(item)} is not" if isinstance(item, str) else "must be"
            raise v.error(f"{field}.names[{i}]", f"{shown} one of {choices}")
        if item in names[:i]:
            raise v.error(f"{field}.names[{i}]", f"{item!r} is listed twice")
    issuer = raw.get("issuer", "context")
    if issuer not in _ISSUERS:
        shown = f"{_short(issuer)} is not" if isinstance(issuer, str) else "must be"
        raise v.error(f"{field}.issuer", f"{shown} \"context\" (the context's own CA) or \"site\" "
                                         "(the broker's site CA)")
    # The site's CA is trusted beyond this context: it signs only names no other context can hold.
    if issuer == "site" and domain is None:
        raise v.error(f"{field}.issuer", f'"site" needs the context\'s domain (domain = "..." at the top of the '
                                         f"file): the site's CA signs only names in it (group {group!r})")
    if issuer == "site" and names != ["fqdn"]:
        raise v.error(f"{field}.issuer", '"site" needs names = ["fqdn"]: short names and addresses repeat '
                                         f"across contexts (group {group!r})")
    spec: Dict[str, Any] = {"names": list(names),
                            "validity": v.validity(f"{field}.validity", raw.get("validity"), group)}
    for key, default in rules.CERT_PATHS.items():
        spec[key] = v.vm_path(f"{field}.{key}", raw.get(key, default))
    spec["ca_dir"] = None if raw.get("ca_dir") is None else v.vm_path(f"{field}.ca_dir", raw["ca_dir"])
    spec["issuer"] = issuer
    seen: Dict[str, str] = {}
    for key in rules.CERT_PATHS:
        if spec[key] in seen:
            raise v.error(f"{field}.{key}", f"{_short(spec[key])} is also the {seen[spec[key]]}: key, certificate "
                                            "and bundle must be three different files")
        seen[spec[key]] = key
    return spec


def _ssh_certificate(v: "_Validator", field: str, raw: Any, group: str) -> Dict[str, Any]:
    """A group's ``[group.ssh_certificate]`` table as the broker's JSON, every default written out."""
    if not isinstance(raw, Mapping):
        raise v.error(field, "must be a table: [group.ssh_certificate] after the group's [[group]] line")
    v.reject_unknown(field, raw, _SSH_CERTIFICATE_KEYS)
    return {"validity": v.validity(f"{field}.validity", raw.get("validity"), group),
            "sshd": v.boolean(f"{field}.sshd", raw.get("sshd", False))}


def _requires(v: "_Validator", where: str, raw: Any) -> List[Dict[str, Any]]:
    field = f"{where}.requires"
    if not isinstance(raw, list):
        raise v.error(field, 'must be an array of tables, e.g. [{ role = "torquemaster", ready = true }]')
    if len(raw) > MAX_ROLES:
        raise v.error(field, f"at most {MAX_ROLES} required roles (got {len(raw)})")
    out: List[Dict[str, Any]] = []
    seen = set()
    for j, r in enumerate(raw):
        item = f"{field}[{j}]"
        if not isinstance(r, Mapping):
            raise v.error(item, 'must be a table, e.g. { role = "torquemaster", ready = true }')
        v.reject_unknown(item, r, _REQUIRE_KEYS)
        role = v.name(f"{item}.role", r.get("role"), required=True)
        if role in seen:
            raise v.error(f"{item}.role", f"role {role!r} is required twice")
        seen.add(role)
        out.append({"role": role, "ready": v.boolean(f"{item}.ready", r.get("ready", False))})
    return out


def _data_items(v: "_Validator", raw: Any, open_for_injection: bool,
                read_file: ReadFile) -> Dict[str, List[Dict[str, str]]]:
    if not isinstance(raw, Mapping):
        raise v.error("data", 'must be a table, e.g. [data] gridmap = { file = "grid-mapfile" }')
    if len(raw) > MAX_DATA_ITEMS:
        raise v.error("data", f"at most {MAX_DATA_ITEMS} data items (got {len(raw)})")
    out: Dict[str, List[Dict[str, str]]] = {}
    for name, spec in raw.items():
        field = f"data.{name}"
        if not rules.is_name(name):
            raise v.error(field, f"invalid data name: must match {rules.NAME_RE.pattern}")
        if not isinstance(spec, Mapping):
            raise v.error(field, 'must be a table: { file = "PATH" }, { files = [...] }, '
                                 '{ value = "TEXT" } or { inject = true }')
        v.reject_unknown(field, spec, _DATA_KEYS)
        sources = [k for k in ("file", "files", "value") if k in spec]
        if len(sources) > 1:
            raise v.error(field, f"give only one of file, files, value (got {', '.join(sources)})")
        inject = v.boolean(f"{field}.inject", spec.get("inject", not sources))
        if sources and inject:
            raise v.error(f"{field}.inject", f"cannot be combined with {sources[0]}")
        if not sources:
            if not inject:
                raise v.error(field, "needs file, files or value (or inject = true)")
            if not open_for_injection:
                raise v.error(field, "has no value; that is only allowed with open_for_injection = true")
            out[name] = []
            continue
        kind = sources[0]
        if kind == "value":
            text = spec["value"]
            if not isinstance(text, str):
                raise v.error(f"{field}.value", "must be a string")
            out[name] = [_b64(v, f"{field}.value", text)]
        elif kind == "file":
            out[name] = [v.read(f"{field}.file", spec["file"], read_file)]
        else:
            files = spec["files"]
            if not isinstance(files, list) or not files:
                raise v.error(f"{field}.files", "must be a non-empty array of paths")
            if len(files) > MAX_VALUES:
                raise v.error(f"{field}.files", f"at most {MAX_VALUES} files (got {len(files)})")
            out[name] = [v.read(f"{field}.files[{k}]", p, read_file) for k, p in enumerate(files)]
    return out


class _Validator:
    """Field checks that raise :class:`ClusterFileError` with ``LABEL: FIELD: PROBLEM``."""

    def __init__(self, label: str) -> None:
        self.label = label

    def error(self, field: str, problem: str) -> ClusterFileError:
        where = f"{self.label}: {field}" if field else self.label
        return ClusterFileError(_one_line(f"{where}: {problem}"))

    def reject_unknown(self, field: str, table: Mapping[Any, Any], allowed: tuple) -> None:
        for key in table:
            if key not in allowed:
                path = f"{field}.{_key(key)}" if field else _key(key)
                raise self.error(path, f"unknown key (allowed: {', '.join(allowed)})")

    def name(self, field: str, value: Any, required: bool = False) -> str:
        if value is None and required:
            raise self.error(field, "is required")
        if not isinstance(value, str):
            raise self.error(field, "must be a string")
        if not rules.is_name(value):
            raise self.error(field, f"{_short(value)} is not a valid name: {rules.NAME_RULE}")
        return value

    def context_name(self, field: str, value: Any) -> str:
        if value is None:
            raise self.error(field, "is required")
        if not isinstance(value, str):
            raise self.error(field, "must be a string")
        if not rules.is_context_name(value):
            raise self.error(field, f"must be 1-{rules.MAX_CONTEXT_NAME} printable characters, not only spaces")
        return value

    def name_list(self, field: str, value: Any, limit: int) -> List[str]:
        if not isinstance(value, list):
            raise self.error(field, 'must be an array of names, e.g. ["torquemaster"]')
        if len(value) > limit:
            raise self.error(field, f"at most {limit} names (got {len(value)})")
        names = [self.name(f"{field}[{i}]", item) for i, item in enumerate(value)]
        for i, item in enumerate(names):
            if item in names[:i]:
                raise self.error(f"{field}[{i}]", f"{item!r} is listed twice")
        return names

    def boolean(self, field: str, value: Any) -> bool:
        if not isinstance(value, bool):
            raise self.error(field, "must be true or false")
        return value

    def integer(self, field: str, value: Any, low: int, high: int, unit: str = "") -> int:
        # bool is an int subclass in Python; `quantity = true` is still a mistake.
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise self.error(field, f"must be an integer >= {low}{unit}")
        if value > high:
            raise self.error(field, f"must be an integer <= {high}{unit}")
        return value

    def lease(self, field: str, value: Any, group: str) -> int:
        """A group's lease: a duration string or an integer of seconds, MIN_LEASE..MAX_LEASE."""
        seconds = self._duration(field, value, group, "10m")
        if not rules.MIN_LEASE <= seconds <= rules.MAX_LEASE:
            raise self.error(field, f"the lease of group {group!r} must be from {rules.MIN_LEASE} s to "
                                    f"{rules.MAX_LEASE // rules.DAY} days, not {_shown(value)}")
        return seconds

    def validity(self, field: str, value: Any, group: str) -> int:
        """A host certificate's validity: a duration string or an integer of seconds, one hour to
        397 days; None: the default, 30 days."""
        if value is None:
            return rules.DEFAULT_CERT_VALIDITY
        seconds = self._duration(field, value, group, "30d")
        if not rules.MIN_CERT_VALIDITY <= seconds <= rules.MAX_CERT_VALIDITY:
            raise self.error(field, f"a certificate of group {group!r} is valid from "
                                    f"{rules.MIN_CERT_VALIDITY // 3600} h to {rules.MAX_CERT_VALIDITY // rules.DAY} "
                                    f"days, not {_shown(value)}")
        return seconds

    def _duration(self, field: str, value: Any, group: str, example: str) -> int:
        """Seconds: from a duration string (parse_duration) or an integer."""
        if isinstance(value, str):
            try:
                return parse_duration(value)
            except ValueError as e:
                raise self.error(field, f"{e} (group {group!r})") from None
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise self.error(field, f'must be a duration such as "{example}" or an integer of seconds (group {group!r})')

    def vm_path(self, field: str, value: Any) -> str:
        """An absolute path on the VMs (ctxd.rules.is_vm_path)."""
        if not isinstance(value, str):
            raise self.error(field, "must be a string: an absolute path on the VMs")
        if not rules.is_vm_path(value):
            raise self.error(field, f"{_short(value)} is not an absolute path (starting with /, without "
                                    f"empty, . or .. parts or control characters, at most {rules.MAX_PATH} "
                                    "characters)")
        return value

    def read(self, field: str, path: Any, read_file: ReadFile) -> Dict[str, str]:
        if not isinstance(path, str) or not path:
            raise self.error(field, "must be a non-empty path string")
        try:
            content = read_file(path)
        except (OSError, ValueError) as e:
            raise self.error(field, f"cannot read {_short(path)}: {_os_reason(e)}") from None
        return {"b64": base64.b64encode(content).decode("ascii")}

    def scripts(self, field: str, path: Any, pack: PackScripts) -> Dict[str, str]:
        """The scripts directory, packed: ``{"b64", "sha256"}`` of its gzip'd tar."""
        if not isinstance(path, str) or not path:
            raise self.error(field, "must be a non-empty path string: a directory of ctx-scripts")
        try:
            packed = pack(path)
        except ScriptsError as e:
            raise self.error(field, str(e)) from None
        return {"b64": base64.b64encode(packed).decode("ascii"), "sha256": hashlib.sha256(packed).hexdigest()}


def _b64(v: _Validator, field: str, text: str) -> Dict[str, str]:
    try:
        raw = text.encode("utf-8")
    except UnicodeEncodeError:
        raise v.error(field, "is not valid Unicode text") from None
    return {"b64": base64.b64encode(raw).decode("ascii")}


def _file_reader(base_dir: str) -> ReadFile:
    def read_file(path: str) -> bytes:
        full = os.path.join(base_dir, os.path.expanduser(path))
        with open(full, "rb") as f:
            # A larger file can never be sent; reading /dev/zero must not eat memory.
            content = f.read(rules.MAX_DATA_FILE + 1)
        if len(content) > rules.MAX_DATA_FILE:
            raise ValueError(f"larger than {rules.MAX_DATA_FILE} bytes")
        return content
    return read_file


def _scripts_packer(base_dir: str) -> PackScripts:
    def pack(path: str) -> bytes:
        return pack_tree(os.path.join(base_dir, os.path.expanduser(path)))
    return pack


def _key(key: Any) -> str:
    """``key`` as TOML spells it: bare if it can be, else quoted (so "" or "a\\nb" stays visible)."""
    text = str(key)
    return text if re.fullmatch(r"[A-Za-z0-9_-]+", text) else json.dumps(text, ensure_ascii=False)


def _os_reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__


def _shown(value: Any) -> str:
    return _short(value) if isinstance(value, str) else str(value)


def _short(value: str, limit: int = 70) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _one_line(text: str) -> str:
    return " ".join(text.split())
