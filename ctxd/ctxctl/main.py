"""ctxctl's command line: the argument parser and the top level.

Whatever happens, one ``ctxctl: error: ...`` line and an exit code, never a traceback.
"""

import argparse
import os
import sys
from typing import IO, Any, Callable, NoReturn, Optional, Sequence

from twisted.internet import defer, task

import ctxd
from ctxd import rules
from ctxd.ctxctl.client import (
    ENV_CA,
    ENV_STATE_DIR,
    ENV_TOKEN_FILE,
    ENV_URL,
    BrokerClient,
    Credentials,
    load_credentials,
    make_client,
    resolve_settings,
)
from ctxd.ctxctl.cluster import parse_duration
from ctxd.ctxctl.commands import COMMANDS
from ctxd.ctxctl.config import ENV_CONFIG, ENV_PROFILE
from ctxd.ctxctl.contexts import context_id
from ctxd.ctxctl.errors import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_USAGE, CliError
from ctxd.ctxctl.render import printable
from ctxd.ctxctl.userdata import USER_DATA_LIMIT


EPILOG = """\
The broker is found from --url/--token-file/--ca, else a profile of --config FILE (--profile
NAME), else --state-dir DIR: the ctxctl.json that ctxd writes there; then from the same in the
environment (CTXCTL_URL/CTXCTL_TOKEN_FILE/CTXCTL_CA, CTXCTL_CONFIG/CTXCTL_PROFILE,
CTXCTL_STATE_DIR); then from ~/.config/ctxctl/config.json (or $XDG_CONFIG_HOME/ctxctl/), the
configuration `ctxctl user add NAME --write-config FILE` writes. These options may also follow
the command. The broker's certificate is always verified against the CA.

Results go to stdout, messages and progress to stderr.

exit codes:
  0  success (wait: every expected node reported ok)
  1  error (one 'ctxctl: error: ...' line on stderr; wait: a node reported an error)
  2  usage error (bad options or arguments, e.g. a malformed context id)
  3  wait timed out before every expected node reported
"""


def _checked(valid: Callable[[str], bool], what: str) -> Callable[[str], str]:
    """An argparse type that accepts what ``valid`` accepts, else says it is not ``what``."""
    def check(value: str) -> str:
        if not valid(value):
            raise argparse.ArgumentTypeError(f"{value!r} is not {what}")
        return value
    return check


def _id_of(kind: str) -> Callable[[str], str]:
    return _checked(rules.is_id, f"a {kind} id ({rules.ID_RULE})")


def _name_of(kind: str) -> Callable[[str], str]:
    return _checked(rules.is_name, f"a valid {kind} name: {rules.NAME_RULE}")


def _quantity(value: str) -> int:
    """A group's target size: 0 (every member removed with --shrink) to rules.MAX_QUANTITY."""
    if not value.isdigit() or not value.isascii():
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of nodes (0 to {rules.MAX_QUANTITY})")
    if int(value) > rules.MAX_QUANTITY:
        raise argparse.ArgumentTypeError(f"{value!r}: a group has at most {rules.MAX_QUANTITY} nodes")
    return int(value)


def _expires_in(value: str) -> int:
    """A context's new lifetime from now: a duration, rules.MIN_SECONDS to rules.MAX_EXPIRES_IN."""
    try:
        seconds = parse_duration(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if not rules.MIN_SECONDS <= seconds <= rules.MAX_EXPIRES_IN:
        raise argparse.ArgumentTypeError(f"{value!r}: a context lives from {rules.MIN_SECONDS}s to "
                                         f"{rules.MAX_EXPIRES_IN // rules.DAY}d from now")
    return seconds


def _user_data_limit(value: str) -> int:
    try:
        limit = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of bytes") from None
    if limit < 4096:
        raise argparse.ArgumentTypeError(f"{value!r}: the user-data limit must be at least 4096 bytes")
    return limit


def _positive_seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds") from None
    if not seconds > 0 or seconds != seconds or seconds == float("inf"):
        raise argparse.ArgumentTypeError(f"{value!r} must be a positive number of seconds")
    return seconds


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error said in one ``ctxctl: error:`` line like every other failure
    (the usage itself is one ``--help`` away). Subcommands' parsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.split(" ", 1)[1] + ": " if " " in self.prog else ""
        self.exit(EXIT_USAGE, f"ctxctl: error: {command}{printable(' '.join(message.split()))} "
                              f"(see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ctxctl argument parser (global options first, then a subcommand)."""
    parser = _Parser(
        prog="ctxctl", description="Deployer's client for the ctxd contextualization broker: it creates "
                                   "contexts from a cluster file, writes each group's bootstrap and cloud-init "
                                   "user-data, follows the nodes as they enroll and report, grows and shrinks "
                                   "live clusters, and manages deployers' and nodes' credentials.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"ctxctl (ctxd) {ctxd.__version__}")
    parser.add_argument("--url", help=f"broker URL, https://HOST:PORT (env {ENV_URL})")
    parser.add_argument("--token-file", metavar="FILE",
                        help=f"file holding your token: the site admin's or a deployer's (env {ENV_TOKEN_FILE})")
    parser.add_argument("--ca", metavar="FILE", help=f"PEM CA certificate the broker must chain to (env {ENV_CA})")
    parser.add_argument("--state-dir", metavar="DIR",
                        help=f"ctxd's state directory; supplies whatever the three above do not (env {ENV_STATE_DIR})")
    parser.add_argument("--config", metavar="FILE",
                        help=f"ctxctl configuration file (env {ENV_CONFIG}; default "
                             "~/.config/ctxctl/config.json, if it exists)")
    parser.add_argument("--profile", metavar="NAME",
                        help=f"the profile of the configuration file to use (env {ENV_PROFILE}; default: "
                             "the file's default)")
    _complete_paths(parser)
    sub = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND", required=True)
    _context_commands(sub)
    _admin_commands(sub)
    _everywhere(parser, [a for a in parser._actions if a.option_strings and a.dest not in ("help", "version")])
    return parser


#: Shell completion of file and directory arguments (by their metavar), as shtab reads it: its
#: FILE and DIRECTORY spelt out, since shtab makes the completion scripts at build time
#: (`make cli-docs`) and is not needed at run time.
_FILES = {"bash": "_shtab_compgen_files", "zsh": "_files", "tcsh": "f"}
_COMPLETE = {"FILE": _FILES, "PATH": _FILES, "CLUSTER.toml": _FILES,
             "DIR": {"bash": "_shtab_compgen_dirs", "zsh": "_files -/", "tcsh": "d"}}


def _complete_paths(parser: argparse.ArgumentParser) -> None:
    for action in parser._actions:
        if action.metavar in _COMPLETE:
            action.complete = _COMPLETE[action.metavar]  # type: ignore[attr-defined]


def _everywhere(parser: argparse.ArgumentParser, global_options: Sequence[argparse.Action]) -> None:
    """Every command also takes the global options after its name (``ctxctl status CTX --config
    F``; given twice, the later wins) and ``--json``; each gets completion for its files."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in dict.fromkeys(action.choices.values()):
                _everywhere(command, global_options)
            return
    taken = {option for action in parser._actions for option in action.option_strings}
    for option in global_options:
        if not taken.intersection(option.option_strings):
            # Not in the command's --help (the top-level --help has them), and not set unless
            # given here: a value given before the command stays.
            parser.add_argument(*option.option_strings, dest=option.dest, metavar=option.metavar,
                                default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    if "--json" not in taken:
        parser.add_argument("--json", action="store_true",
                            help="print the result as one JSON document on stdout (messages stay on stderr)")
    _complete_paths(parser)


def manual_parser() -> argparse.ArgumentParser:
    """:func:`build_parser` as the man page shows it (`make cli-docs`, argparse-manpage): without
    the epilog, which docs/man/ctxctl.1.include says in the page's own sections (CONFIGURATION,
    EXIT STATUS), where roff would not keep its lines apart."""
    parser = build_parser()
    parser.epilog = None
    return parser


def _ctx_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("context", metavar="CTX", type=_context_ref,
                   help="context id, or its name when no other of your contexts has that name")


_context_ref = _checked(lambda value: rules.is_id(value) or rules.is_name(value),
                        f"a context id ({rules.ID_RULE}) or name ({rules.NAME_RULE})")


def _out_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--out", metavar="DIR", required=True, help=f"where to write {what}")
    p.add_argument("--user-data-limit", metavar="BYTES", type=_user_data_limit, default=USER_DATA_LIMIT,
                   help=f"largest user-data the cloud accepts (default {USER_DATA_LIMIT}, EC2's limit; "
                        "give your cloud's if it is larger); a larger document is gzip-compressed")
    p.add_argument("--embed-agent", action="store_true",
                   help="put the agent itself in the user-data, for VMs that must not fetch code (by "
                        "default a short loader fetches it from the broker at boot and checks its SHA-256)")


def _context_commands(sub: Any) -> None:
    """create, status, wait, known-hosts, ca, data put, lock, list, delete."""
    p = sub.add_parser("create", help="create a context from a cluster file; print its id",
                       description="Create a context; write DIR/GROUP.bootstrap.json and DIR/GROUP.user-data "
                                   "for every group; print the context id alone on stdout.")
    p.add_argument("cluster", metavar="CLUSTER.toml", help="cluster file (docs/cluster-file.md)")
    _out_args(p, "bootstraps and user-data")
    p.add_argument("--allow-duplicate-name", action="store_true",
                   help="create it even if one of your contexts has its name already (then neither is "
                        "addressed by name)")

    p = sub.add_parser("status", help="per-node state table and counts",
                       description="The context's expiry, its groups, one row per node (its MESSAGE: why it "
                                   "waits, its error, or when a watching node was last heard of), then the "
                                   "counts. --watch shows it again at every change until interrupted.")
    _ctx_arg(p)
    p.add_argument("--json", action="store_true", help="print the broker's JSON")
    p.add_argument("--watch", action="store_true",
                   help="follow the context: on a terminal the table is redrawn in place, elsewhere each "
                        "new table is printed after the last; Ctrl-C stops (exit 0)")
    p.add_argument("--interval", type=_positive_seconds, metavar="S",
                   help="with --watch: redraw a terminal every S seconds, and at least S seconds between "
                        "two requests (default 2)")

    p = sub.add_parser("wait", help="wait until every node is ok (exit 0), one fails (1) or timeout (3)",
                       description="Follow the context until every expected node reported ok (exit 0), a node "
                                   "reported an error (exit 1) or the timeout passed (exit 3): long-polls of its "
                                   "progress, a small answer however many nodes it has, then its full status "
                                   "once. The progress line says how long it has waited and why the node that "
                                   "waits longest waits. Writes one report file per node under REPORTS/CTX/ "
                                   "(REPORTS: $XDG_STATE_HOME/ctxctl/reports, else "
                                   "~/.local/state/ctxctl/reports).",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _ctx_arg(p)
    p.add_argument("--timeout", type=_positive_seconds, default=1800.0, metavar="S",
                   help="give up after S seconds (default 1800)")
    p.add_argument("--reports", metavar="DIR",
                   help="report directory: the reports go to DIR/CTX/ (default $XDG_STATE_HOME/ctxctl/reports, "
                        "else ~/.local/state/ctxctl/reports)")
    p.add_argument("--keep-going", action="store_true",
                   help="do not stop at a node's error (a node in error may try again): exit 0 when all "
                        "are ok, else 3 at the timeout")
    p.add_argument("--interval", type=_positive_seconds, default=1.0, metavar="S",
                   help="at least this many seconds between two requests (a long-poll that found a "
                        "change, a retry of a broker that cannot be reached, a poll of a broker too old "
                        "to long-poll) (default 1)")

    p = sub.add_parser("known-hosts", help="known_hosts lines for the context's nodes",
                       description="known_hosts lines for the context's nodes: its SSH CA's @cert-authority "
                                   "line when a group has SSH host certificates, then FQDN,SHORT,IP TYPE KEY "
                                   "for every node of the groups whose sshd does not present them (none, or sshd = false).")
    _ctx_arg(p)
    p.add_argument("--per-host", action="store_true",
                   help="a line per host key of every node, and no @cert-authority line")
    p.add_argument("--write", action="store_true", help="merge them into FILE as a managed block")
    p.add_argument("--file", metavar="PATH", help="known_hosts file for --write (default ~/.ssh/known_hosts)")

    p = sub.add_parser("ca", help="the context's X.509 CA bundle (PEM)",
                       description="Print the X.509 CA certificates the context's host certificates chain "
                                   "to (the bundle its nodes get), or write them to FILE.")
    _ctx_arg(p)
    p.add_argument("--out", metavar="FILE", help="write the bundle to FILE (0644) instead of stdout")
    p.add_argument("--json", action="store_true", help="the broker's JSON: the X.509 and SSH CAs")

    p = sub.add_parser("data", help="data items (data put)")
    data_sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    p = data_sub.add_parser("put", help="replace a data item's values with the given files")
    _ctx_arg(p)
    p.add_argument("name", metavar="NAME", type=_name_of("data"), help="data item name")
    p.add_argument("files", metavar="FILE", nargs="+", help="one value per file")

    p = sub.add_parser("lock", help="lock a context that was open for injection")
    _ctx_arg(p)
    p = sub.add_parser("scale", help="set a group's target size on a live context",
                       description="Set the number of nodes GROUP should have. Raised, the group's join token "
                                   "enrolls new VMs up to N (made valid again if it expired); lowered, never "
                                   "below the group's members: remove nodes first with "
                                   "`ctxctl node remove CTX NODE... --shrink`.")
    _ctx_arg(p)
    p.add_argument("group", metavar="GROUP", type=_name_of("group"), help="group name")
    p.add_argument("quantity", metavar="N", type=_quantity, help="the group's new target size")
    p = sub.add_parser("extend", help="change when a context expires",
                       description="The context expires DURATION from now (longer or shorter than before).")
    _ctx_arg(p)
    p.add_argument("--expires-in", metavar="DURATION", type=_expires_in, required=True,
                   help=f"30d, 12h, 90m, 45s or seconds; {rules.MIN_SECONDS}s to "
                        f"{rules.MAX_EXPIRES_IN // rules.DAY}d")
    p = sub.add_parser("list", help="table of contexts")
    p.add_argument("--json", action="store_true", help="print the broker's JSON")
    p = sub.add_parser("delete", help="delete a context")
    _ctx_arg(p)


def _admin_commands(sub: Any) -> None:
    """user add|list|revoke, node revoke|remove, join-token rotate."""
    p = sub.add_parser("user", help="deployer credentials (site admin): user add|list|revoke")
    user_sub = p.add_subparsers(dest="user_command", metavar="ACTION", required=True)
    p = user_sub.add_parser("add", help="mint a deployer credential; print its token once, or write their "
                                        "configuration",
                            description="Mint a credential for deployer NAME. Its token is shown once: on stdout, "
                                        "or, with --write-config, in a complete ctxctl configuration for them "
                                        "(this broker's URL and CA, and the token) that `ctxctl --config FILE` "
                                        "uses, or ctxctl alone once it is their ~/.config/ctxctl/config.json.")
    p.add_argument("name", metavar="NAME", type=_name_of("deployer"), help="deployer name")
    p.add_argument("--write-config", metavar="FILE",
                   help="write the deployer's ctxctl configuration to FILE (0600) instead of printing the token")
    # Here --profile names the profile written; ctxctl's own --profile goes before the command.
    p.add_argument("--profile", metavar="NAME", dest="write_profile", type=_name_of("profile"),
                   help="the profile's name in FILE (default: the broker's host name)")
    p.add_argument("--force", action="store_true", help="replace FILE if it exists")
    p = user_sub.add_parser("list", help="table of deployers")
    p.add_argument("--json", action="store_true", help="print the broker's JSON")
    p = user_sub.add_parser("revoke", help="revoke a deployer's credential")
    p.add_argument("name", metavar="NAME", type=_name_of("deployer"), help="deployer name")

    p = sub.add_parser("node", help="nodes leaving a context: node revoke|remove")
    node_sub = p.add_subparsers(dest="node_command", metavar="ACTION", required=True)
    p = node_sub.add_parser("revoke", help="revoke one node's credential (a compromised VM)",
                            description="Revoke NODE's credential at once (a compromised VM): it departs as "
                                        "revoked, and its slot is not freed.")
    _ctx_arg(p)
    p.add_argument("node", metavar="NODE", type=_id_of("node"), help="node id")
    p = node_sub.add_parser("remove", help="make nodes depart: they leave every view, their slots are freed",
                            description="Each NODE departs (one request each, in order, stopping at the first "
                                        "error): its credential stops working, it leaves every peer's view "
                                        "and its slot is freed for a new VM, unless --shrink lowers the "
                                        "group's target size too.")
    _ctx_arg(p)
    p.add_argument("nodes", metavar="NODE", nargs="+", type=_id_of("node"), help="node id")
    p.add_argument("--shrink", action="store_true",
                   help="also lower the group's target size by one per node (no replacement is expected)")

    p = sub.add_parser("join-token", help="join tokens: join-token rotate")
    join_sub = p.add_subparsers(dest="join_command", metavar="ACTION", required=True)
    p = join_sub.add_parser("rotate", help="new join token for a group; write its bootstrap and user-data",
                            description="Replace GROUP's join token: the old one no longer enrolls VMs. Write "
                                        "the group's new DIR/GROUP.bootstrap.json and DIR/GROUP.user-data "
                                        "(--embed-agent as for create) for the VMs launched from now on.")
    _ctx_arg(p)
    p.add_argument("group", metavar="GROUP", type=_name_of("group"), help="group name")
    _out_args(p, "GROUP.bootstrap.json and .user-data")


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """Parse ``argv``; exits 2 with argparse's usage message on a usage error."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "known-hosts":
        if args.file and not args.write:
            parser.error("known-hosts: --file only makes sense with --write")
        args.file = args.file or os.path.join("~", ".ssh", "known_hosts")
    if args.command == "status" and not args.watch:
        if args.interval is not None:
            parser.error("status: --interval only makes sense with --watch")
    if args.command == "status" and args.watch and args.json:
        parser.error("status: --watch and --json cannot be combined (--json prints one document)")
    if args.command == "node" and args.node_command == "remove":
        twice = sorted({nid for nid in args.nodes if args.nodes.count(nid) > 1})
        if twice:
            parser.error(f"node remove: node {twice[0]} is given twice")
    if args.command == "user" and args.user_command == "add" and not args.write_config:
        if args.write_profile or args.force:
            option = "--profile" if args.write_profile else "--force"
            parser.error(f"user add: {option} only makes sense with --write-config (ctxctl's own "
                         "--profile goes before the command)")
    action = {"data": "data_command", "user": "user_command", "node": "node_command",
              "join-token": "join_command"}.get(args.command)
    args.command_key = f"{args.command} {getattr(args, action)}" if action else args.command
    return args


async def run_command(broker: BrokerClient, args: argparse.Namespace, out: IO[str], err: IO[str]) -> int:
    """Run the chosen command; print ONE ``ctxctl: error:`` line for any failure; return the exit code."""
    try:
        if isinstance(getattr(args, "context", None), str):
            args.context = await context_id(broker, args.context)  # a name: its id
        return await COMMANDS[args.command_key](broker, args, out, err)
    except CliError as e:
        _print_error(err, str(e))
        return e.exit_code
    except defer.CancelledError:
        _print_error(err, "interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # stdout closed early (`ctxctl status --json | head`): stop quietly, as
        # other command-line tools do, and keep Python from complaining at exit.
        if out is sys.stdout:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR
    except Exception as e:
        # No log.failure here: before logging starts, Twisted copies critical
        # events to stderr, and a traceback is exactly what must not appear.
        _print_error(err, f"internal error: {type(e).__name__}: {e}")
        return EXIT_ERROR


def _print_error(err: IO[str], message: str) -> None:
    print(f"ctxctl: error: {printable(' '.join(message.split()))}", file=err, flush=True)


async def _react_main(reactor: Any, args: argparse.Namespace, creds: Credentials) -> None:
    broker = BrokerClient(make_client(reactor, creds.ca_pem), creds.url, creds.token,
                          ca_file=creds.ca_file, clock=reactor, ca_pem=creds.ca_pem)
    running = defer.Deferred.fromCoroutine(run_command(broker, args, sys.stdout, sys.stderr))
    # Ctrl-C stops the reactor; cancel the command so the exit code says so.
    trigger = reactor.addSystemEventTrigger("before", "shutdown", running.cancel)
    try:
        code = await running
    finally:
        reactor.removeSystemEventTrigger(trigger)
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = code or EXIT_ERROR
    if code:
        raise SystemExit(code)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Console entry point (``ctxctl = ctxd.ctxctl.main:main``)."""
    args = parse_args(argv)
    try:
        creds = load_credentials(resolve_settings(args, os.environ))
    except CliError as e:
        _print_error(sys.stderr, str(e))
        sys.exit(e.exit_code)
    task.react(_react_main, (args, creds))
