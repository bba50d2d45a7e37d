"""What ctxctl prints and writes: tables, the progress line, report files, known_hosts lines.

Pure functions of the broker's JSON (which they never trust: every field is checked
or made printable), apart from :func:`write_reports`.
"""

import ipaddress
import os
import re
import time
from typing import Any, Callable, Collection, Dict, List, Mapping, Optional, Sequence, Tuple

from ctxd import rules
from ctxd.ctxctl.errors import CliError, reason
from ctxd.files import write_atomic

_REPORT_SUFFIXES = (".ok", ".error", ".pending", ".departed", ".did-not-report")
LOG_TAIL_LINES = 40


def status_table(status: Mapping[str, Any], now: Optional[float] = None) -> List[str]:
    """``ctxctl status``: the context (its expiry, and how far off it is from ``now``), one row
    per group (target size, members, departed, lease), one row per member and per slot not
    enrolled, one row per departed node, then the counts."""
    lines = [_context_header(status, now)]
    lines += group_table(status)
    rows = []
    ordered = nodes_in_group_order(status)
    for node in (n for n in ordered if departure(n) is None):
        identity = node.get("identity") or {}
        rows.append([cell(node.get("group")), cell(node.get("id")), cell(identity.get("hostname")),
                     _address(identity), cell(node.get("state")), _node_message(node, now)])
    for group, missing in missing_slots(status):
        rows += [[cell(group), "-", "-", "-", "not enrolled", ""]] * missing
    lines += table(["GROUP", "NODE", "HOSTNAME", "IP", "STATE", "MESSAGE"], rows)
    gone = [node for node in ordered if departure(node) is not None]
    if gone:
        lines += table(["GROUP", "NODE", "HOSTNAME", "IP", "DEPARTED", "AT"], [
            [cell(node.get("group")), cell(node.get("id")), cell((node.get("identity") or {}).get("hostname")),
             _address(node.get("identity") or {}), cell(departure(node)), when(node.get("departed_at")) or "-"]
            for node in gone])
    lines.append(_counts_line(status))
    return lines


def group_table(status: Mapping[str, Any]) -> List[str]:
    """One row per group: its target size (quantity), its members, how many departed, its lease."""
    members_of: Dict[Any, int] = {}
    departed_of: Dict[Any, int] = {}
    for node in status.get("nodes") or []:
        if isinstance(node, dict):
            tally = departed_of if departure(node) is not None else members_of
            tally[node.get("group")] = tally.get(node.get("group"), 0) + 1
    rows = []
    for g in status.get("groups") or []:
        if not isinstance(g, dict):
            continue
        name = g.get("name")
        # The broker's own counts where it gives them (a broker before elastic clusters
        # gives no "departed"): they stay right when the status lists fewer nodes.
        enrolled, departed = g.get("enrolled"), g.get("departed")
        lease = g.get("lease")
        quantity = g.get("quantity")
        rows.append([cell(name), str(quantity) if _is_count(quantity) else "-",
                     str(enrolled if _is_count(enrolled) else members_of.get(name, 0)),
                     str(departed if _is_count(departed) else departed_of.get(name, 0)),
                     duration(lease) if _is_count(lease) else "-"])
    return table(["GROUP", "TARGET", "MEMBERS", "DEPARTED", "LEASE"], rows)


#: Why a node left: removed by the deployer, left by itself, lost (silent for longer than its
#: group's lease), revoked (a compromised VM).
DEPARTURES = ("removed", "left", "lost", "revoked")


def departure(node: Mapping[str, Any]) -> Optional[str]:
    """Why ``node`` departed (one of DEPARTURES, printable), or None for a member. A broker
    before elastic clusters says only ``"revoked": true``."""
    reason = node.get("departed")
    if reason is not None:
        return cell(reason, 20) if isinstance(reason, str) else "departed"
    return "revoked" if node.get("revoked") is True else None


def _node_message(node: Mapping[str, Any], now: Optional[float]) -> str:
    """Why a member waits (``waiting: role ...``, what its agent last said), else its error message,
    else, for a node whose agent watches for changes, when it was last heard of."""
    if isinstance(node.get("waiting"), str) and node["waiting"].strip():
        return waiting_text(node["waiting"], 80)
    problem = node.get("error")
    if isinstance(problem, dict) and problem.get("message"):
        return cell(problem.get("message"), 80)
    if node.get("watching") is not True:
        return ""
    seen = node.get("last_seen")
    if _is_time(seen) and now is not None:
        return f"watching, seen {ago(now - seen)}"
    return "watching"


def _address(identity: Mapping[str, Any]) -> str:
    """The claimed primary address, and the one its requests came from when they differ (NAT)."""
    claimed, source = identity.get("primary_ip"), identity.get("source_address")
    if source and source != claimed:
        return f"{cell(claimed)} (from {cell(source)})"
    return cell(claimed)


def members(status: Mapping[str, Any]) -> List[Mapping[str, Any]]:
    """The nodes of a status that have not departed (removed, left, lost or revoked)."""
    return [n for n in status.get("nodes") or [] if isinstance(n, dict) and departure(n) is None]


def plural(n: int, noun: str) -> str:
    """``1 group``, ``2 groups``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


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


def waiting_text(message: Any, limit: int) -> str:
    """An agent's reason to wait, printable, as ``waiting: ...`` (the agent's own words start so)."""
    text = cell(message, limit)
    return text if text.startswith("waiting") else cell(f"waiting: {text}", limit)


def longest_waiting(progress: Mapping[str, Any]) -> Optional[Mapping[str, Any]]:
    """The node that waits longest and why (``{"node_id", "hostname", "message", ...}``): the
    progress' ``waiting``; of a full status (which says nothing of how long), the first member
    still contextualizing that says why. None when no node says it waits."""
    if "waiting" in progress:
        waiting = progress.get("waiting")
        return waiting if isinstance(waiting, dict) and waiting.get("message") else None
    for node in members(progress):
        message = node.get("waiting")
        if node.get("state") == "contextualizing" and isinstance(message, str) and message.strip():
            return {"node_id": node.get("id"), "hostname": (node.get("identity") or {}).get("hostname"),
                    "message": message}
    return None


def follow_line(progress: Mapping[str, Any], elapsed: Optional[float] = None, keep_going: bool = False) -> str:
    """``wait``'s line: the progress line, how long it has waited, how many nodes are in error
    while it keeps going, and why the node that waits longest waits:
    ``[##........] 1/4 ok, 0 error, 1/4 enrolled, 2m 5s elapsed; head: waiting: role ...``."""
    line = progress_line(progress)
    if elapsed is not None:
        line += f", {span(elapsed)} elapsed"
    errors = count(progress, "error")
    if keep_going and errors:
        line += f"; {errors} node{'s' if errors != 1 else ''} in error, waiting on (--keep-going)"
    waiting = longest_waiting(progress)
    if waiting is not None:
        who = waiting.get("hostname")
        if not rules.is_hostname(who):
            who = waiting.get("node_id", waiting.get("node"))
        line += f"; {cell(who)}: {waiting_text(waiting.get('message'), 120)}"
    return line


def progress_error_line(progress: Mapping[str, Any]) -> Optional[str]:
    """``node GROUP/ID (HOSTNAME) reported an error: MESSAGE`` of a progress' oldest error, or None."""
    first = progress.get("first_error")
    if not isinstance(first, dict):
        return None
    return (f"node {cell(first.get('group'))}/{cell(first.get('node_id'))} ({cell(first.get('hostname'))}) "
            f"reported an error: {cell(first.get('message'), 200)}")


def progress_line(status: Mapping[str, Any], width: int = 10) -> str:
    """``[#####.....] 3/4 ok, 0 error, 4/4 enrolled``."""
    expected = count(status, "expected")
    ok = count(status, "ok")
    filled = min(width, (ok * width) // expected) if expected else width
    return (f"[{'#' * filled}{'.' * (width - filled)}] {ok}/{expected} ok, "
            f"{count(status, 'error')} error, {count(status, 'enrolled')}/{expected} enrolled")


def write_reports(status: Mapping[str, Any], directory: str) -> str:
    """Write one report file per node and per slot that never enrolled; return ``directory``.

    ``GROUP-HOSTNAME-NODEID.ok`` / ``.error`` / ``.pending`` / ``.departed`` (removed, left,
    lost or revoked) and ``GROUP-missing-N.did-not-report``. Earlier report files in ``directory`` are
    removed first, so it always shows the last outcome.
    """
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        for name in os.listdir(directory):
            if name.endswith(_REPORT_SUFFIXES):
                os.unlink(os.path.join(directory, name))
        for node in nodes_in_group_order(status):
            state = node.get("state")
            suffix = ".departed" if departure(node) else {"ok": ".ok", "error": ".error"}.get(state, ".pending")
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
        ("departed", departure(node)), ("departed_at", when(node.get("departed_at"))),
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


def known_hosts_lines(status: Mapping[str, Any], certified: Collection[str] = ()) -> Tuple[List[str], List[str]]:
    """known_hosts lines for every node's keys but those of the ``certified`` groups (whose
    hosts present SSH certificates: an ``@cert-authority`` line trusts them), and warnings for
    what was skipped."""
    lines: List[str] = []
    problems: List[str] = []
    for node in members(status):  # a revoked node's keys are trusted no more
        if node.get("group") in certified:
            continue
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


_CA_PATTERN = re.compile(r"\*|\*\.[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252}[A-Za-z0-9])?")
_KEY_COMMENT = re.compile(r"[A-Za-z0-9_.@:+=-]{1,128}")


def cert_authority_line(ssh: Any) -> str:
    """The ``@cert-authority PATTERN TYPE KEY [COMMENT]`` line of a context's SSH CA (the
    ``"ssh"`` object of ``GET /v1/contexts/CID/ca``), rebuilt from checked parts: a broker's
    answer never puts anything else into a known_hosts file. ValueError when it is not one."""
    line = ssh.get("known_hosts") if isinstance(ssh, dict) else None
    parts = line.split(" ") if isinstance(line, str) else []
    if not 4 <= len(parts) <= 5 or parts[0] != "@cert-authority":
        raise ValueError("its known_hosts is not an @cert-authority line")
    pattern, key = parts[1], " ".join(parts[2:4])
    if not _CA_PATTERN.fullmatch(pattern):
        raise ValueError(f"its host pattern {cell(pattern)} is not * or *.DOMAIN")
    if not rules.is_ssh_key(key):
        raise ValueError("its key is not an SSH public key")
    if len(parts) == 5 and not _KEY_COMMENT.fullmatch(parts[4]):
        raise ValueError("its key comment has characters a known_hosts line should not")
    return " ".join(parts)


def ssh_certified_groups(ssh: Mapping[str, Any], status: Mapping[str, Any]) -> List[str]:
    """The groups whose nodes' sshd presents SSH host certificates: the status's groups whose
    ``ssh_certificate`` has ``"sshd": true``, narrowed to the SSH CA's ``groups`` when the broker
    lists them. With ``sshd = false`` the certificates are installed but sshd still presents the
    plain host keys, so those groups keep their per-host lines (an older broker lists them too).
    (A group left out only costs per-host lines that are not needed.)"""
    presented = [g["name"] for g in status.get("groups") or []
                 if isinstance(g, dict) and isinstance(g.get("name"), str)
                 and isinstance(g.get("ssh_certificate"), dict) and g["ssh_certificate"].get("sshd") is True]
    listed = ssh.get("groups")
    if isinstance(listed, list):
        return [name for name in presented if name in listed]
    return presented


_PEM_CERTIFICATE = re.compile(r"-----BEGIN CERTIFICATE-----\r?\n[A-Za-z0-9+/=\r\n]+-----END CERTIFICATE-----\r?\n?")


def ca_bundle(bundle: Any) -> Tuple[str, int]:
    """A PEM bundle of CA certificates from the broker, checked (nothing but certificates that
    parse), and how many it holds. ValueError when it is not one."""
    if not isinstance(bundle, str) or not bundle.strip():
        raise ValueError("the bundle is empty")
    from cryptography import x509

    blocks = _PEM_CERTIFICATE.findall(bundle)
    if not blocks or "".join(_PEM_CERTIFICATE.split(bundle)).strip():
        raise ValueError("the bundle holds something other than PEM certificates")
    for block in blocks:
        try:
            x509.load_pem_x509_certificate(block.encode("ascii"))
        except ValueError:
            raise ValueError("a certificate of the bundle does not parse") from None
    return bundle if bundle.endswith("\n") else bundle + "\n", len(blocks)


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


def _context_header(status: Mapping[str, Any], now: Optional[float] = None) -> str:
    parts = [f"context {cell(status.get('name'))} ({cell(status.get('id'))})"]
    if status.get("revision") is not None:
        parts.append(f"revision {cell(status.get('revision'))}")
    parts.append("locked" if status.get("locked") else "open for injection (not locked)")
    expires = status.get("expires")
    if expires is not None:
        left = f" ({until(expires, now)})" if _is_time(expires) and now is not None else ""
        parts.append(f"expires {when(expires)}{left}")
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


_UNITS = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))


def duration(seconds: int) -> str:
    """Whole seconds as ctxctl reads durations: the largest unit that says it exactly
    (600 -> "10m", 5400 -> "90m", 86400 -> "1d", 45 -> "45s")."""
    for unit, size in _UNITS:
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def span(seconds: float) -> str:
    """A length of time for people, in its two largest units, rounded down ("6d 23h", "7d",
    "4m 10s", "45s")."""
    left = int(max(0.0, seconds))
    for i, (unit, size) in enumerate(_UNITS):
        if left >= size or unit == "s":
            text = f"{left // size}{unit}"
            if i + 1 < len(_UNITS):
                next_unit, next_size = _UNITS[i + 1]
                rest = left % size // next_size
                if rest:
                    text += f" {rest}{next_unit}"
            return text
    raise AssertionError("unreachable: the last unit is the second")


def until(moment: float, now: float) -> str:
    """``in 6d 23h``, or ``expired 5m ago``."""
    return f"in {span(moment - now)}" if moment > now else f"expired {ago(now - moment)}"


def ago(seconds: float) -> str:
    return f"{span(seconds)} ago"


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_time(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value \
        and abs(value) != float("inf")


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
