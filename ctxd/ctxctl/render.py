"""What ctxctl prints and writes: tables, the progress line, report files, known_hosts lines.

Pure functions of the broker's JSON (which they never trust: every field is checked
or made printable), apart from :func:`write_reports`.
"""

import ipaddress
import os
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from ctxd import rules
from ctxd.ctxctl.errors import CliError, reason
from ctxd.files import write_atomic

_REPORT_SUFFIXES = (".ok", ".error", ".pending", ".did-not-report")
LOG_TAIL_LINES = 40


def status_table(status: Mapping[str, Any]) -> List[str]:
    """``ctxctl status``: the context, one row per node and per slot not enrolled, the counts."""
    lines = [_context_header(status)]
    rows = []
    for node in nodes_in_group_order(status):
        identity = node.get("identity") or {}
        problem = node.get("error") or {}
        rows.append([cell(node.get("group")), cell(node.get("id")), cell(identity.get("hostname")),
                     _address(identity), "revoked" if node.get("revoked") is True else cell(node.get("state")),
                     cell(problem.get("message"), 80) if isinstance(problem, dict) and problem.get("message")
                     else ""])
    for group, missing in missing_slots(status):
        rows += [[cell(group), "-", "-", "-", "not enrolled", ""]] * missing
    lines += table(["GROUP", "NODE", "HOSTNAME", "IP", "STATE", "MESSAGE"], rows)
    lines.append(_counts_line(status))
    return lines


def _address(identity: Mapping[str, Any]) -> str:
    """The claimed primary address, and the one its requests came from when they differ (NAT)."""
    claimed, source = identity.get("primary_ip"), identity.get("source_address")
    if source and source != claimed:
        return f"{cell(claimed)} (from {cell(source)})"
    return cell(claimed)


def members(status: Mapping[str, Any]) -> List[Mapping[str, Any]]:
    """The nodes of a status that are not revoked."""
    return [n for n in status.get("nodes") or [] if isinstance(n, dict) and n.get("revoked") is not True]


def user_table(users: List[Any]) -> List[str]:
    """``ctxctl user list``."""
    rows = [[cell(u.get("name")), when(u.get("created")) or "-", when(u.get("revoked")) or "-"]
            for u in users if isinstance(u, dict)]
    return table(["NAME", "ADDED", "REVOKED"], rows)


def context_table(contexts: List[Any]) -> List[str]:
    """``ctxctl list``."""
    rows = []
    for c in contexts:
        if not isinstance(c, dict):
            continue
        state = "error" if c.get("error_present") else "all ok" if c.get("all_ok") else "pending"
        rows.append([cell(c.get("id")), cell(c.get("name"), 40),
                     f"{count(c, 'ok')}/{count(c, 'expected')}", str(count(c, "error")),
                     state, "locked" if c.get("locked") else "open", when(c.get("expires")) or "-"])
    return table(["ID", "NAME", "OK", "ERRORS", "STATE", "DATA", "EXPIRES"], rows)


def _node_name(node: Mapping[str, Any]) -> str:
    identity = node.get("identity") or {}
    return f"node {cell(node.get('group'))}/{cell(node.get('id'))} ({cell(identity.get('hostname'))})"


def _problem(node: Mapping[str, Any]) -> Mapping[str, Any]:
    problem = node.get("error")
    return problem if isinstance(problem, dict) else {}


def failure_line(node: Mapping[str, Any]) -> str:
    """``node GROUP/ID (HOSTNAME) reported an error: MESSAGE``."""
    return f"{_node_name(node)} reported an error: {cell(_problem(node).get('message'), 200)}"


def failure_report(node: Mapping[str, Any]) -> List[str]:
    """What ``wait`` prints of a failed node: its exit code, error and the end of its log."""
    problem = _problem(node)
    lines = [f"{_node_name(node)} failed: exit code {cell(problem.get('exit_code'))}: "
             f"{cell(problem.get('message'), 500)}"]
    tail = log_tail(node)
    if tail:
        all_lines = tail.splitlines()
        shown = all_lines[-LOG_TAIL_LINES:]
        lines.append(f"--- log tail ({len(shown)} of {len(all_lines)} lines; the report file has all of it) ---"
                     if len(shown) < len(all_lines) else "--- log tail ---")
        lines += [printable(line) for line in shown]
        lines.append("--- end of log tail ---")
    return lines


def silent_nodes(status: Mapping[str, Any]) -> str:
    """``N of M nodes did not report (X never enrolled, Y enrolled but not finished)``."""
    expected = count(status, "expected")
    silent = max(0, expected - count(status, "ok") - count(status, "error"))
    never = sum(n for _, n in missing_slots(status))
    return (f"{silent} of {expected} nodes did not report "
            f"({never} never enrolled, {silent - never} enrolled but not finished)")


def progress_line(status: Mapping[str, Any], width: int = 10) -> str:
    """``[#####.....] 3/4 ok, 0 error, 4/4 enrolled``."""
    expected = count(status, "expected")
    ok = count(status, "ok")
    filled = min(width, (ok * width) // expected) if expected else width
    return (f"[{'#' * filled}{'.' * (width - filled)}] {ok}/{expected} ok, "
            f"{count(status, 'error')} error, {count(status, 'enrolled')}/{expected} enrolled")


def write_reports(status: Mapping[str, Any], directory: str) -> str:
    """Write one report file per node and per slot that never enrolled; return ``directory``.

    ``GROUP-HOSTNAME-NODEID.ok`` / ``.error`` / ``.pending`` and
    ``GROUP-missing-N.did-not-report``. Earlier report files in ``directory`` are
    removed first, so it always shows the last outcome.
    """
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        for name in os.listdir(directory):
            if name.endswith(_REPORT_SUFFIXES):
                os.unlink(os.path.join(directory, name))
        for node in nodes_in_group_order(status):
            state = node.get("state")
            suffix = {"ok": ".ok", "error": ".error"}.get(state, ".pending")
            identity = node.get("identity") or {}
            hostname = identity.get("hostname")
            parts = [_safe_name(node.get("group"), rules.is_name), _safe_name(hostname, rules.is_hostname),
                     _safe_name(node.get("id"), rules.is_id)]
            write_private_file(os.path.join(directory, "-".join(parts) + suffix),
                                _node_report(status, node).encode("utf-8", "replace"))
        for group, missing in missing_slots(status):
            for n in range(1, missing + 1):
                text = (f"context: {status.get('id')} ({status.get('name')})\ngroup: {group}\n"
                        f"state: did not report (slot {n} of {missing} never enrolled)\n")
                write_private_file(
                    os.path.join(directory, f"{_safe_name(group, rules.is_name)}-missing-{n}.did-not-report"),
                    text.encode("utf-8"))
    except OSError as e:
        raise CliError(f"cannot write reports in {directory}: {reason(e)}") from None
    return directory


def _node_report(status: Mapping[str, Any], node: Mapping[str, Any]) -> str:
    identity = node.get("identity") or {}
    problem = node.get("error") if isinstance(node.get("error"), dict) else {}
    fields = [
        ("context", f"{status.get('id')} ({status.get('name')})"),
        ("group", node.get("group")), ("node", node.get("id")), ("state", node.get("state")),
        ("hostname", identity.get("hostname")), ("fqdn", identity.get("fqdn")),
        ("primary_ip", identity.get("primary_ip")), ("source_address", identity.get("source_address")),
        ("exit_code", problem.get("exit_code")), ("message", problem.get("message")),
        ("enrolled_at", when(node.get("enrolled_at"))),
        ("contextualizing_at", when(node.get("contextualizing_at"))),
        ("ok_at", when(node.get("ok_at"))), ("error_at", when(node.get("error_at"))),
    ]
    text = "".join(f"{k}: {v}\n" for k, v in fields if v not in (None, ""))
    tail = log_tail(node)
    text += "--- log tail ---\n" + tail + ("" if not tail or tail.endswith("\n") else "\n")
    return text


def known_hosts_lines(status: Mapping[str, Any]) -> Tuple[List[str], List[str]]:
    """known_hosts lines for every node's keys, and warnings for what was skipped."""
    lines: List[str] = []
    problems: List[str] = []
    for node in members(status):  # a revoked node's keys are trusted no more
        identity = node.get("identity")
        if not isinstance(identity, dict):
            continue
        names = _host_names(identity)
        if names is None:
            problems.append(f"node {cell(node.get('id'))}: skipped, its hostname/fqdn/ip are not valid")
            continue
        for key in identity.get("ssh_host_keys") or []:
            if not rules.is_ssh_key(key):
                problems.append(f"node {cell(node.get('id'))}: skipped an invalid host key")
                continue
            lines.append(f"{names} {key}")
    return lines, problems


def _host_names(identity: Mapping[str, Any]) -> Optional[str]:
    short, fqdn, ip = identity.get("hostname"), identity.get("fqdn"), identity.get("primary_ip")
    if not rules.is_hostname(short) or not rules.is_fqdn(fqdn):
        return None
    try:
        address = str(ipaddress.ip_address(ip)) if isinstance(ip, str) and "%" not in ip else None
    except ValueError:
        address = None
    if address is None:
        return None
    names: List[str] = []
    for name in (fqdn, short, address):
        if name not in names:
            names.append(name)
    return ",".join(names)


def replace_managed_block(text: str, context_id: str, lines: Sequence[str]) -> str:
    """``text`` with the context's managed block replaced by ``lines`` (none: removed).

    The block is the lines from ``# BEGIN ctxd (context CID)`` to ``# END ctxd (context
    CID)``. The first block of the context is replaced in place and any later copy is
    dropped; without one the block is appended. Everything else is kept byte for byte.
    ValueError for a BEGIN without its END or an END without its BEGIN. (ctxagent.py
    has the same function; tests/test_managed_block.py runs one table against both.)
    """
    begin, end = ("# %s ctxd (context %s)" % (word, context_id) for word in ("BEGIN", "END"))
    kept: List[str] = []
    at = None
    inside = False
    for line in text.splitlines(keepends=True):
        marker = line.rstrip("\r\n")
        if marker == (end if inside else begin):
            if not inside and at is None:
                at = len(kept)
            inside = not inside
        elif marker in (begin, end):
            raise ValueError("the %r ... %r lines are damaged (a BEGIN without its END, or an END without "
                             "its BEGIN)" % (begin, end))
        elif not inside:
            kept.append(line)
    if inside:
        raise ValueError("the %r line has no %r line after it" % (begin, end))
    if at is None:
        at = len(kept)
        if lines and kept and not kept[-1].endswith("\n"):
            kept[-1] += "\n"
    block = [line + "\n" for line in [begin, *lines, end]] if lines else []
    return "".join(kept[:at] + block + kept[at:])


def nodes_in_group_order(status: Mapping[str, Any]) -> List[Mapping[str, Any]]:
    order = {g.get("name"): i for i, g in enumerate(status.get("groups") or []) if isinstance(g, dict)}
    nodes = [n for n in status.get("nodes") or [] if isinstance(n, dict)]
    # sorted() is stable: within a group the broker's (enrollment) order stays.
    return sorted(nodes, key=lambda n: order.get(n.get("group"), len(order)))


def missing_slots(status: Mapping[str, Any]) -> List[Tuple[str, int]]:
    """(group, slots never enrolled) for every group with some."""
    enrolled: Dict[Any, int] = {}
    for n in members(status):
        enrolled[n.get("group")] = enrolled.get(n.get("group"), 0) + 1
    out = []
    for g in status.get("groups") or []:
        if isinstance(g, dict) and isinstance(g.get("quantity"), int):
            missing = g["quantity"] - enrolled.get(g.get("name"), 0)
            if missing > 0:
                out.append((str(g.get("name")), missing))
    return out


def first_failed_node(status: Mapping[str, Any]) -> Optional[Mapping[str, Any]]:
    failed = [n for n in members(status) if n.get("state") == "error"]
    if not failed:
        return None
    return min(failed, key=lambda n: n.get("error_at") if isinstance(n.get("error_at"), (int, float)) else float("inf"))


def log_tail(node: Mapping[str, Any]) -> str:
    problem = node.get("error")
    tail = problem.get("log_tail") if isinstance(problem, dict) else None
    if not isinstance(tail, str):
        tail = node.get("log_tail")
    return tail if isinstance(tail, str) else ""


def _context_header(status: Mapping[str, Any]) -> str:
    parts = [f"context {cell(status.get('name'))} ({cell(status.get('id'))})"]
    if status.get("revision") is not None:
        parts.append(f"revision {cell(status.get('revision'))}")
    parts.append("locked" if status.get("locked") else "open for injection (not locked)")
    if status.get("expires") is not None:
        parts.append(f"expires {when(status.get('expires'))}")
    return ", ".join(parts)


def _counts_line(status: Mapping[str, Any]) -> str:
    return (f"{count(status, 'expected')} expected, {count(status, 'enrolled')} enrolled, "
            f"{count(status, 'contextualizing')} contextualizing, {count(status, 'ok')} ok, "
            f"{count(status, 'error')} error; complete: {_yes(status.get('complete'))}, "
            f"all_ok: {_yes(status.get('all_ok'))}")


def count(status: Mapping[str, Any], key: str) -> int:
    counts = status.get("counts")
    value = counts.get(key) if isinstance(counts, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _yes(value: Any) -> str:
    return "yes" if value is True else "no"


def table(headers: List[str], rows: List[List[str]]) -> List[str]:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    return ["  ".join(text.ljust(w) for text, w in zip(row, widths)).rstrip() for row in [headers] + rows]


def when(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(value))
        except (OverflowError, OSError, ValueError):
            return str(value)
    return ""


def printable(text: str) -> str:
    """``text`` with terminal control characters (escape sequences...) made harmless."""
    return "".join(c if c.isprintable() or c == "\t" else "?" for c in text)


def cell(value: Any, limit: int = 64) -> str:
    """One line, printable, at most ``limit`` characters; ``-`` for nothing."""
    if value is None or value == "":
        return "-"
    text = printable(" ".join(str(value).split()))
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _safe_name(value: Any, valid: Callable[[Any], bool]) -> str:
    return value if valid(value) else "unknown"


def write_private_file(path: str, content: bytes) -> None:
    """Write ``content`` to ``path`` (mode 0600) atomically; :class:`CliError` on failure."""
    try:
        write_atomic(path, content, 0o600)
    except OSError as e:
        raise CliError(f"cannot write {path}: {reason(e)}") from None
