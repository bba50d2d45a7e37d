"""ctxctl onboarding (issue 16): ``user add --write-config``, the configuration file and its
profiles, where settings come from, global options after the command, contexts by name, and
``--json`` on every command.

Commands run against the real broker through tests/test_cli_args.py's Deployment (the real API
over an in-memory journal, one Clock); settings are resolved from a given environment, never
the test runner's own.
"""

import argparse
import json
import os
import stat

import pytest
from support import ADMIN_TOKEN, torque_cluster
from test_cli_args import CA_PEM, CID, EXAMPLE, URL

from ctxd import tokens
from ctxd.ctxctl import main as cli
from ctxd.ctxctl.client import BrokerSettings, load_credentials, resolve_settings
from ctxd.ctxctl.config import read_config
from ctxd.ctxctl.errors import CliError
from ctxd.ctxctl.main import build_parser, parse_args

NID = "Tm9kZS1pZC0xMjM0NTY3OD"


from test_ctxctl_day import agent, broker  # noqa: E402

#: The fixtures shared with tests/test_ctxctl_day.py: a real broker, a stand-in agent.
FIXTURES = (agent, broker)


def write_config(path, config, mode=0o600):
    path.write_text(json.dumps(config))
    path.chmod(mode)
    return path


def profile(url="https://cfg:1", ca=CA_PEM, token="ctxd_dep_" + "b" * 43):
    return {"url": url, "ca": ca, "token": token}


def settings(argv, environ):
    """The settings ctxctl resolves for ``argv`` (global options, then ``list``) in ``environ``."""
    return resolve_settings(parse_args([*argv, "list"]), environ)


def one_line_error(argv, environ):
    with pytest.raises(CliError) as info:
        load_credentials(settings(argv, environ))
    message = str(info.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------ user add --write-config

def test_user_add_writes_a_complete_configuration_that_ctxctl_uses(broker, tmp_path):
    """user add --write-config writes the deployer's URL, CA (inline PEM) and token, 0600, with the
    profile as default, prints no token; ctxctl --config FILE then works as that deployer."""
    theirs, _ = broker.create()  # the site admin's: the deployer must not see it
    path = tmp_path / "alice.json"
    code, out, err = broker.run(["user", "add", "alice", "--write-config", str(path)])
    assert (code, out) == (0, ""), err
    assert err.startswith(f"deployer alice added; wrote their ctxctl configuration (profile ctxd.test: {URL}, ")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    config = json.loads(path.read_text())
    token = config["profiles"]["ctxd.test"]["token"]
    assert config == {"profiles": {"ctxd.test": {"url": URL, "ca": CA_PEM, "token": token}}, "default": "ctxd.test"}
    creds = load_credentials(settings(["--config", str(path)], {}))
    assert (creds.url, creds.ca_pem) == (URL, CA_PEM.encode())
    assert creds.token.startswith(tokens.DEPLOYER)
    code, out, err = broker.run(["list"], token=creds.token)
    assert (code, out.splitlines()) == (0, ["no contexts yet"]), err


def test_user_add_profile_names_the_profile_and_json_says_where(broker, tmp_path):
    """--profile after user add names the written profile; --json prints where, not the token."""
    path = tmp_path / "cfg" / "alice.json"  # a missing directory is made 0700
    code, out, err = broker.run(["user", "add", "alice", "--write-config", str(path), "--profile", "prod", "--json"])
    assert code == 0, err
    assert json.loads(out) == {"name": "alice", "config": str(path), "profile": "prod", "url": URL}
    assert list(read_config(str(path))["profiles"]) == ["prod"]
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_user_add_refuses_to_overwrite_before_minting(broker, tmp_path):
    """An existing FILE is refused (one line) before any deployer is added; --force replaces it."""
    path = tmp_path / "alice.json"
    path.write_text("keep me")
    code, out, err = broker.run(["user", "add", "alice", "--write-config", str(path)])
    assert (code, out, err) == (1, "", f"ctxctl: error: {path} exists: give --force to replace it\n")
    assert broker.call("GET", "/v1/users")["users"] == [] and path.read_text() == "keep me"
    code, out, err = broker.run(["user", "add", "alice", "--write-config", str(path), "--force"])
    assert code == 0, err
    assert read_config(str(path))["default"] == "ctxd.test"


def test_user_add_without_a_config_prints_the_token_or_json(broker):
    """Without --write-config the token is printed once; with --json inside one JSON document."""
    code, out, err = broker.run(["user", "add", "bob", "--json"])
    answer = json.loads(out)
    assert code == 0 and set(answer) == {"name", "token"} and answer["token"].startswith(tokens.DEPLOYER)


@pytest.mark.parametrize("argv, message", [
    (["user", "add", "alice", "--profile", "p"], "user add: --profile only makes sense with --write-config"),
    (["user", "add", "alice", "--force"], "user add: --force only makes sense with --write-config"),
    (["user", "add", "alice", "--write-config", "f", "--profile", "a b"], "'a b' is not a valid profile name"),
])
def test_user_add_usage_errors(argv, message, capsys, monkeypatch):
    """Options that need --write-config, and a bad profile name, are one usage line (exit 2)."""
    monkeypatch.setattr(cli, "resolve_settings", lambda *a: pytest.fail("settings were resolved"))
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and message in err, err


# ------------------------------------------------------------------ reading the configuration

def test_the_default_place_and_profile(tmp_path):
    """Without --config: $XDG_CONFIG_HOME/ctxctl/config.json, else ~/.config/ctxctl/config.json (a
    relative XDG_CONFIG_HOME is ignored); the file's default profile, else --profile/CTXCTL_PROFILE."""
    xdg = tmp_path / "xdg" / "ctxctl"
    xdg.mkdir(parents=True)
    write_config(xdg / "config.json", {"profiles": {"a": profile("https://a:1"), "b": profile("https://b:2")},
                                       "default": "b"})
    home = tmp_path / "home" / ".config" / "ctxctl"
    home.mkdir(parents=True)
    write_config(home / "config.json", {"profiles": {"h": profile("https://home:3")}})
    env = {"XDG_CONFIG_HOME": str(tmp_path / "xdg"), "HOME": str(tmp_path / "home")}
    assert settings([], env).url == "https://b:2"
    assert settings(["--profile", "a"], env).url == "https://a:1"
    assert settings([], dict(env, CTXCTL_PROFILE="a")).url == "https://a:1"
    assert settings([], dict(env, XDG_CONFIG_HOME="relative")).url == "https://home:3"
    assert settings([], {"HOME": str(tmp_path / "home")}).url == "https://home:3"
    chosen = settings([], env)
    assert (chosen.token_file, chosen.ca_file, chosen.ca_pem) == (None, None, CA_PEM)
    assert chosen.profile == f"profile b of {xdg / 'config.json'}"


def test_precedence_command_line_environment_config_state_dir(tmp_path):
    """Each setting: command line > environment > configuration file > the broker's state dir; a
    source named on the command line beats one named in the environment."""
    state = tmp_path / "state"
    state.mkdir()
    (state / "ctxctl.json").write_text(json.dumps({"url": "https://state:8443", "ca": "ca.pem",
                                                   "token_file": "admin.token"}))
    cfg = write_config(tmp_path / "c.json", {"profiles": {"p": profile("https://cfg:1")}})
    partial = write_config(tmp_path / "partial.json", {"profiles": {"p": {"url": "https://state:8443"}}})
    home = {"HOME": str(tmp_path / "nohome")}
    # the configuration's profile fills what the flags leave, before the state dir
    chosen = settings(["--url", "https://flag:1", "--token-file", "t", "--config", str(cfg),
                       "--state-dir", str(state)], home)
    assert (chosen.url, chosen.token_file, chosen.ca_pem) == ("https://flag:1", "t", CA_PEM)
    # what the profile does not say comes from the state dir
    chosen = settings(["--config", str(partial), "--state-dir", str(state)], home)
    assert (chosen.url, chosen.token_file) == ("https://state:8443", str(state / "admin.token"))
    # environment values beat a configuration named in the environment
    chosen = settings([], dict(home, CTXCTL_CONFIG=str(cfg), CTXCTL_URL="https://env:1", CTXCTL_TOKEN_FILE="t"))
    assert (chosen.url, chosen.token_file, chosen.ca_pem) == ("https://env:1", "t", CA_PEM)
    # the command line's --config beats the environment's state dir, and the reverse
    assert settings(["--config", str(cfg)], dict(home, CTXCTL_STATE_DIR=str(state))).url == "https://cfg:1"
    assert settings(["--state-dir", str(state)], dict(home, CTXCTL_CONFIG=str(cfg))).url == "https://state:8443"
    # an explicit state dir (flag or environment) beats the configuration at its default place
    xdg = tmp_path / "xdg"
    (xdg / "ctxctl").mkdir(parents=True)
    write_config(xdg / "ctxctl" / "config.json", {"profiles": {"d": profile("https://default:1")}})
    assert settings([], {"XDG_CONFIG_HOME": str(xdg), "CTXCTL_STATE_DIR": str(state)}).url == "https://state:8443"
    assert settings([], {"XDG_CONFIG_HOME": str(xdg)}).url == "https://default:1"


def test_a_token_goes_only_to_the_url_of_its_own_source(tmp_path):
    """A profile's or state dir's token is not sent to a URL from elsewhere that differs (one line
    naming both); the same URL, or a token file from the command line/environment, is accepted."""
    xdg = tmp_path / "xdg"
    (xdg / "ctxctl").mkdir(parents=True)
    default = write_config(xdg / "ctxctl" / "config.json", {"profiles": {"a": profile("https://a:1")}})
    env = {"XDG_CONFIG_HOME": str(xdg)}
    assert one_line_error(["--url", "https://b:2", "--ca", "b.pem"], env) == (
        f"the token of profile a of {default} belongs to https://a:1, not to https://b:2 (from --url): "
        "give --token-file or set CTXCTL_TOKEN_FILE to use another token with that URL")
    assert one_line_error([], dict(env, CTXCTL_URL="https://b:2")) == (
        f"the token of profile a of {default} belongs to https://a:1, not to https://b:2 (from CTXCTL_URL): "
        "give --token-file or set CTXCTL_TOKEN_FILE to use another token with that URL")
    state = tmp_path / "state"
    state.mkdir()
    (state / "ctxctl.json").write_text(json.dumps({"url": "https://state:8443", "ca": "ca.pem",
                                                   "token_file": "admin.token"}))
    assert one_line_error(["--url", "https://b:2", "--state-dir", str(state)], {}) == (
        f"the token of {state / 'ctxctl.json'} belongs to https://state:8443, not to https://b:2 (from --url): "
        "give --token-file or set CTXCTL_TOKEN_FILE to use another token with that URL")
    # a profile's URL does not lend itself to the state dir's token, nor a URL-less profile's token to any URL
    other = write_config(tmp_path / "o.json", {"profiles": {"o": {"url": "https://o:1"}}})
    assert "the token of " + str(state / "ctxctl.json") + " belongs to https://state:8443, not to https://o:1 " \
        f"(from profile o of {other})" in one_line_error(["--config", str(other), "--state-dir", str(state)], {})
    bare = write_config(tmp_path / "bare.json", {"profiles": {"p": {"token": profile()["token"]}}})
    assert one_line_error(["--config", str(bare), "--url", "https://b:2"], {}).startswith(
        f"the token of profile p of {bare} names no broker URL, not to https://b:2 (from --url)")
    # the same URL from elsewhere (a trailing slash aside) is the same broker
    chosen = settings(["--url", "https://a:1/"], env)
    assert (chosen.url, chosen.token) == ("https://a:1/", profile()["token"])
    # a token file named explicitly goes where it is told
    assert settings(["--url", "https://b:2"], dict(env, CTXCTL_TOKEN_FILE="t")).token_file == "t"
    assert settings(["--url", "https://b:2", "--token-file", "t"], env).ca_pem == CA_PEM


def test_a_source_is_read_only_when_needed(tmp_path):
    """Flags that say everything make a broken default configuration irrelevant (as a stale state dir)."""
    xdg = tmp_path / "xdg"
    (xdg / "ctxctl").mkdir(parents=True)
    (xdg / "ctxctl" / "config.json").write_text("not json")
    chosen = settings(["--url", "https://a:1", "--token-file", "t", "--ca", "c"], {"XDG_CONFIG_HOME": str(xdg)})
    assert chosen == BrokerSettings("https://a:1", "t", "c")


def test_credentials_from_a_profile_are_checked(tmp_path):
    """A profile's token and CA are checked like files' are, each in one line naming the profile."""
    bad_token = write_config(tmp_path / "t.json", {"profiles": {"p": profile(token="nope")}})
    assert one_line_error(["--config", str(bad_token)], {}) == (
        f"the token of profile p of {bad_token} is not a ctxd token")
    bad_ca = write_config(tmp_path / "c.json", {"profiles": {"p": profile(ca="nope")}})
    assert one_line_error(["--config", str(bad_ca)], {}) == f"the CA of profile p of {bad_ca} is not a PEM certificate"
    missing = write_config(tmp_path / "m.json", {"profiles": {"p": {"url": URL}}})
    assert one_line_error(["--config", str(missing)], {"HOME": str(tmp_path)}) == (
        f"no admin token file and CA certificate: give --token-file/--ca or set CTXCTL_TOKEN_FILE/CTXCTL_CA "
        f"(profile p of {missing} does not name it)")


@pytest.mark.parametrize("content, mode, message", [
    ({"profiles": {"p": profile()}}, 0o640, "is accessible by others (mode 0640) and holds a token: chmod 600 "),
    ({"profiles": {"p": profile()}}, 0o604, "is accessible by others (mode 0604)"),
    ({"profiles": {"p": profile()}}, 0o620, "is accessible by others (mode 0620)"),
    ("{", 0o600, "is not JSON"),
    ([], 0o600, "expected a JSON object with \"profiles\""),
    ({"profiles": {}}, 0o600, "\"profiles\" must be an object with at least one profile"),
    ({"profiles": {"p": profile()}, "defualt": "p"}, 0o600, "unknown key 'defualt'"),
    ({"profiles": {"p": dict(profile(), tokne="x")}}, 0o600, "profile p has an unknown key 'tokne'"),
    ({"profiles": {"p": dict(profile(), url=1)}}, 0o600, "the url of profile p is not a string"),
    ({"profiles": {"p": []}}, 0o600, "profile p is not an object"),
    ({"profiles": {"a b": profile()}}, 0o600, "profile name 'a b' is not"),
    ({"profiles": {"p": profile()}, "default": "q"}, 0o600, "\"default\" names no profile (p)"),
    ({"profiles": {"p": profile(), "q": profile()}}, 0o600,
     "has several profiles (p, q) and no \"default\": give --profile NAME or set CTXCTL_PROFILE"),
])
def test_bad_configuration_files_are_one_line(tmp_path, content, mode, message):
    """A configuration others may read, or that is not what ctxctl writes, is refused in one line
    naming the file."""
    path = tmp_path / "c.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    path.chmod(mode)
    error = one_line_error(["--config", str(path)], {})
    assert error.startswith(f"config file {path}") and message in error, error


def test_missing_and_unusable_configuration_files(tmp_path):
    """An explicitly named file that is missing, a directory, too large, or a profile it does not
    have: one line each. A file owned by another user is refused (when the test can make one)."""
    path = tmp_path / "none.json"
    assert one_line_error(["--config", str(path)], {}) == f"config file {path} does not exist"
    assert one_line_error([], {"CTXCTL_CONFIG": str(path)}) == f"config file {path} does not exist"
    default = tmp_path / "ctxctl" / "config.json"
    assert one_line_error(["--profile", "p"], {"XDG_CONFIG_HOME": str(tmp_path)}) == (
        f"config file {default} does not exist")
    assert one_line_error(["--config", str(tmp_path)], {}) == f"config file {tmp_path} is not a regular file"
    big = write_config(tmp_path / "big.json", {"profiles": {"p": profile(url="x" * (1 << 20))}})
    assert one_line_error(["--config", str(big)], {}) == f"config file {big} is larger than 1048576 bytes"
    good = write_config(tmp_path / "good.json", {"profiles": {"p": profile()}})
    assert one_line_error(["--config", str(good), "--profile", "q"], {}) == (
        f"config file {good} has no profile q (it has p)")
    if os.getuid() == 0:
        os.chown(good, 12345, -1)
        assert one_line_error(["--config", str(good)], {}) == f"config file {good} belongs to another user (uid 12345)"


def test_main_says_a_bad_configuration_in_one_line(tmp_path, capsys, monkeypatch):
    """Through main(): exit 1, one 'ctxctl: error:' line, no traceback."""
    path = write_config(tmp_path / "c.json", {"profiles": {"p": profile()}}, mode=0o644)
    with pytest.raises(SystemExit) as info:
        cli.main(["list", "--config", str(path)])
    captured = capsys.readouterr()
    assert info.value.code == 1 and captured.out == ""
    assert captured.err == (f"ctxctl: error: config file {path} is accessible by others (mode 0644) and holds "
                            f"a token: chmod 600 {path}\n")


# ------------------------------------------------------------------ global options after the command

@pytest.mark.parametrize("argv, expected", [
    (["status", CID, "--config", "F"], {"config": "F", "url": None}),
    (["--url", "https://a:1", "status", CID], {"url": "https://a:1"}),
    (["--url", "https://a:1", "status", CID, "--url", "https://b:2"], {"url": "https://b:2"}),
    (["list", "--state-dir", "S", "--profile", "p", "--token-file", "T", "--ca", "C"],
     {"state_dir": "S", "profile": "p", "token_file": "T", "ca": "C"}),
    (["data", "put", CID, "gridmap", "f", "--url", "https://a:1"], {"url": "https://a:1", "files": ["f"]}),
    (["--profile", "admin", "user", "add", "alice", "--write-config", "f", "--profile", "prod"],
     {"profile": "admin", "write_profile": "prod"}),
])
def test_global_options_after_the_command(argv, expected):
    """The global options may follow the command (the later wins); after ``user add``, --profile
    names the profile written, ctxctl's own goes before the command."""
    args = vars(parse_args(argv))
    assert {key: args[key] for key in expected} == expected


def _leaf_parsers(parser, name="ctxctl"):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command, sub in action.choices.items():
                yield from _leaf_parsers(sub, f"{name} {command}")
            return
    yield name, parser


def test_every_command_takes_json_and_the_global_options():
    """Every command has --json and accepts every global option."""
    options = {"--url", "--token-file", "--ca", "--state-dir", "--config", "--profile", "--json"}
    leaves = dict(_leaf_parsers(build_parser()))
    assert len(leaves) >= 17
    for name, parser in leaves.items():
        assert options <= set(parser._option_string_actions), name


# ------------------------------------------------------------------ contexts by name

def test_commands_take_a_context_by_its_name(broker):
    """A name that is one of the caller's contexts is its id: the request goes to the id's route,
    the output names the id; an id is used as it is, without the list request."""
    cid, _ = broker.create()
    code, out, err = broker.run(["status", "torque-demo"])
    assert code == 0, err
    assert [r[:2] for r in broker.spy.requests] == [("GET", "/v1/contexts"), ("GET", f"/v1/contexts/{cid}")]
    assert f"({cid})" in out.splitlines()[0]
    broker.spy.requests.clear()
    code, out, err = broker.run(["extend", "torque-demo", "--expires-in", "2d"])
    assert (code, err.split(" expires")[0]) == (0, f"context {cid}")
    broker.spy.requests.clear()
    assert broker.run(["status", cid])[0] == 0
    assert [r[:2] for r in broker.spy.requests] == [("GET", f"/v1/contexts/{cid}")]


def test_unknown_and_ambiguous_names_are_one_line(broker):
    """No context of that name, or several: one line (listing the ids), nothing else is sent."""
    code, out, err = broker.run(["delete", "nothing-here"])
    assert (code, out, err) == (1, "", "ctxctl: error: no context named nothing-here (`ctxctl list` shows them)\n")
    first, _ = broker.create()
    second, _ = broker.create()
    broker.spy.requests.clear()
    code, out, err = broker.run(["delete", "torque-demo"])
    assert (code, out) == (1, "")
    assert err == f"ctxctl: error: 2 contexts are named torque-demo: {first}, {second}; give the id\n"
    assert [r[:2] for r in broker.spy.requests] == [("GET", "/v1/contexts")]
    assert len(broker.call("GET", "/v1/contexts")["contexts"]) == 2


def test_a_deployers_names_are_their_own(broker):
    """Another deployer's (or the admin's) context of the same name does not make a deployer's
    name ambiguous: they see only their own."""
    alice = broker.call("POST", "/v1/users", {"name": "alice"}, expect=201)["token"]
    theirs, _ = broker.create()
    status, created = broker.api.call("POST", "/v1/contexts", alice, torque_cluster())
    mine = created["context"]["id"]
    code, out, err = broker.run(["status", "torque-demo", "--json"], token=alice)
    assert (code, json.loads(out)["id"]) == (0, mine), err
    assert theirs != mine


# ------------------------------------------------------------------ create refuses a duplicate name

def test_create_refuses_a_name_the_deployer_uses(broker, tmp_path, agent):
    """create refuses a name its creator already uses, in one line naming the existing id, before
    creating anything or making --out; --allow-duplicate-name creates it all the same."""
    cid, _ = broker.create()
    out_dir = tmp_path / "out"
    code, out, err = broker.run(["create", EXAMPLE, "--out", str(out_dir)])
    assert (code, out) == (1, "")
    assert err == (f"ctxctl: error: context {cid} has the name torque-demo already: give the new one another "
                   "name, or --allow-duplicate-name (then give ids, not that name)\n")
    assert len(broker.call("GET", "/v1/contexts")["contexts"]) == 1 and not out_dir.exists()
    code, out, err = broker.run(["create", EXAMPLE, "--out", str(out_dir), "--allow-duplicate-name"])
    assert code == 0, err
    assert len(broker.call("GET", "/v1/contexts")["contexts"]) == 2


def test_create_duplicate_names_are_per_deployer(broker, tmp_path, agent):
    """A name another deployer uses is free for this one, and for the site admin (whose own
    contexts are those without an owner)."""
    alice = broker.call("POST", "/v1/users", {"name": "alice"}, expect=201)["token"]
    assert broker.api.call("POST", "/v1/contexts", alice, torque_cluster())[0] == 201
    code, out, err = broker.run(["create", EXAMPLE, "--out", str(tmp_path / "admin")])
    assert code == 0, err
    bob = broker.call("POST", "/v1/users", {"name": "bob"}, expect=201)["token"]
    code, out, err = broker.run(["create", EXAMPLE, "--out", str(tmp_path / "bob")], token=bob)
    assert code == 0, err
    code, out, err = broker.run(["create", EXAMPLE, "--out", str(tmp_path / "bob2")], token=bob)
    assert code == 1 and "has the name torque-demo already" in err


# ------------------------------------------------------------------ --json everywhere

def one_document(out):
    """stdout holds exactly one JSON document (and nothing else)."""
    value, end = json.JSONDecoder().raw_decode(out)
    assert out[end:].strip() == ""
    return value


def test_json_on_every_command(broker, tmp_path, agent):
    """Every command that prints data prints one JSON document on stdout with --json."""
    def ok(*argv, token=ADMIN_TOKEN):
        code, out, err = broker.run([*argv, "--json"], token=token)
        assert code == 0, (argv, err)
        return one_document(out)

    created = ok("create", EXAMPLE, "--out", str(tmp_path / "out"))
    cid = created["context"]["id"]
    assert created["files"] == [str(tmp_path / "out" / f) for f in (
        "head.bootstrap.json", "head.user-data", "compute.bootstrap.json", "compute.user-data")]
    assert ok("status", cid)["id"] == cid
    assert [c["id"] for c in ok("list")["contexts"]] == [cid]
    assert ok("ca", cid)["x509"] is None
    (tmp_path / "v").write_text("value")
    data = tmp_path / "v"
    code, out, err = broker.run(["data", "put", cid, "gridmap", str(data), "--json"])
    assert code == 1 and out == ""  # a locked context: an error, and no document
    assert ok("extend", cid, "--expires-in", "2d")["id"] == cid
    assert ok("scale", cid, "compute", "4")["group"]["quantity"] == 4
    rotated = ok("join-token", "rotate", cid, "compute", "--out", str(tmp_path / "rot"))
    assert rotated == {"context": cid, "group": "compute",
                       "files": [str(tmp_path / "rot" / "compute.bootstrap.json"),
                                 str(tmp_path / "rot" / "compute.user-data")]}
    joins = {"compute": json.loads((tmp_path / "rot" / "compute.bootstrap.json").read_text())["join_token"]}
    nodes = [broker.enroll(cid, joins["compute"], n) for n in (2, 3)]
    assert ok("known-hosts", cid) == {"context": cid, "warnings": [], "lines": [
        f"node{n}.cluster.test,node{n},10.9.0.{n} ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI{n:04d}key" for n in (2, 3)]}
    written = ok("known-hosts", cid, "--write", "--file", str(tmp_path / "kh"))
    assert written["file"] == str(tmp_path / "kh") and len(written["lines"]) == 2
    assert ok("node", "remove", cid, nodes[0])["removed"][0]["group"] == "compute"
    assert ok("node", "revoke", cid, nodes[1]) == {"revoked": nodes[1]}
    assert ok("user", "add", "carol")["name"] == "carol"
    assert [u["name"] for u in ok("user", "list")["users"]] == ["carol"]
    assert ok("user", "revoke", "carol") == {"revoked": "carol"}
    assert ok("delete", cid) == {"deleted": cid}


def test_json_for_open_contexts_and_wait(broker, tmp_path):
    """data put and lock print the context's summary; wait prints how it ended (and exits as
    without --json)."""
    status, created = broker.api.call("POST", "/v1/contexts", ADMIN_TOKEN, torque_cluster(open_for_injection=True))
    cid = created["context"]["id"]
    (tmp_path / "v").write_text("value")
    code, out, err = broker.run(["data", "put", cid, "gridmap", str(tmp_path / "v"), "--json"])
    assert code == 0 and one_document(out)["id"] == cid, err
    code, out, err = broker.run(["lock", cid, "--json"])
    assert code == 0 and one_document(out)["locked"] is True, err
    broker.clock.advance(1)
    code, out, err = broker.run(["wait", cid, "--timeout", "5", "--reports", str(tmp_path / "r"), "--json"])
    result = one_document(out)
    assert code == 3 and err.splitlines()[-1].startswith("ctxctl: error: timed out")
    assert (result["outcome"], result["context"], result["counts"]["expected"], result["failed"]) == (
        "timeout", cid, 4, None)
    ok_cid, _ = broker.all_ok()
    code, out, err = broker.run(["wait", ok_cid, "--reports", str(tmp_path / "r"), "--json"])
    result = one_document(out)
    assert (code, result["outcome"], result["all_ok"], result["reports"]) == (
        0, "ok", True, str(tmp_path / "r" / ok_cid))


def test_wait_json_names_the_failed_node(broker, tmp_path):
    """wait --json when a node failed: outcome error and the node's error, exit 1 and the one line."""
    cid, joins = broker.create()
    nid = broker.enroll(cid, joins["head"], 1)
    broker.report(cid, nid, "error", exit_code=3, message="role torquemaster failed", log_tail="boom\n")
    code, out, err = broker.run(["wait", cid, "--reports", str(tmp_path / "r"), "--json"])
    result = one_document(out)
    assert code == 1 and err.splitlines()[-1].startswith("ctxctl: error: node head/")
    assert (result["outcome"], result["failed"]) == ("error", {
        "node": nid, "group": "head", "hostname": "node1", "exit_code": 3, "message": "role torquemaster failed"})

