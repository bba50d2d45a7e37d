"""Bootstraps wrapped as cloud-init user-data.

``ctxctl create`` writes, per group, a ``#cloud-config`` document. By default it carries a
short loader (ctxd/ctxctl/loader.py) instead of the agent::

    #cloud-config
    # ctxd-bootstrap: BASE64(JSON bootstrap)
    # ctxd user-data: context CID, group GROUP. Installs a loader that fetches ctxagent.py ...
    write_files:
    - path: /usr/local/sbin/ctxagent-loader.py
      owner: root:root
      permissions: '0700'
      encoding: gz+b64
      content: 'BASE64(GZIP(the loader, naming the SHA-256 of the broker's ctxagent.py))'
    - path: /etc/systemd/system/ctxagent.service
      owner: root:root
      permissions: '0644'
      content: |
        [Unit] ... ExecStart=/usr/bin/python3 /usr/local/sbin/ctxagent-loader.py --bootstrap cloud-init
    runcmd:
    - [systemctl, daemon-reload]
    - [systemctl, enable, ctxagent.service]
    - [python3, /usr/local/sbin/ctxagent-loader.py, --bootstrap, cloud-init]

The loader fetches ``URL/v1/agent`` from the broker the bootstrap names, over TLS verified
against the bootstrap's CA, refuses it unless its SHA-256 is the one written into the loader
(what the broker served ctxctl when it wrote the user-data), installs it as
``/usr/local/sbin/ctxagent.py`` and runs it with its own arguments. The loader is compressed
(cloud-init's ``gz+b64``), which keeps the whole document under 4 KB. With ``--embed-agent``
(VMs that must not fetch code) the document carries the agent itself instead, as before
(``- path: /usr/local/sbin/ctxagent.py``, ``permissions: '0755'``, the agent as a YAML
literal block) and the unit and runcmd run it directly.

The bootstrap travels as a comment line so the agent (and the loader) can find it with the
standard library alone (it reads ``/var/lib/cloud/instance/user-data.txt``): the JSON is
compact (``separators=(",", ":")``, sorted keys), UTF-8, then standard base64 with padding,
on one line.

``runcmd`` runs once per instance (the first boot); the systemd unit, enabled
but not started, re-runs the agent at every later boot.

EC2 accepts at most 16384 bytes of user-data. A larger document is gzip
compressed (cloud-init recognises the gzip magic); if it is still too large,
:class:`UserDataError` says by how much.

Pure functions (apart from reading the agent's and the loader's source); no Twisted import.
"""

from __future__ import annotations

import ast
import base64
import binascii
import gzip
import hashlib
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import tempfile
import tokenize
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Union

__all__ = [
    "USER_DATA_LIMIT",
    "BOOTSTRAP_MARKER",
    "AGENT_PATH",
    "UNIT_PATH",
    "UNIT_NAME",
    "AGENT_COMMAND",
    "LOADER_PATH",
    "LOADER_COMMAND",
    "AgentLoader",
    "Agent",
    "UserDataError",
    "load_agent_source",
    "loader_source",
    "agent_digest",
    "compact_source",
    "bootstrap_line",
    "read_bootstrap",
    "render_cloud_config",
    "render_user_data",
    "is_gzip",
]

USER_DATA_LIMIT = 16384
BOOTSTRAP_MARKER = "# ctxd-bootstrap: "
AGENT_PATH = "/usr/local/sbin/ctxagent.py"
UNIT_NAME = "ctxagent.service"
UNIT_PATH = "/etc/systemd/system/" + UNIT_NAME
AGENT_COMMAND = ["python3", AGENT_PATH, "--bootstrap", "cloud-init"]
LOADER_PATH = "/usr/local/sbin/ctxagent-loader.py"
CLOUD_INIT_USER_DATA = "/var/lib/cloud/instance/user-data.txt"
LOADER_COMMAND = ["python3", LOADER_PATH, "--bootstrap", "cloud-init"]

_GZIP_MAGIC = b"\x1f\x8b"
_SAFE_LABEL = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")


def _unit(program: str, watch: bool) -> str:
    """The systemd unit that runs ``program`` (the agent, or its loader) at every boot.

    Watch mode: the first run, then the agent follows the cluster's changes (docs/agent.md);
    Type=exec holds through the loader's exec of the agent (the same process). Exit 6 (the
    broker refused this node: it departed) is final; other failures are tried again."""
    if not watch:
        return f"""\
[Unit]
Description=ctxd contextualization agent (re-applies the cluster context at boot)
Wants=network-online.target
After=network-online.target

[Service]
Type=oneshot
ExecStart=/usr/bin/python3 {program} --bootstrap cloud-init
RemainAfterExit=yes

[Install]
WantedBy=multi-user.target
"""
    return f"""\
[Unit]
Description=ctxd contextualization agent, watch mode (follows the cluster's changes)
Wants=network-online.target
After=network-online.target

[Service]
Type=exec
ExecStart=/usr/bin/python3 {program} --bootstrap cloud-init --watch
Restart=on-failure
RestartSec=10
RestartPreventExitStatus=6

[Install]
WantedBy=multi-user.target
"""


class UserDataError(Exception):
    """User-data that cannot be produced (agent source missing, too large); one line."""


def load_agent_source() -> str:
    """Return the text of ``ctxagent.py``, the module installed next to this package.

    The module is located the way ``import ctxagent`` would find it, without
    running it.
    """
    try:
        spec = importlib.util.find_spec("ctxagent")
    except (ImportError, ValueError) as e:
        raise UserDataError(f"cannot locate ctxagent.py: {e}") from None
    path = spec.origin if spec is not None else None
    if not path or not path.endswith(".py"):
        raise UserDataError("cannot locate ctxagent.py (the agent) on the Python path: "
                            "install ctxd with it (setup.py py_modules) or run from the source tree")
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserDataError(f"cannot read the agent source {path}: {e}") from None


@dataclass(frozen=True)
class AgentLoader:
    """User-data that fetches the agent from the broker at boot: the SHA-256 (hex) the
    broker's ``GET /v1/agent`` answered with when the user-data was written."""

    sha256: str

    def source(self) -> str:
        """The loader's source, compacted, with this hash filled in."""
        return loader_source(self.sha256)


#: What a user-data carries: the agent's source (embedded), or a loader of it.
Agent = Union[str, AgentLoader]

_LOADER_TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "loader.py")
_SHA256 = re.compile(r"[0-9a-f]{64}\Z")


def agent_digest(source: Union[str, bytes]) -> str:
    """The SHA-256 (hex) of an agent's source, as the loader computes it over the bytes it fetched."""
    return hashlib.sha256(source.encode("utf-8") if isinstance(source, str) else source).hexdigest()


def loader_source(sha256: str, agent_path: str = AGENT_PATH, user_data: str = CLOUD_INIT_USER_DATA) -> str:
    """The loader (ctxd/ctxctl/loader.py), compacted, that runs only the agent with ``sha256``,
    installed as ``agent_path``, with the bootstrap of ``user_data`` (tests change both paths)."""
    if not _SHA256.match(sha256):
        raise UserDataError(f"{sha256[:80]!r} is not a SHA-256 in hex")
    try:
        with open(_LOADER_TEMPLATE, "rb") as f:
            template = f.read().decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserDataError(f"cannot read the agent loader {_LOADER_TEMPLATE}: {e}") from None
    text = template
    for name, value in (("SHA256", sha256), ("AGENT", agent_path), ("USER_DATA", user_data)):
        line = re.compile(rf"^{name} = .*$", re.M)
        if len(line.findall(text)) != 1:
            raise UserDataError(f"the agent loader {_LOADER_TEMPLATE} has no single {name} line")
        text = line.sub(lambda m: f"{name} = {json.dumps(value)}", text)
    return compact_source(text)


def compact_source(source: str) -> str:
    """``source`` without comments and class/function docstrings, and with only the first
    line and the "Exit codes:" paragraph of its module docstring (what ``--help`` prints).

    The code is otherwise untouched, so the embedded agent behaves exactly like the file it
    came from, in about a quarter fewer gzipped bytes: what lets it, a bootstrap and a
    systemd unit fit EC2's 16384-byte user-data.
    """
    lines = source.splitlines(keepends=True)
    drop = set()
    replace: Dict[int, str] = {}
    try:
        tree = ast.parse(source)
    except SyntaxError as e:
        raise UserDataError(f"the agent source is not valid Python (line {e.lineno}): {e.msg}") from None
    module_doc = tree.body[0] if tree.body else None
    if (isinstance(module_doc, ast.Expr) and isinstance(module_doc.value, ast.Constant)
            and isinstance(module_doc.value.value, str) and module_doc.col_offset == 0
            and not lines[module_doc.end_lineno - 1][module_doc.end_col_offset:].strip()):
        text = module_doc.value.value
        kept = [text.split("\n", 1)[0]] + [p for p in text.split("\n\n") if p.startswith("Exit codes:")]
        start, end = module_doc.lineno - 1, module_doc.end_lineno - 1
        drop.update(range(start + 1, end + 1))
        replace[start] = '"""' + "\n\n".join(kept).replace("\\", "\\\\").replace('"""', '\\"""') + '\n"""\n'
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        first = node.body[0]
        if not (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)):
            continue
        start, end = first.lineno - 1, first.end_lineno - 1
        if lines[start][:first.col_offset].strip() or lines[end][first.end_col_offset:].strip():
            continue  # shares a line with other code: leave it
        drop.update(range(start, end + 1))
        if len(node.body) == 1:
            replace[start] = " " * first.col_offset + "pass\n"
    cut: Dict[int, int] = {}   # a comment after code on its line: the line ends before it
    quoted = set()   # lines inside a string (their leading spaces are its text)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT and tok.start[0] > 1:
            row = tok.start[0] - 1
            if lines[row][:tok.start[1]].strip():
                cut[row] = tok.start[1]
            else:
                drop.add(row)
        elif tok.type == tokenize.STRING or tok.type == getattr(tokenize, "FSTRING_MIDDLE", None):
            # (Python 3.12 splits an f-string into FSTRING_* tokens: its text is FSTRING_MIDDLE.)
            quoted.update(range(tok.start[0], tok.end[0]))
    out = []
    for i, line in enumerate(lines):
        if i in replace:
            out.append(replace[i])
        elif i in cut:
            out.append(_shallow(line[:cut[i]].rstrip() + "\n"))
        elif i in drop:
            continue
        elif i in quoted:
            out.append(line)
        elif line.strip():   # (a blank line is no code)
            out.append(_shallow(line))
    return "".join(out)


def _shallow(line: str) -> str:
    """``line`` with a quarter of its indentation: a space per level of four (the same blocks;
    a continuation line's spaces mean nothing). About 2% fewer gzipped bytes."""
    n = len(line) - len(line.lstrip(" "))
    return " " * (n // 4 + n % 4) + line[n:]


def bootstrap_line(bootstrap: Mapping[str, Any]) -> str:
    """The ``# ctxd-bootstrap: BASE64`` comment line (no newline) for ``bootstrap``."""
    raw = json.dumps(bootstrap, separators=(",", ":"), sort_keys=True).encode("utf-8")
    return BOOTSTRAP_MARKER + base64.b64encode(raw).decode("ascii")


def read_bootstrap(document: Union[bytes, str]) -> Dict[str, Any]:
    """Find and decode the bootstrap in a user-data document (raw or gzip); the agent's counterpart."""
    if isinstance(document, str):
        document = document.encode("utf-8")
    if is_gzip(document):
        document = gzip.decompress(document)
    for line in document.decode("utf-8").splitlines():
        if line.startswith(BOOTSTRAP_MARKER):
            try:
                value = json.loads(base64.b64decode(line[len(BOOTSTRAP_MARKER):].strip(), validate=True))
            except (binascii.Error, ValueError) as e:
                raise UserDataError(f"corrupt bootstrap line: {e}") from None
            if not isinstance(value, dict):
                raise UserDataError("corrupt bootstrap line: not a JSON object")
            return value
    raise UserDataError("no bootstrap line in the user-data")


def render_cloud_config(bootstrap: Mapping[str, Any], agent: Agent, watch: bool = False) -> str:
    """The uncompressed ``#cloud-config`` document (see the module docstring): ``agent`` is the
    agent's source to embed, or an :class:`AgentLoader`. With ``watch`` the agent runs in watch
    mode (elastic clusters): started as a service, not waited for."""
    lines: List[str] = ["#cloud-config", bootstrap_line(bootstrap)]
    loader = isinstance(agent, AgentLoader)
    program, command = (LOADER_PATH, LOADER_COMMAND) if loader else (AGENT_PATH, AGENT_COMMAND)
    cid, group = bootstrap.get("context_id"), bootstrap.get("group")
    if _is_label(cid) and _is_label(group):
        what = ("a loader that fetches ctxagent.py from the broker, checks its SHA-256 and runs it"
                if loader else "ctxagent.py, runs it")
        lines.append(f"# ctxd user-data: context {cid}, group {group}. Installs {what} now and at every boot.")
    lines.append("write_files:")
    if isinstance(agent, AgentLoader):
        # Compressed: the loader is the largest part of a small user-data (ctxd/ctxctl/loader.py
        # is its source; `base64 -d | zcat` shows it).
        lines += _write_file(LOADER_PATH, "0700", agent.source(), compress=True)
    else:
        lines += _write_file(AGENT_PATH, "0755", agent)
    lines += _write_file(UNIT_PATH, "0644", _unit(program, watch))
    lines.append("runcmd:")
    lines.append("- [systemctl, daemon-reload]")
    if watch:
        lines.append(f"- [systemctl, enable, --now, --no-block, {UNIT_NAME}]")
    else:
        lines.append(f"- [systemctl, enable, {UNIT_NAME}]")
        lines.append("- [" + ", ".join(command) + "]")
    return "\n".join(lines) + "\n"


def render_user_data(bootstrap: Mapping[str, Any], agent: Agent,
                     limit: int = USER_DATA_LIMIT, watch: bool = False) -> bytes:
    """The user-data bytes: the cloud-config document, gzip-compressed if it exceeds ``limit``."""
    document = render_cloud_config(bootstrap, agent, watch).encode("utf-8")
    if len(document) <= limit:
        return document
    compressed = smallest_gzip(document)
    if len(compressed) > limit:
        what = ("the loader and bootstrap are too large" if isinstance(agent, AgentLoader) else
                f"the agent source ({len(agent)} characters) is too large to embed")
        raise UserDataError(
            f"user-data is {len(compressed)} bytes even gzip-compressed ({len(document)} raw), over the "
            f"{limit}-byte limit{' (EC2' + chr(39) + 's)' if limit == USER_DATA_LIMIT else ''}: {what}")
    return compressed


def smallest_gzip(document: bytes) -> bytes:
    """``document`` gzip-compressed as small as we can: by zopfli (the Python module, or the
    ``zopfli`` command Debian packages), about 5% smaller than zlib's best, which is the
    fallback. Reproducible: the header's mtime is 0 either way."""
    try:
        from zopfli.gzip import compress  # type: ignore[import-not-found]
    except ImportError:
        pass
    else:
        return bytes(compress(document))
    command = shutil.which("zopfli")
    if command is not None:
        with tempfile.NamedTemporaryFile(prefix="ctxctl-user-data.") as plain:
            plain.write(document)
            plain.flush()
            try:
                return subprocess.run([command, "-c", "--gzip", plain.name], stdout=subprocess.PIPE,
                                      stderr=subprocess.DEVNULL, check=True, timeout=120).stdout
            except (OSError, subprocess.SubprocessError):
                pass
    return gzip.compress(document, compresslevel=9, mtime=0)


def is_gzip(data: bytes) -> bool:
    """Whether ``data`` starts with the gzip magic (what cloud-init checks)."""
    return data[:2] == _GZIP_MAGIC


def _write_file(path: str, permissions: str, content: str, compress: bool = False) -> List[str]:
    entry = [f"- path: {path}", "  owner: root:root", f"  permissions: '{permissions}'"]
    if compress:
        # cloud-init's gz+b64: base64 of gzip; about half the bytes of the text.
        entry.append("  encoding: gz+b64")
        entry.append("  content: '" + base64.b64encode(smallest_gzip(content.encode("utf-8"))).decode("ascii") + "'")
        return entry
    block = _literal_block(content, indent="   ")   # (one more than its key: the least YAML allows)
    if block is None:
        # Text a YAML literal block cannot carry exactly (CR, control characters,
        # a leading space...): base64 keeps it byte-exact at some cost in size.
        entry.append("  encoding: b64")
        entry.append("  content: '" + base64.b64encode(content.encode("utf-8")).decode("ascii") + "'")
    else:
        entry += block
    return entry


def _literal_block(text: str, indent: str) -> Optional[List[str]]:
    """``content: |`` lines carrying ``text`` exactly, or None when YAML cannot."""
    if not text or text[0] in " \t\n" or not all(_literal_char(c) for c in text):
        return None
    body = text.rstrip("\n")
    trailing = len(text) - len(body)
    # Chomping indicator: strip (no final newline), clip (exactly one), keep (more).
    header = {0: "  content: |-", 1: "  content: |"}.get(trailing, "  content: |+")
    lines = [header]
    lines += [indent + line if line else "" for line in body.split("\n")]
    lines += [""] * (trailing - 1 if trailing > 1 else 0)
    return lines


def _literal_char(c: str) -> bool:
    # YAML's printable set minus every character PyYAML (YAML 1.1, which
    # cloud-init uses) treats as a line break: NEL, LS, PS. No CR, no BOM.
    o = ord(c)
    if c == "\t" or c == "\n":
        return True
    if 0x20 <= o <= 0x7E or 0xA0 <= o <= 0xD7FF:
        return o not in (0x2028, 0x2029)
    if 0xE000 <= o <= 0xFFFD:
        return o != 0xFEFF
    if 0x10000 <= o <= 0x10FFFF:
        return True
    return False  # C0/C1 controls, DEL, NEL (0x85), surrogates


def _is_label(value: Any) -> bool:
    return isinstance(value, str) and bool(_SAFE_LABEL.match(value))
