"""ctxctl's commands: one coroutine per subcommand, ``(broker, args, out, err) -> exit code``.

Each command calls the broker through a :class:`~ctxd.ctxctl.client.BrokerClient`, prints
results to ``out`` and messages to ``err`` (through :mod:`ctxd.ctxctl.render`), and raises
:class:`~ctxd.ctxctl.errors.CliError` for anything that goes wrong. Arguments arrive
checked (:mod:`ctxd.ctxctl.main`).
"""

import argparse
import base64
import json
import os
from urllib.parse import urlsplit
from typing import IO, Any, Awaitable, Callable, Collection, Dict, List, Mapping, Optional, Tuple

from twisted.internet import defer, task

from ctxd import rules
from ctxd.ctxctl import config as configfile
from ctxd.ctxctl import render
from ctxd.ctxctl.client import BrokerClient, encode_body, read_small_file
from ctxd.ctxctl.cluster import ClusterFileError, load_cluster_file
from ctxd.ctxctl.contexts import refuse_duplicate_name
from ctxd.ctxctl.errors import EXIT_OK, EXIT_TIMEOUT, BrokerRefusal, BrokerUnavailable, CliError, reason
from ctxd.ctxctl.userdata import (
    USER_DATA_LIMIT,
    Agent,
    AgentLoader,
    UserDataError,
    compact_source,
    is_gzip,
    load_agent_source,
    render_user_data,
)
from ctxd.files import write_atomic

Args = argparse.Namespace


async def cmd_create(broker: BrokerClient, args: Args, out: IO[str], err: IO[str]) -> int:
    """``create CLUSTER.toml --out DIR [--embed-agent]``: create the context, write bootstraps and user-data."""
    try:
        body = load_cluster_file(args.cluster)
    except ClusterFileError as e:
        raise CliError(str(e)) from None
    # Check what can fail locally before the context exists on the broker.
    encode_body(body)
    agent = await _user_data_agent(broker, args, err)
    _check_user_data(broker, args, agent, max((g["name"] for g in body["groups"]), key=len))
    if not getattr(args, "allow_duplicate_name", False):
        await refuse_duplicate_name(broker, body["name"])
    limit = getattr(args, "user_data_limit", USER_DATA_LIMIT)
    made = not os.path.isdir(os.path.expanduser(args.out))
    out_dir = _prepare_private_dir(args.out)

    try:
        answer = await broker.call("POST", "/v1/contexts", body, expect=(201,))
    except CliError as e:
        if made:
            _remove_if_empty(out_dir)  # nothing was created: leave nothing behind
        if isinstance(e, BrokerRefusal) and e.status == 400 and "scripts" in body and "'scripts'" in str(e):
            raise CliError(f"this broker does not take scripts (a ctxd older than them: {e}); remove "
                           f"`scripts` from {args.cluster} and bake the scripts into the image, or "
                           "upgrade the broker") from None
        raise
    context = answer.get("context") if isinstance(answer, dict) else None
    cid = context.get("id") if isinstance(context, dict) else None
    if not rules.is_id(cid):
        raise CliError("broker: the create answer has no valid context id")
    bootstraps = answer.get("bootstraps")
    files: List[Tuple[str, bytes]] = []
    try:
        for group in body["groups"]:
            name = group["name"]
            bootstrap = bootstraps.get(name) if isinstance(bootstraps, dict) else None
            if not isinstance(bootstrap, dict):
                raise CliError(f"broker: the create answer has no bootstrap for group {name}")
            files += _group_files(name, bootstrap, agent, limit,
                                  group.get("watch", group.get("lease") is not None))
        for filename, content in files:
            render.write_private_file(os.path.join(out_dir, filename), content)
    except CliError as e:
        raise CliError(f"context {cid} was created but {e} (delete it with: ctxctl delete {cid})") from None

    expected = sum(g["quantity"] for g in body["groups"])
    _print_written(out_dir, files, err)
    if "scripts" in body:
        size = len(base64.b64decode(body["scripts"]["b64"]))
        print(f"scripts: {size} bytes gzip'd (SHA-256 {body['scripts']['sha256']}), delivered to the VMs "
              "by the broker", file=err)
    state = ("open for injection: add data with `ctxctl data put`, then `ctxctl lock`"
             if body["open_for_injection"] else "locked")
    print(f"created context {body['name']} ({cid}): {render.plural(len(body['groups']), 'group')}, "
          f"{render.plural(expected, 'node')} expected; {state}", file=err)
    if getattr(args, "json", False):
        _print_json(out, {"context": context, "files": _paths(out_dir, files)})
    else:
        print(cid, file=out)
    return EXIT_OK


async def _user_data_agent(broker: BrokerClient, args: Args, err: IO[str]) -> Agent:
    """What the user-data carries: by default a loader of the broker's own agent, whose SHA-256
    is learnt now from the broker itself (so whichever ctxd version it runs, the hash is that
    of the agent it serves); with --embed-agent, or from a broker older than ``GET /v1/agent``,
    this ctxctl's agent, embedded."""
    if not getattr(args, "embed_agent", False):
        served = await broker.get_agent()
        if served is not None:
            return AgentLoader(served[1])
        print("ctxctl: note: this broker does not serve its agent (GET /v1/agent answered 404: an "
              "older ctxd); the user-data embeds the agent instead", file=err)
    return compact_source(_call_user_data(load_agent_source))


def _check_user_data(broker: BrokerClient, args: Args, agent: Agent, group: str) -> None:
    """Fail now, before anything changes on the broker, if a user-data with ``agent`` for
    ``group`` (a bootstrap as large as the broker's will be) would not fit ``--user-data-limit``."""
    sample = {"ctxd_bootstrap": 1, "url": broker.url, "context_id": "x" * 22, "group": group,
              "join_token": "ctxd_join_" + "x" * 43,
              "ca_pem": (broker.ca_pem or b"x" * 1200).decode("ascii", "replace")}
    try:
        render_user_data(sample, agent, getattr(args, "user_data_limit", USER_DATA_LIMIT))
    except UserDataError as e:
        hint = ""
        if not isinstance(agent, AgentLoader):
            hint = ("; without --embed-agent the VMs fetch the agent from the broker instead"
                    if getattr(args, "embed_agent", False) else
                    "; a broker that serves its agent (GET /v1/agent, a newer ctxd) lets the VMs fetch it instead")
        raise CliError(f"{e}{hint}") from None


def _group_files(group: str, bootstrap: Dict[str, Any], agent: Agent, limit: int,
                 watch: bool = False) -> List[Tuple[str, bytes]]:
    """GROUP.bootstrap.json and GROUP.user-data for one group's bootstrap (``watch``: the
    agent runs in watch mode)."""
    return [
        (f"{group}.bootstrap.json", (json.dumps(bootstrap, indent=2, sort_keys=True) + "\n").encode("utf-8")),
        (f"{group}.user-data", _call_user_data(render_user_data, bootstrap, agent, limit, watch)),
    ]


def _print_written(out_dir: str, files: List[Tuple[str, bytes]], err: IO[str]) -> None:
    for filename, content in files:
        if filename.endswith(".user-data"):
            kind = "gzip" if is_gzip(content) else "cloud-config"
            print(f"wrote {os.path.join(out_dir, filename)} ({len(content)} bytes, {kind})", file=err)
        else:
            print(f"wrote {os.path.join(out_dir, filename)}", file=err)


async def cmd_join_token_rotate(broker: BrokerClient, args: Args, out: IO[str], err: IO[str]) -> int:
    """``join-token rotate CTX GROUP --out DIR [--embed-agent]``: new join token; the old one stops working."""
    agent = await _user_data_agent(broker, args, err)
    _check_user_data(broker, args, agent, args.group)
    out_dir = _prepare_private_dir(args.out)
    # Before rotating: whether the group's agents watch decides the user-data.
    status = await _get_status(broker, args.context)
    watch = any(g.get("name") == args.group and g.get("watch") is True for g in status.get("groups") or [])
    answer = await broker.call("POST", f"/v1/contexts/{args.context}/groups/{args.group}/join-token", {})
    bootstrap = answer.get("bootstrap") if isinstance(answer, dict) else None
    if not isinstance(bootstrap, dict):
        raise CliError("broker: the rotation answer has no bootstrap")
    files = _group_files(args.group, bootstrap, agent, args.user_data_limit, watch)
    for filename, content in files:
        render.write_private_file(os.path.join(out_dir, filename), content)
    _print_written(out_dir, files, err)
    print(f"join token of group {args.group} rotated: the old one no longer enrolls; "
          "VMs launched from now on need the new user-data", file=err)
    if args.json:
        _print_json(out, {"context": args.context, "group": args.group, "files": _paths(out_dir, files)})
    return EXIT_OK


async def cmd_node_revoke(broker: BrokerClient, args: Args, out: IO[str], err: IO[str]) -> int:
    """``node revoke CTX NODE``: a compromised VM's credential stops working at once."""
    answer = await broker.call("POST", f"/v1/contexts/{args.context}/nodes/{args.node}/revoke", {})
    print(f"node {args.node} of context {args.context}: credential revoked", file=err)
    if args.json:
        _print_json(out, answer)
    return EXIT_OK


async def cmd_node_remove(broker: BrokerClient, args: Args, out: IO[str], err: IO[str]) -> int:
    """``node remove CTX NODE... [--shrink]``: each node departs (reason "removed"), one request
    each, in order; the first error stops, naming the node and the ones not tried. --json: the
    broker's answers, ``{"removed": [...]}``, printed only when every node was removed."""
    removed = []
    for i, nid in enumerate(args.nodes):
        try:
            answer = await broker.call("POST", f"/v1/contexts/{args.context}/nodes/{nid}/remove",
                                       {"shrink": args.shrink})
            removed.append(answer)
        except CliError as e:
            if len(args.nodes) == 1:
                raise
            rest = args.nodes[i + 1:]
            raise CliError(f"node {nid}: {e}" + (f"; not tried: {' '.join(rest)}" if rest else ""),
                           e.exit_code) from None
        answer = answer if isinstance(answer, dict) else {}
        group, quantity = render.cell(answer.get("group")), render.cell(answer.get("quantity"))
        if args.shrink:
            print(f"node {nid} of context {args.context}: removed; the target of group {group} is now "
                  f"{quantity}", file=err)
        else:
            print(f"node {nid} of context {args.context}: removed; the target of group {group} stays "
                  f"{quantity} (a new VM may take the slot)", file=err)
    if args.json:
        _print_json(out, {"removed": removed})
    return EXIT_OK


async def cmd_scale(broker: BrokerClient, args: Args, out: IO[str], err: IO[str]) -> int:
    """``scale CTX GROUP N``: the group's target size; raised, its join token enrolls new VMs up to N."""
    answer = await broker.call("POST", f"/v1/contexts/{args.context}/groups/{args.group}/scale",
                               {"quantity": args.quantity})
    group = answer.get("group") if isinstance(answer, dict) else None
    if not isinstance(group, dict):
        raise CliError("broker: the scale answer has no group")
    quantity, enrolled = group.get("quantity"), group.get("enrolled")
    line = (f"group {args.group} of context {args.context}: target {render.cell(quantity)}, "
            f"members {render.cell(enrolled)}")
    expires = group.get("join_token_expires")
    if isinstance(quantity, int) and isinstance(enrolled, int) and quantity > enrolled:
        # The VMs to launch need the group's user-data: that of create, or of the last rotation.
        line += f"; its join token enrolls {quantity - enrolled} more"
        line += f" until {render.when(expires)}" if render.when(expires) else ""
    print(line, file=err)
    if args.json:
        _print_json(out, answer)
    return EXIT_OK


async def cmd_extend(broker: BrokerClient, args: Args, out: IO[str], err: IO[str]) -> int:
    """``extend CTX --expires-in DURATION``: the context expires that long from now."""
    summary = await broker.call("POST", f"/v1/contexts/{args.context}/extend", {"expires_in": args.expires_in})
    expires = summary.get("expires") if isinstance(summary, dict) else None
    if not render.when(expires):
        raise CliError("broker: the extend answer has no expiry")
    print(f"context {args.context} expires {render.when(expires)} "
          f"({render.until(expires, broker.clock.seconds())})", file=err)
    if args.json:
        _print_json(out, summary)
    return EXIT_OK


async def cmd_user_add(broker: BrokerClient, args: Args, out: IO[str], err: IO[str]) -> int:
    """``user add NAME [--write-config FILE [--profile P] [--force]]``: mint a deployer credential;
    its token is printed once, on stdout, or written into a complete ctxctl configuration for
    them: this broker's URL and CA (as this ctxctl reaches and trusts it) and the token."""
    path = profile = None
    if args.write_config:
        # Before the credential exists: a file that cannot be written would lose its token.
        path = configfile.check_writable(args.write_config, args.force)
        profile = args.write_profile or _profile_name(broker.url)
        if broker.ca_pem is None:
            raise CliError("no CA certificate to write into the configuration")
    answer = await broker.call("POST", "/v1/users", {"name": args.name}, expect=(201,))
    token = answer.get("token") if isinstance(answer, dict) else None
    if not isinstance(token, str):
        raise CliError("broker: the answer has no token")
    if path is None or profile is None or broker.ca_pem is None:
        if args.json:
            _print_json(out, {"name": args.name, "token": token})
        else:
            print(token, file=out)
        print(f"deployer {args.name} added; the token above is shown only once: give it to them "
              "(they use it with --token-file, or in a configuration: see --write-config)", file=err)
        return EXIT_OK
    try:
        configfile.write_config(path, configfile.new_config(profile, broker.url, broker.ca_pem.decode("ascii"), token))
    except CliError as e:
        print(token, file=out)
        raise CliError(f"deployer {args.name} was added but {e}; its token, shown only once, is on "
                       "stdout") from None
    print(f"deployer {args.name} added; wrote their ctxctl configuration (profile {profile}: {broker.url}, "
          f"its CA and the token) to {path} (0600): give it to them privately; ctxctl reads it with "
          "--config FILE, or by itself as ~/.config/ctxctl/config.json", file=err)
    if args.json:
        _print_json(out, {"name": args.name, "config": path, "profile": profile, "url": broker.url})
    return EXIT_OK


def _profile_name(url: str) -> str:
    """A profile's default name: the broker's host name (so profiles of several brokers differ)."""
    host = urlsplit(url).hostname
    return host if rules.is_name(host) else "default"


async def cmd_user_list(broker: BrokerClient, args: Args, out: IO[str], err: IO[str]) -> int:
    """``user list [--json]``: deployers, with when they were added and revoked."""
    return await _list(broker, "/v1/users", "users", render.user_table, args, out)


async def cmd_user_revoke(broker: BrokerClient, args: Args, out: IO[str], err: IO[str]) -> int:
    """``user revoke NAME``: the deployer's credential stops working at once."""
    answer = await broker.call("DELETE", f"/v1/users/{args.name}")
    print(f"deployer {args.name} revoked", file=err)
    if args.json:
        _print_json(out, answer)
    return EXIT_OK


async def cmd_status(broker: BrokerClient, args: Args, out: IO[str], err: IO[str]) -> int:
    """``status CTX [--json] [--watch [--interval S]]``: the expiry, one row per group (target size,
    members, departed, lease), per node (with why it waits, or its error) and per slot not enrolled,
    per departed node, then the counts; --watch: again at every change, until interrupted."""
    if getattr(args, "watch", False):
        return await _StatusWatch(broker, args, out, err).run()
    status = await _get_status(broker, args.context)
    _print_lines(out, [json.dumps(status, indent=2, sort_keys=True)] if args.json
                 else render.status_table(status, now=broker.clock.seconds()))
    return EXIT_OK


async def cmd_wait(broker: BrokerClient, args: Args, out: IO[str], err: IO[str]) -> int:
    """``wait CTX [--keep-going]``: follow the context until every expected node is ok (0), one
    fails (1; with --keep-going not before the timeout: a node in error may try again) or time
    runs out (3); then write the reports from its full status, fetched once, under --reports
    (default :func:`reports_home`)."""
    follow = _Follow(broker, args, err)
    await follow.run()
    status = follow.status
    if status is None:
        if args.json:
            _print_json(out, _wait_result(args.context, None, None, False))
        raise CliError(f"timed out after {args.timeout:g} s: {follow.unavailable or 'no answer from the broker'}",
                       EXIT_TIMEOUT)
    report_dir = render.write_reports(status, os.path.join(args.reports or reports_home(), args.context))
    failed = render.first_failed_node(status)
    if args.json:
        _print_json(out, _wait_result(args.context, status, report_dir, getattr(follow, "keep_going", False)))
    if failed is not None and not follow.keep_going:
        _print_lines(err, render.failure_report(failed) + [f"reports in {report_dir}"])
        raise CliError(render.failure_line(failed))
    if status.get("all_ok") is True:
        print(f"all {render.count(status, 'expected')} nodes ok; reports in {report_dir}", file=err)
        return EXIT_OK
    if failed is not None:
        # --keep-going, and time is up with nodes still in error.
        errors = render.count(status, "error")
        _print_lines(err, render.failure_report(failed) + [f"reports in {report_dir}"])
        raise CliError(f"timed out after {args.timeout:g} s: {errors} node{'s' if errors != 1 else ''} in error "
                       f"(the first: {render.failure_line(failed)}); {render.silent_nodes(status)}", EXIT_TIMEOUT)
    print(f"reports in {report_dir}", file=err)
    raise CliError(f"timed out after {args.timeout:g} s: {render.silent_nodes(status)}"
                   + (f"; last poll: {follow.unavailable}" if follow.unavailable else ""), EXIT_TIMEOUT)


#: How long one progress long-poll waits at the broker for a change (the broker allows up to
#: rules.MAX_WAIT), and how much longer its request may take (the network, the journal's barrier).
LONG_POLL_WAIT = 30
LONG_POLL_GRACE = 15.0


class _Follow:
    """``wait``'s following of a context: the last progress and full status seen, and the
    progress line on ``err`` (redrawn in place on a terminal).

    It long-polls the context's progress (``GET .../progress?since=REV&wait=S``: the counts, the
    lock and the oldest error, a small answer however many nodes the context has) and fetches
    the full status, which lists every node, once: when the progress says the wait is over (all
    ok, or a node failed) or the time is up. Two progress requests start at least ``--interval``
    seconds apart: while nodes keep changing (an enrollment storm) wait asks no more often than
    it used to poll, and while they do not it asks once per LONG_POLL_WAIT. A broker without the
    progress route (a 404 for it while the status answers) is polled for the full status every
    ``--interval`` seconds, as before the route existed. A broker that stops answering after it
    was reached once (a restart) is retried every ``--interval`` seconds until the deadline.

    The line says how long wait has waited and why the node that waits longest waits (the
    progress' ``waiting``); on a terminal it is redrawn every second (its elapsed time), else
    printed when something but the time changed. With --keep-going a node's error does not end
    the wait (it may try again): the line counts the nodes in error, and each new oldest error
    is said once.
    """

    def __init__(self, broker: BrokerClient, args: Args, err: IO[str]) -> None:
        self.broker, self.args, self.err = broker, args, err
        self.tty = isatty(err)
        self.keep_going = bool(getattr(args, "keep_going", False))
        self.started = broker.clock.seconds()
        self.shown: Optional[Mapping[str, Any]] = None  # the progress (or status) the line shows
        self.errors_said: List[str] = []
        self.status: Optional[Mapping[str, Any]] = None
        self.long_polls = True  # False: the broker has no progress route; poll its status
        self.since = -1  # the revision of the last progress; -1: answer at once
        self.next_request = 0.0  # (clock time) no request before this
        self.reached = False
        self.unavailable: Optional[str] = None
        self.last_line: Optional[str] = None  # on a terminal, the line last drawn
        self.last_shown: Optional[str] = None  # the line last shown, without the time
        self.warned_unlocked = False

    async def run(self) -> None:
        clock = self.broker.clock
        deadline = clock.seconds() + self.args.timeout
        ticker = None
        if self.tty:
            ticker = task.LoopingCall(self._draw)
            ticker.clock = clock
            ticker.start(1.0, now=False)
        try:
            while True:
                step = self._long_poll if self.long_polls else self._poll
                over = await step(deadline - clock.seconds())
                done = clock.seconds() >= deadline
                if (over or done) and self.long_polls:
                    # The progress says it is over (or time is up): the full status, for the
                    # reports, has the last word (a node may have changed in between).
                    status = await self._fetch_status()
                    over = status is not None and _over(status, self.keep_going)
                if over or done:
                    return
                if self.unavailable or not self.long_polls:
                    self.next_request = clock.seconds() + self.args.interval
                pause = min(self.next_request, deadline) - clock.seconds()
                if pause > 0:
                    await task.deferLater(clock, pause)
        finally:
            if ticker is not None and ticker.running:
                ticker.stop()
            if self.tty and self.last_line is not None:
                print("", file=self.err)

    async def _long_poll(self, remaining: float) -> bool:
        """One progress long-poll; whether it says the wait is over (a node failed, or all are ok)."""
        clock, cid = self.broker.clock, self.args.context
        wait = max(0, min(LONG_POLL_WAIT, int(remaining)))
        if wait == 0 and self.since >= 0:
            # Less than a second left: nothing the broker could say before the deadline.
            await task.deferLater(clock, max(0.0, remaining))
            return False
        self.next_request = clock.seconds() + self.args.interval
        try:
            code, progress = await self.broker.call_status(
                "GET", f"/v1/contexts/{cid}/progress?since={self.since}&wait={wait}", expect=(200, 304),
                timeout=min(wait + LONG_POLL_GRACE, max(1.0, remaining + 1.0)))
        except BrokerRefusal as e:
            if e.status != 404:
                raise
            # The context is gone (then its status is a 404 too, which ends the wait) or the
            # broker predates the progress route (its status answers): poll the status from now on.
            self.reached = True
            over = await self._poll(remaining)
            self.long_polls = self.unavailable is not None
            return over
        except BrokerUnavailable as e:
            self._unreachable(e)
            return False
        self._reachable()
        if code == 304:
            return False
        if not isinstance(progress, dict):
            raise CliError(f"broker: the progress of {cid} is not a progress object")
        revision = progress.get("revision")
        advanced = isinstance(revision, int) and not isinstance(revision, bool) and revision > self.since
        self.since = revision if advanced else -1
        self._show(progress)
        return (render.count(progress, "error") > 0 and not self.keep_going) or progress.get("all_ok") is True

    async def _poll(self, remaining: float) -> bool:
        """One poll of the full status; whether the wait is over (a node failed, or all are ok)."""
        timeout = self.broker.timeout or remaining
        try:
            self.status = await _get_status(self.broker, self.args.context, timeout=max(1.0, min(remaining, timeout)))
        except BrokerUnavailable as e:
            self._unreachable(e)
            return False
        self._reachable()
        self._show(self.status)
        return _over(self.status, self.keep_going)

    async def _fetch_status(self) -> Optional[Mapping[str, Any]]:
        """The full status (with the client's usual request timeout: it may be large), or None if
        the broker cannot be reached."""
        try:
            self.status = await _get_status(self.broker, self.args.context)
        except BrokerUnavailable as e:
            self._unreachable(e)
            return None
        self._reachable()
        self._show(self.status)
        return self.status

    def _unreachable(self, e: BrokerUnavailable) -> None:
        if not self.reached:
            raise e  # never reached it: more likely a wrong --url than a restart
        if str(e) != self.unavailable:
            self._say(f"{e}; retrying")
            if self.tty and self.last_line is not None:
                print("\r" + self.last_line + "\x1b[K", end="", file=self.err, flush=True)
        self.unavailable = str(e)
        self.since = -1  # perhaps another broker (a standby, a restored backup): start afresh

    def _reachable(self) -> None:
        if self.unavailable:
            self._say("broker reachable again")
        self.unavailable = None
        self.reached = True

    def _show(self, progress: Mapping[str, Any]) -> None:
        """The line of a progress or a status (the same counts), a warning, once, when the context
        is not locked, and with --keep-going each new oldest error, once."""
        if progress.get("locked") is False and not self.warned_unlocked:
            cid = self.args.context
            self._say(f"context {cid} is not locked: nodes wait for `ctxctl lock {cid}`")
            self.warned_unlocked = True
        if self.keep_going:
            failed = render.first_failed_node(progress) if "nodes" in progress else None
            error = render.failure_line(failed) if failed is not None else render.progress_error_line(progress)
            if error is not None and error not in self.errors_said:
                self.errors_said.append(error)
                self._say(f"{error}; waiting on (--keep-going)")
        self.shown = progress
        unchanged = render.follow_line(progress, None, self.keep_going)  # without the time
        if self.tty:
            self._draw()
        elif unchanged != self.last_shown:
            print(render.follow_line(progress, self._elapsed(), self.keep_going), file=self.err)
        self.last_shown = unchanged

    def _draw(self) -> None:
        """On a terminal: the line, redrawn in place (cut to the terminal's width: a line that
        wraps cannot be redrawn)."""
        if self.shown is None:
            return
        line = render.follow_line(self.shown, self._elapsed(), self.keep_going)
        line = line[:max(20, _columns(self.err) - 1)]
        print("\r" + line + "\x1b[K", end="", file=self.err, flush=True)
        self.last_line = line

    def _elapsed(self) -> float:
        return self.broker.clock.seconds() - self.started

    def _say(self, message: str) -> None:
        """A message on a line of its own (after the progress line, on a terminal)."""
        print(("\n" if self.tty and self.last_line is not None else "") + message, file=self.err)


#: What a terminal is sent to redraw ``status --watch``: cursor home, clear the screen.
CLEAR_SCREEN = "\x1b[H\x1b[2J"


class _StatusWatch:
    """``status --watch``: the status table again at every change, until interrupted (Ctrl-C,
    exit 0).

    It follows the context's progress as ``wait`` does (long-polls, two requests at least
    ``--interval`` seconds apart) and fetches the full status, which lists every node, only when
    the progress revision moved. On a terminal the screen is cleared and the table redrawn in
    place, and again every ``--interval`` seconds (the times in it move on); elsewhere each new
    table is printed after the last, a blank line between. A broker without the progress route
    is polled for its status every ``--interval`` seconds; one that stops answering after it was
    reached is retried every ``--interval`` seconds, which the table's last line says.
    """

    def __init__(self, broker: BrokerClient, args: Args, out: IO[str], err: IO[str]) -> None:
        self.broker, self.args, self.out, self.err = broker, args, out, err
        self.tty = isatty(out)
        self.interval: float = getattr(args, "interval", None) or 2.0
        self.status: Optional[Mapping[str, Any]] = None
        self.long_polls = True
        self.since = -1
        self.reached = False
        self.unavailable: Optional[str] = None
        self.drawn = 0

    async def run(self) -> int:
        clock = self.broker.clock
        ticker = None
        try:
            while True:
                next_request = clock.seconds() + self.interval
                await self._step()
                if self.tty and ticker is None and self.status is not None:
                    ticker = task.LoopingCall(self._draw)
                    ticker.clock = clock
                    ticker.start(self.interval, now=False)
                pause = next_request - clock.seconds()
                if pause > 0:
                    await task.deferLater(clock, pause)
        except defer.CancelledError:
            return EXIT_OK  # Ctrl-C: how watching ends
        finally:
            if ticker is not None and ticker.running:
                ticker.stop()

    async def _step(self) -> None:
        """One progress long-poll, and the full status when it moved (or one poll of the status)."""
        if not self.long_polls:
            await self._fetch_status()
            return
        cid = self.args.context
        try:
            code, progress = await self.broker.call_status(
                "GET", f"/v1/contexts/{cid}/progress?since={self.since}&wait={LONG_POLL_WAIT}",
                expect=(200, 304), timeout=LONG_POLL_WAIT + LONG_POLL_GRACE)
        except BrokerRefusal as e:
            if e.status != 404:
                raise
            # The context is gone (its status says so: a 404 ends the watch) or the broker
            # predates the progress route: poll its status from now on.
            self.long_polls = False
            await self._fetch_status()
            return
        except BrokerUnavailable as e:
            self._unreachable(e)
            return
        if code == 304:
            self._reachable()
            return
        if not isinstance(progress, dict):
            raise CliError(f"broker: the progress of {cid} is not a progress object")
        revision = progress.get("revision")
        advanced = isinstance(revision, int) and not isinstance(revision, bool) and revision > self.since
        self.since = revision if advanced else -1
        if advanced or self.status is None:
            await self._fetch_status()
        else:
            self._reachable()

    async def _fetch_status(self) -> None:
        try:
            self.status = await _get_status(self.broker, self.args.context)
        except BrokerUnavailable as e:
            self._unreachable(e)
            return
        self._reachable(draw=False)
        self._draw()

    def _unreachable(self, e: BrokerUnavailable) -> None:
        if not self.reached:
            raise e  # never reached it: more likely a wrong --url than a restart
        self.since = -1
        if str(e) != self.unavailable:
            self.unavailable = str(e)
            if self.tty:
                self._draw()
            else:
                print(f"{e}; retrying every {self.interval:g} s", file=self.err)

    def _reachable(self, draw: bool = True) -> None:
        self.reached = True
        if self.unavailable:
            self.unavailable = None
            if not self.tty:
                print("broker reachable again", file=self.err)
            elif draw:
                self._draw()

    def _draw(self) -> None:
        if self.status is None:
            return
        now = self.broker.clock.seconds()
        lines = [f"{render.when(now)}: ctxctl status {self.args.context} --watch (Ctrl-C to stop)"]
        lines += render.status_table(self.status, now=now)
        if self.unavailable and self.tty:
            lines.append(f"{self.unavailable}; retrying every {self.interval:g} s (the table above is "
                         "the last one seen)")
        if self.tty:
            self.out.write(CLEAR_SCREEN + "\n".join(lines) + "\n")
            self.out.flush()
        else:
            _print_lines(self.out, ([""] if self.drawn else []) + lines)
            self.out.flush()
        self.drawn += 1


def _over(status: Mapping[str, Any], keep_going: bool = False) -> bool:
    """Whether a full status ends the wait: a node failed (unless ``keep_going``), or all are ok."""
    return (render.first_failed_node(status) is not None and not keep_going) or status.get("all_ok") is True


def reports_home(environ: Mapping[str, str] = os.environ) -> str:
    """Where ``wait`` writes reports by default (REPORTS/CTX/): ``$XDG_STATE_HOME/ctxctl/reports``,
    else ``~/.local/state/ctxctl/reports`` - the deployer's own state, wherever wait runs from
    (the XDG base directory rule: a relative XDG_STATE_HOME is ignored)."""
    base = environ.get("XDG_STATE_HOME") or ""
    if not os.path.isabs(base):
        base = os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "ctxctl", "reports")


def _columns(stream: IO[str]) -> int:
    """The width of the terminal ``stream`` writes to (80 when it cannot be known)."""
    try:
        return os.get_terminal_size(stream.fileno()).columns or 80
    except (AttributeError, ValueError, OSError):
        return 80


async def cmd_known_hosts(broker: BrokerClient, args: Args, out: IO[str], err: IO[str]) -> int:
    """``known-hosts CTX [--per-host] [--write [--file PATH]]``: the context's ``@cert-authority``
    line when it has an SSH CA, then ``FQDN,SHORT,IP TYPE KEY`` for every node whose sshd presents
    no SSH host certificate (its group has none, or ``sshd = false``) (--per-host: for every node,
    and no CA line). --json: ``{"context",
    "lines", "warnings"}`` (and ``"file"`` it wrote with --write)."""
    status = await _get_status(broker, args.context)
    ca_line: Optional[str] = None
    certified: Collection[str] = ()
    if not args.per_host:
        cas = await _get_cas(broker, args.context, context_checked=True)
        ssh = cas.get("ssh") if cas is not None else None
        if ssh is not None:
            try:
                ca_line = render.cert_authority_line(ssh)
            except ValueError as e:
                raise CliError(f"broker: the SSH CA of context {args.context}: {e}") from None
            certified = render.ssh_certified_groups(ssh, status)
    lines, problems = render.known_hosts_lines(status, certified)
    _print_lines(err, [f"ctxctl: warning: {problem}" for problem in problems])
    if ca_line is not None:
        lines.insert(0, ca_line)
    result: Dict[str, Any] = {"context": args.context, "lines": lines, "warnings": problems}
    if not args.write:
        if args.json:
            _print_json(out, result)
        else:
            _print_lines(out, lines)
        return EXIT_OK
    path = os.path.expanduser(args.file)
    try:
        with open(path, "r", encoding="utf-8", newline="") as f:
            current = f.read()
    except FileNotFoundError:
        current = ""
    except (OSError, UnicodeDecodeError) as e:
        raise CliError(f"cannot read {path}: {reason(e)}") from None
    try:
        merged = render.replace_managed_block(current, args.context, lines)
    except ValueError as e:
        raise CliError(f"{path}: {e}; fix the file by hand") from None
    try:
        write_atomic(path, merged.encode("utf-8"), 0o600, create_dir=True)
    except OSError as e:
        raise CliError(f"cannot write {path}: {reason(e)}") from None
    keys = len(lines) - (ca_line is not None)
    what = f"its SSH CA and {keys} host keys" if ca_line is not None else f"{keys} host keys"
    print(f"wrote {what} of context {args.context} to {path}", file=err)
    if args.json:
        _print_json(out, dict(result, file=path))
    return EXIT_OK


async def cmd_ca(broker: BrokerClient, args: Args, out: IO[str], err: IO[str]) -> int:
    """``ca CTX [--out FILE] [--json]``: the context's X.509 CA bundle (PEM), what its nodes
    trust; with --json the broker's answer (the SSH CA too)."""
    cid = args.context
    cas = await _get_cas(broker, cid)
    if cas is None:
        raise CliError(f"broker: GET /v1/contexts/{cid}/ca answered 404 though the context exists: "
                       "a ctxd older than host credentials")
    if args.json:
        text, what = json.dumps(cas, indent=2, sort_keys=True) + "\n", "the CAs"
    else:
        x509 = cas.get("x509")
        if x509 is None:
            raise CliError(f"context {cid} has no X.509 CA: none of its groups has a [group.certificate] table")
        try:
            text, count = render.ca_bundle(x509.get("bundle") if isinstance(x509, dict) else None)
        except ValueError as e:
            raise CliError(f"broker: the X.509 CA of context {cid}: {e}") from None
        what = f"the X.509 CA bundle ({count} certificate{'s' if count != 1 else ''})"
    if args.out is None:
        out.write(text)
        return EXIT_OK
    path = os.path.expanduser(args.out)
    try:
        # Public: what every node and client of the cluster trusts.
        write_atomic(path, text.encode("utf-8"), 0o644)
    except OSError as e:
        raise CliError(f"cannot write {path}: {reason(e)}") from None
    print(f"wrote {what} of context {cid} to {path}", file=err)
    return EXIT_OK


async def _get_cas(broker: BrokerClient, cid: str, context_checked: bool = False) -> Optional[Dict[str, Any]]:
    """The context's certificate authorities (``GET /v1/contexts/CID/ca``: ``{"x509": ..., "ssh":
    ...}``, each null when none), or None from a broker older than host credentials: a 404 for
    the route while the context exists (which ``context_checked`` says is known already)."""
    try:
        cas = await broker.call("GET", f"/v1/contexts/{cid}/ca")
    except BrokerRefusal as e:
        if e.status != 404:
            raise
        if not context_checked:
            await _get_status(broker, cid)  # the context's own 404, when that is what it was
        return None
    if not isinstance(cas, dict):
        raise CliError(f"broker: the CAs of context {cid} are not a JSON object")
    return cas


async def cmd_data_put(broker: BrokerClient, args: Args, out: IO[str], err: IO[str]) -> int:
    """``data put CTX NAME FILE...``: replace a data item's values (before the context is locked)."""
    values = []
    total = 0
    for path in args.files:
        content = read_small_file(path, "data file", rules.MAX_BODY)
        total += len(content)
        values.append({"b64": base64.b64encode(content).decode("ascii")})
    summary = await broker.call("PUT", f"/v1/contexts/{args.context}/data/{args.name}", {"values": values})
    revision = summary.get("revision") if isinstance(summary, dict) else None
    print(f"data {args.name} of context {args.context}: {len(values)} value(s), {total} bytes stored"
          + (f" (revision {revision})" if revision is not None else ""), file=err)
    if args.json:
        _print_json(out, summary)
    return EXIT_OK


async def cmd_lock(broker: BrokerClient, args: Args, out: IO[str], err: IO[str]) -> int:
    """``lock CTX``: no more data changes; nodes can now get a complete view."""
    summary = await broker.call("POST", f"/v1/contexts/{args.context}/lock", {})
    print(f"context {args.context} locked", file=err)
    if args.json:
        _print_json(out, summary)
    return EXIT_OK


async def cmd_list(broker: BrokerClient, args: Args, out: IO[str], err: IO[str]) -> int:
    """``list [--json]``: every context the broker holds (that this deployer created)."""
    return await _list(broker, "/v1/contexts", "contexts", render.context_table, args, out)


async def _list(broker: BrokerClient, path: str, key: str, table: Callable[[List[Any]], List[str]],
                args: Args, out: IO[str]) -> int:
    """GET ``path``, whose answer holds a list under ``key``: its JSON with --json, else ``table``."""
    answer = await broker.call("GET", path)
    items = answer.get(key) if isinstance(answer, dict) else None
    if not isinstance(items, list):
        raise CliError(f"broker: the answer has no {key} array")
    if args.json:
        _print_lines(out, [json.dumps(answer, indent=2, sort_keys=True)])
    elif items:
        _print_lines(out, table(items))
    else:   # a header alone would look like a failure to list
        print({"contexts": "no contexts yet", "users": "no deployers yet"}.get(key, f"no {key}"), file=out)
    return EXIT_OK


async def cmd_delete(broker: BrokerClient, args: Args, out: IO[str], err: IO[str]) -> int:
    """``delete CTX``: remove the context; its agents get 404 from then on."""
    answer = await broker.call("DELETE", f"/v1/contexts/{args.context}")
    print(f"deleted context {args.context}", file=err)
    if args.json:
        _print_json(out, answer)
    return EXIT_OK


Command = Callable[[BrokerClient, Args, IO[str], IO[str]], Awaitable[int]]


COMMANDS: Dict[str, Command] = {
    "create": cmd_create,
    "status": cmd_status,
    "wait": cmd_wait,
    "known-hosts": cmd_known_hosts,
    "ca": cmd_ca,
    "data put": cmd_data_put,
    "lock": cmd_lock,
    "list": cmd_list,
    "delete": cmd_delete,
    "user add": cmd_user_add,
    "user list": cmd_user_list,
    "user revoke": cmd_user_revoke,
    "node revoke": cmd_node_revoke,
    "node remove": cmd_node_remove,
    "scale": cmd_scale,
    "extend": cmd_extend,
    "join-token rotate": cmd_join_token_rotate,
}


async def _get_status(broker: BrokerClient, cid: str, timeout: Optional[float] = None) -> Dict[str, Any]:
    status = await broker.call("GET", f"/v1/contexts/{cid}", timeout=timeout)
    if not isinstance(status, dict) or not isinstance(status.get("nodes", []), list):
        raise CliError(f"broker: the status of {cid} is not a status object")
    return status


def _print_lines(stream: IO[str], lines: List[str]) -> None:
    for line in lines:
        print(line, file=stream)


def _print_json(out: IO[str], value: Any) -> None:
    """--json: ``value`` as the one JSON document on stdout."""
    print(json.dumps(value, indent=2, sort_keys=True), file=out)


def _paths(out_dir: str, files: List[Tuple[str, bytes]]) -> List[str]:
    return [os.path.join(out_dir, filename) for filename, _ in files]


def _wait_result(cid: str, status: Optional[Mapping[str, Any]], report_dir: Optional[str],
                 keep_going: bool) -> Dict[str, Any]:
    """``wait --json``: how it ended (``"outcome"``: ok, error or timeout, as the exit code says),
    the counts, the first node in error and where the reports are; not the full status, which
    may list thousands of nodes (``status --json`` prints it)."""
    failed = render.first_failed_node(status) if status is not None else None
    if status is not None and status.get("all_ok") is True:
        outcome = "ok"
    elif failed is not None and not keep_going:
        outcome = "error"
    else:
        outcome = "timeout"
    first = None
    if failed is not None:
        problem = failed.get("error") if isinstance(failed.get("error"), dict) else {}
        first = {"node": failed.get("id"), "group": failed.get("group"),
                 "hostname": (failed.get("identity") or {}).get("hostname"),
                 "exit_code": problem.get("exit_code"), "message": problem.get("message")}
    return {"context": cid, "outcome": outcome, "counts": (status or {}).get("counts"),
            "all_ok": (status or {}).get("all_ok") is True, "failed": first, "reports": report_dir}


def isatty(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _call_user_data(function: Callable[..., Any], *args: Any) -> Any:
    try:
        return function(*args)
    except UserDataError as e:
        raise CliError(str(e)) from None


def _remove_if_empty(path: str) -> None:
    try:
        os.rmdir(path)
    except OSError:
        pass  # not empty, or already gone: leave it


def _prepare_private_dir(path: str) -> str:
    path = os.path.expanduser(path)
    try:
        if not os.path.isdir(path):
            os.makedirs(path, mode=0o700)
            os.chmod(path, 0o700)  # makedirs' mode goes through the umask
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as e:
        raise CliError(f"cannot use output directory {path}: {reason(e)}") from None
    return path
