"""User-data (ctxd/ctxctl/userdata.py): the #cloud-config layout, the bootstrap line, the 16 KB limit,
and the loader of the default form (ctxd/ctxctl/loader.py), run for real against a local HTTPS server."""

import argparse
import ast
import base64
import gzip
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import time

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from support import ca_pem

from ctxd.ctxctl import userdata
from ctxd.ctxctl.userdata import (
    AGENT_PATH,
    BOOTSTRAP_MARKER,
    LOADER_PATH,
    UNIT_PATH,
    USER_DATA_LIMIT,
    AgentLoader,
    UserDataError,
    agent_digest,
    compact_source,
    is_gzip,
    load_agent_source,
    loader_source,
    read_bootstrap,
    render_cloud_config,
    render_user_data,
)

SMALL_AGENT = '#!/usr/bin/env python3\n"""ctxagent placeholder."""\n\n\ndef main():\n\tpass  # tab\n'


BOOTSTRAP = {
    "ctxd_bootstrap": 1,
    "url": "https://ctxd.example.org:8443",
    "context_id": "Q2x1c3Rlci1pZC0xMjM0NT",
    "group": "compute",
    "join_token": "ctxd_join_" + "k" * 43,
    "ca_pem": ca_pem(),
}


def realistic_agent(size=60000):
    """~60 KB of real Python (argparse.py from the standard library), cut at a line end."""
    with open(argparse.__file__, encoding="utf-8") as f:
        text = f.read()
    assert len(text) > size
    return text[:text.rindex("\n", 0, size) + 1]


def agent_content(document):
    """The ctxagent.py content a cloud-init would write, from a parsed #cloud-config."""
    entry = next(e for e in document["write_files"] if e["path"] == AGENT_PATH)
    if entry.get("encoding") == "b64":
        return base64.b64decode(entry["content"]).decode("utf-8")
    assert "encoding" not in entry
    return entry["content"]


def test_cloud_config_layout():
    """The document is YAML with the agent (0755), the boot unit (0644) and the three runcmd steps."""
    text = render_cloud_config(BOOTSTRAP, SMALL_AGENT)
    assert text.startswith("#cloud-config\n" + BOOTSTRAP_MARKER)
    document = yaml.safe_load(text)
    agent, unit = document["write_files"]
    assert agent == {"path": "/usr/local/sbin/ctxagent.py", "owner": "root:root",
                     "permissions": "0755", "content": SMALL_AGENT}
    assert unit["path"] == UNIT_PATH == "/etc/systemd/system/ctxagent.service"
    assert unit["permissions"] == "0644"
    lines = unit["content"].splitlines()
    assert "Type=oneshot" in lines and "After=network-online.target" in lines
    assert "ExecStart=/usr/bin/python3 /usr/local/sbin/ctxagent.py --bootstrap cloud-init" in lines
    assert "WantedBy=multi-user.target" in lines
    assert document["runcmd"] == [
        ["systemctl", "daemon-reload"],
        ["systemctl", "enable", "ctxagent.service"],
        ["python3", "/usr/local/sbin/ctxagent.py", "--bootstrap", "cloud-init"],
    ]
    assert set(document) == {"write_files", "runcmd"}


def test_agent_is_a_literal_block():
    """The agent source is carried as a YAML `content: |` literal block, so the document gzips well."""
    text = render_cloud_config(BOOTSTRAP, SMALL_AGENT)
    assert "  content: |\n   #!/usr/bin/env python3\n" in text


def test_marker_line_decodes_to_the_bootstrap():
    """The `# ctxd-bootstrap:` line is base64 of the bootstrap JSON, decodable with the stdlib alone."""
    text = render_cloud_config(BOOTSTRAP, SMALL_AGENT)
    lines = [line for line in text.splitlines() if line.startswith("# ctxd-bootstrap: ")]
    assert len(lines) == 1
    assert json.loads(base64.b64decode(lines[0][len("# ctxd-bootstrap: "):], validate=True)) == BOOTSTRAP
    assert read_bootstrap(text) == BOOTSTRAP


def test_small_document_stays_plain_text():
    """A document within the limit is not compressed: it starts with #cloud-config."""
    data = render_user_data(BOOTSTRAP, SMALL_AGENT)
    assert data.startswith(b"#cloud-config\n") and len(data) <= USER_DATA_LIMIT


def test_realistic_60kb_agent_is_gzipped_under_16kb():
    """A ~60 KB agent makes a gzip user-data of at most 16384 bytes that still round-trips exactly."""
    agent = realistic_agent()
    data = render_user_data(BOOTSTRAP, agent)
    assert is_gzip(data) and len(data) <= USER_DATA_LIMIT
    text = gzip.decompress(data).decode("utf-8")
    assert agent_content(yaml.safe_load(text)) == agent
    assert read_bootstrap(data) == BOOTSTRAP


def test_real_agent_round_trips_when_the_limit_allows():
    """The real ctxagent.py (when present) round-trips exactly through a gzip user-data."""
    try:
        agent = load_agent_source()
    except UserDataError:
        pytest.skip("ctxagent.py is not on the path")
    data = render_user_data(BOOTSTRAP, agent, limit=65536)
    assert agent_content(yaml.safe_load(gzip.decompress(data) if is_gzip(data) else data)) == agent


def test_default_user_data_is_under_4096_bytes():
    """The default user-data (bootstrap with ctxd's own CA, loader, unit), run-once or watching,
    is plain #cloud-config under 4096 bytes: a quarter of EC2's limit."""
    loader = AgentLoader(agent_digest(load_agent_source()))
    for watch in (False, True):
        data = render_user_data(BOOTSTRAP, loader, watch=watch)
        assert data.startswith(b"#cloud-config\n") and len(data) < 4096, len(data)
        print(f"default user-data ({'watch' if watch else 'run once'}): {len(data)} bytes")


def test_embedded_agent_fit_is_measured():
    """The real ctxagent.py, compacted as --embed-agent embeds it: its gzip user-data is measured
    against EC2's 16384 bytes; when it does not fit, the error says so in one line."""
    try:
        agent = compact_source(load_agent_source())
    except UserDataError:
        pytest.skip("ctxagent.py is not on the path")
    document = render_cloud_config(BOOTSTRAP, agent).encode()
    size = len(userdata.smallest_gzip(document))
    print(f"user-data with the embedded agent: {size} bytes gzip-compressed ({len(document)} raw) "
          f"of {USER_DATA_LIMIT}: {'fits' if size <= USER_DATA_LIMIT else 'does not fit'}")
    if size <= USER_DATA_LIMIT:
        assert len(render_user_data(BOOTSTRAP, agent)) == size
    else:
        with pytest.raises(UserDataError, match=r"^user-data is \d+ bytes even gzip-compressed .*too large to embed$"):
            render_user_data(BOOTSTRAP, agent)
    assert agent_content(yaml.safe_load(gzip.decompress(render_user_data(BOOTSTRAP, agent, limit=65536)))) == agent


def _without_docstrings(tree):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(getattr(first, "value", None), ast.Constant) \
                    and isinstance(first.value.value, str):
                node.body = node.body[1:] or [ast.Pass()]
    return ast.dump(tree, include_attributes=False)


def test_compacted_agent_is_the_same_program():
    """Compaction removes only comments, class/function docstrings and the module docstring's
    middle: the code is identical, and so is what --help prints (it quotes the exit codes)."""
    agent = load_agent_source()
    compact = compact_source(agent)
    assert len(compact) < len(agent)
    module, compact_module = ast.parse(agent), ast.parse(compact)
    full, kept = ast.get_docstring(module, clean=False), ast.get_docstring(compact_module, clean=False)
    first, exit_codes = kept.split("\n\n", 1)
    assert first == full.split("\n", 1)[0] and exit_codes.startswith("Exit codes:\n")
    assert "\n\n" + exit_codes.rstrip("\n") + "\n\n" in full
    module.body[0].value.value = compact_module.body[0].value.value = ""
    assert _without_docstrings(compact_module) == _without_docstrings(module)
    helps = [subprocess.run([sys.executable, "-c", text, "--help"], capture_output=True, timeout=30).stdout
             for text in (agent, compact)]
    assert helps[0] == helps[1].replace(b"usage: -c", b"usage: ctxagent.py") and b"97" in helps[0]


def test_compaction_keeps_strings_that_look_like_comments():
    """A '#' inside a string, and a function whose only statement was its docstring, survive;
    comments go, also after code."""
    source = 'def f():\n    """Doc."""\n\n\nx = """\n# not a comment\n"""  # trailing\n# gone\n'
    compact = compact_source(source)
    assert "# not a comment" in compact and "# gone" not in compact and "# trailing" not in compact
    namespace = {}
    exec(compact, namespace)
    assert namespace["f"]() is None


def test_compacted_agent_runs():
    """The compacted agent still starts and prints its help with the exit codes."""
    compact = compact_source(load_agent_source())
    result = subprocess.run([sys.executable, "-c", compact, "--help"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, timeout=30)
    assert result.returncode == 0
    assert b"97" in result.stdout and b"--bootstrap" in result.stdout


def test_too_large_even_gzipped_is_a_clear_error():
    """An incompressible agent gives one line saying the gzip size and the 16384-byte limit."""
    agent = base64.b64encode(os.urandom(30000)).decode("ascii") + "\n"
    with pytest.raises(UserDataError) as info:
        render_user_data(BOOTSTRAP, agent)
    message = str(info.value)
    assert "\n" not in message and "even gzip-compressed" in message and "16384" in message


def test_output_is_reproducible():
    """The same bootstrap and agent give byte-identical user-data (gzip mtime fixed)."""
    agent = realistic_agent()
    assert render_user_data(BOOTSTRAP, agent) == render_user_data(BOOTSTRAP, agent)


@pytest.mark.parametrize("agent", [
    "x", "x\n", "x\n\n\n", "line\n\n  indented\n   \n\tTAB\n", "  leading space\n", "\nleading newline\n",
    "crlf\r\nline\r\n", "nel\x85ls\u2028ps\u2029\n", "bom\ufeff\n", "ctrl\x1b[0m\x00\n", "",
    "# ctxd-bootstrap: not-this-one\n", "---\n...\n", "emoji \U0001F600\n",
])
def test_unusual_agent_text_round_trips(agent):
    """Trailing newlines, indentation, CR, YAML line breaks and controls all arrive byte-exact."""
    text = render_cloud_config(BOOTSTRAP, agent)
    assert agent_content(yaml.safe_load(text)) == agent
    assert read_bootstrap(text) == BOOTSTRAP


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab #:|>-\t\n\r'\"{}[]\x85\u2028\ufeff\x00é")), max_size=60)
       | st.text(max_size=60))
def test_any_agent_text_round_trips(agent):
    """Whatever the agent text, the YAML parses and the written file equals it exactly."""
    text = render_cloud_config(BOOTSTRAP, agent)
    assert agent_content(yaml.safe_load(text)) == agent


def test_hostile_group_name_cannot_break_the_yaml():
    """A bootstrap whose group or id are not plain labels is only carried base64 (no comment injection)."""
    hostile = dict(BOOTSTRAP, group="x\nruncmd: [[rm, -rf, /]]", context_id="y\n- bad")
    document = yaml.safe_load(render_cloud_config(hostile, SMALL_AGENT))
    assert len(document["runcmd"]) == 3
    assert read_bootstrap(render_cloud_config(hostile, SMALL_AGENT)) == hostile


def test_load_agent_source_reads_the_module_file(tmp_path, monkeypatch):
    """load_agent_source returns the exact text of the ctxagent.py found on sys.path."""
    placeholder = "# placeholder agent\nprint('hi')\n"
    (tmp_path / "ctxagent.py").write_text(placeholder)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "ctxagent", raising=False)
    assert load_agent_source() == placeholder


def test_load_agent_source_missing_is_a_user_data_error(monkeypatch):
    """Without ctxagent on the path the error says so in one line."""
    monkeypatch.setattr(userdata.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserDataError, match="cannot locate ctxagent.py"):
        load_agent_source()


@pytest.mark.parametrize("way", ["module", "command", "zlib"])
def test_smallest_gzip_every_way_is_gzip_any_reader_takes(way, monkeypatch):
    """zopfli's module, Debian's zopfli command (no python3-zopfli in Debian 12), else zlib's best:
    each output is plain gzip of the document, reproducible (mtime 0); zopfli's is smaller."""
    import builtins
    import shutil as shutil_module

    from ctxd.ctxctl import userdata

    document = render_cloud_config(BOOTSTRAP, compact_source(load_agent_source())).encode()
    if way == "module":
        pytest.importorskip("zopfli")
    else:
        real_import = builtins.__import__

        def no_zopfli(name, *args, **kwargs):
            if name.startswith("zopfli"):
                raise ImportError(name)
            return real_import(name, *args, **kwargs)

        monkeypatch.setattr(builtins, "__import__", no_zopfli)
        if way == "command" and shutil_module.which("zopfli") is None:
            pytest.skip("no zopfli command")
        if way == "zlib":
            monkeypatch.setattr(userdata.shutil, "which", lambda name: None)
    out = userdata.smallest_gzip(document)
    assert is_gzip(out) and gzip.decompress(out) == document
    assert out[4:8] == b"\0\0\0\0" and userdata.smallest_gzip(document) == out
    zlib_best = gzip.compress(document, 9, mtime=0)
    assert len(out) < len(zlib_best) if way != "zlib" else out == zlib_best


def test_watch_mode_cloud_config_starts_a_service():
    """A watching group's user-data: the unit runs the agent (or its loader) with --watch and
    restarts it (but not after exit 6: the node departed); runcmd starts it without waiting,
    instead of running the agent inline (which would hold cloud-init forever)."""
    for agent, program in ((SMALL_AGENT, AGENT_PATH), (AgentLoader("0" * 64), LOADER_PATH)):
        document = yaml.safe_load(render_cloud_config(BOOTSTRAP, agent, watch=True))
        _, unit = document["write_files"]
        lines = unit["content"].splitlines()
        assert f"ExecStart=/usr/bin/python3 {program} --bootstrap cloud-init --watch" in lines
        assert {"Type=exec", "Restart=on-failure", "RestartPreventExitStatus=6"} <= set(lines)
        assert document["runcmd"] == [
            ["systemctl", "daemon-reload"],
            ["systemctl", "enable", "--now", "--no-block", "ctxagent.service"],
        ]
    assert read_bootstrap(render_user_data(BOOTSTRAP, AgentLoader("0" * 64), watch=True)) == BOOTSTRAP


# ------------------------------------------------------------------ the loader (default user-data)

def loader_entry(document):
    """The loader's write_files entry of a parsed #cloud-config, and its text as cloud-init writes it."""
    [entry] = [e for e in document["write_files"] if e["path"] == LOADER_PATH]
    assert entry["encoding"] == "gz+b64"   # cloud-init: base64, then gunzip
    return entry, gzip.decompress(base64.b64decode(entry["content"])).decode("utf-8")


def test_loader_cloud_config_layout():
    """The default document: the loader (0700, root, gz+b64 of loader_source with the agent's
    hash), the unit running the loader, and runcmd running it with the agent's arguments."""
    sha = agent_digest(b"the broker's agent\n")
    text = render_cloud_config(BOOTSTRAP, AgentLoader(sha))
    assert text.startswith("#cloud-config\n" + BOOTSTRAP_MARKER) and read_bootstrap(text) == BOOTSTRAP
    document = yaml.safe_load(text)
    assert set(document) == {"write_files", "runcmd"}
    (entry, loader), unit = loader_entry(document), document["write_files"][1]
    assert {k: entry[k] for k in ("path", "owner", "permissions")} == {
        "path": "/usr/local/sbin/ctxagent-loader.py", "owner": "root:root", "permissions": "0700"}
    assert loader == loader_source(sha) and f'SHA256 = "{sha}"' in loader
    assert 'AGENT = "/usr/local/sbin/ctxagent.py"' in loader
    assert unit["path"] == UNIT_PATH and unit["permissions"] == "0644"
    assert ("ExecStart=/usr/bin/python3 /usr/local/sbin/ctxagent-loader.py --bootstrap cloud-init"
            in unit["content"].splitlines())
    assert document["runcmd"] == [
        ["systemctl", "daemon-reload"],
        ["systemctl", "enable", "ctxagent.service"],
        ["python3", "/usr/local/sbin/ctxagent-loader.py", "--bootstrap", "cloud-init"],
    ]


def test_loader_source_is_small_python_36():
    """The loader ctxctl writes is compacted (no comment but its #! line), small, valid, and
    standard-library Python 3.6 (vermin)."""
    source = loader_source("f" * 64)
    compile(source, "loader", "exec")
    lines = source.splitlines()
    assert lines[0] == "#!/usr/bin/env python3" and not any(line.lstrip().startswith("#") for line in lines[1:])
    assert len(source) < 3000
    vermin = os.path.join(os.path.dirname(sys.executable), "vermin")
    if not os.path.exists(vermin):
        pytest.skip("vermin is not installed")
    path = os.path.join(os.path.dirname(userdata.__file__), "loader.py")
    result = subprocess.run([vermin, "--no-tips", "--violations", "--target=3.6-", path],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("sha", ["", "F" * 64, "f" * 63, "g" * 64, "f" * 64 + "\n"])
def test_loader_needs_a_sha256(sha):
    """A hash that is not 64 lower-case hex digits is refused: the loader would run nothing, or anything."""
    with pytest.raises(UserDataError, match="is not a SHA-256"):
        loader_source(sha)


CLOUD_INIT_WRITE_FILES = """
import sys
from cloudinit import safeyaml, util
from cloudinit.config.cc_write_files import write_files
document = util.decomp_gzip(open(sys.argv[1], "rb").read(), quiet=True)
files = safeyaml.load(document)["write_files"]
for entry in files:
    entry["path"] = sys.argv[2] + entry["path"]
write_files("write_files", files, "root:root")
"""


@pytest.fixture(scope="module")
def cloud_init():
    """Debian's cloud-init (its python3 modules), installed with apt-get when missing and root;
    without it the test fails on CI (CI=true), else skips saying why."""
    from e2e import hosts

    if os.geteuid() != 0 and shutil.which("cloud-init") is None:
        pytest.skip("needs cloud-init (Debian's package), or root to install it")
    ok, what = hosts.install_packages(("cloud-init",), lambda: [] if shutil.which("cloud-init") else ["cloud-init"],
                                      timeout=600)
    if not ok:
        message = "cannot install cloud-init: " + what
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)


def test_cloud_init_itself_takes_the_user_data(tmp_path, cloud_init):
    """cloud-init's own schema check passes every form ctxctl writes, and cloud-init's own
    write_files (run on the document as a VM would) writes the loader exactly as loader_source
    makes it, 0700, and the unit, 0644."""
    sha = agent_digest(b"the broker's agent\n")
    forms = {"loader": render_user_data(BOOTSTRAP, AgentLoader(sha)),
             "loader-watch": render_user_data(BOOTSTRAP, AgentLoader(sha), watch=True),
             "embedded": render_user_data(BOOTSTRAP, SMALL_AGENT)}
    for name, data in forms.items():
        (tmp_path / name).write_bytes(data)
        result = subprocess.run(["cloud-init", "schema", "--config-file", str(tmp_path / name)],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0 and "Valid cloud-config" in result.stdout, (name, result)
    root = tmp_path / "vm"
    with open(shutil.which("cloud-init")) as f:
        python = f.readline()[2:].split()[0]   # the interpreter that has cloud-init's modules
    subprocess.run([python, "-c", CLOUD_INIT_WRITE_FILES, str(tmp_path / "loader"), str(root)],
                   check=True, timeout=120)
    loader = root / LOADER_PATH.lstrip("/")
    assert loader.read_text() == loader_source(sha) and stat.S_IMODE(loader.stat().st_mode) == 0o700
    unit = root / UNIT_PATH.lstrip("/")
    assert "ctxagent-loader.py --bootstrap cloud-init" in unit.read_text()
    assert stat.S_IMODE(unit.stat().st_mode) == 0o644


FAKE_AGENT = b"#!/usr/bin/env python3\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\nsys.exit(7)\n"


@pytest.fixture(scope="module")
def broker_ca():
    """A CA as ctxd makes it, and its PEM: what the bootstrap pins."""
    from ctxd import tls

    ca_cert, ca_key = tls.make_ca("broker CA")
    return ca_cert, ca_key, tls.cert_pem(ca_cert).decode("ascii")


class AgentServer:
    """A broker stand-in: stdlib http.server over ssl, in a thread, serving ``agent`` at /v1/agent
    with a certificate for ``names`` from ``ca``; its first ``failures`` answers are 503."""

    def __init__(self, directory, ca, agent=FAKE_AGENT, names=("localhost", "127.0.0.1"), failures=0, port=0):
        import http.server
        import ssl
        import threading

        from ctxd import tls

        cert, key = tls.make_server_cert(ca[0], ca[1], names)
        (directory / "server.pem").write_bytes(tls.cert_pem(cert) + tls.key_pem(key))
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(directory / "server.pem"))
        served = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                served.requests.append(self.path)
                if len(served.requests) <= failures or self.path != "/v1/agent":
                    self.send_error(503 if self.path == "/v1/agent" else 404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/x-python")
                self.send_header("Content-Length", str(len(agent)))
                self.end_headers()
                self.wfile.write(agent)

            def log_message(self, *args):
                pass

        self.requests = []
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.url = f"https://localhost:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@pytest.fixture
def serve(tmp_path, broker_ca):
    """serve(**options): an AgentServer, shut down after the test."""
    servers = []

    def start(**options):
        servers.append(AgentServer(tmp_path, options.pop("ca", broker_ca), **options))
        return servers[-1]
    yield start
    for server in servers:
        server.close()


def vm_url(port):
    return f"https://localhost:{port}"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VM:
    """What the loader sees on a VM, in a directory: the user-data cloud-init saved (ctxctl's
    default form for ``url`` and ``ca_pem``) and the loader for ``sha``, installing the agent
    into sbin/."""

    def __init__(self, root, url, ca_pem, sha=agent_digest(FAKE_AGENT), python=sys.executable):
        self.root, self.python = root, python
        self.user_data = root / "user-data.txt"
        self.user_data.write_bytes(render_user_data(dict(BOOTSTRAP, url=url, ca_pem=ca_pem), AgentLoader(sha)))
        (root / "sbin").mkdir()
        self.agent = root / "sbin" / "ctxagent.py"
        self.loader = root / "ctxagent-loader.py"
        self.loader.write_text(loader_source(sha, agent_path=str(self.agent)))
        self.argv = ["--bootstrap", "cloud-init", "--cloud-init-user-data", str(self.user_data), "--watch"]

    def start(self):
        return subprocess.Popen([self.python, str(self.loader), *self.argv], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def run(self, timeout=60):
        """Run the loader to its end: (exit code, stdout, stderr)."""
        proc = self.start()
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out, err


def pythons():
    """This interpreter, and the agent's oldest and newest when this machine has them."""
    from e2e.helpers import find_python

    found = [pytest.param(sys.executable, id="this")]
    for version in ("3.6", "3.13"):
        python = find_python(version)
        found.append(pytest.param(python, id=version, marks=pytest.mark.skipif(
            python is None, reason=f"no python{version} on this machine")))
    return found


@pytest.mark.parametrize("python", pythons())
def test_loader_runs_the_agent_it_fetched(tmp_path, serve, broker_ca, python):
    """Good hash: the loader fetches /v1/agent over verified TLS, installs it 0755 (no temporary
    file left) and execs it with its own arguments; the agent's exit code is the loader's. A
    later boot runs the installed agent without the broker."""
    server = serve()
    vm = VM(tmp_path, server.url, broker_ca[2], python=python)
    code, out, err = vm.run()
    assert (code, json.loads(out), err) == (7, vm.argv, "")
    assert server.requests == ["/v1/agent"]
    assert vm.agent.read_bytes() == FAKE_AGENT and stat.S_IMODE(vm.agent.stat().st_mode) == 0o755
    assert os.listdir(vm.root / "sbin") == ["ctxagent.py"]
    server.close()
    assert vm.run()[:2] == (7, out)


def test_loader_refuses_an_agent_with_another_hash(tmp_path, serve, broker_ca):
    """Bad hash: exit 6 with one error line naming both hashes; nothing written, nothing run."""
    server = serve(agent=FAKE_AGENT + b"import os  # changed\n")
    vm = VM(tmp_path, server.url, broker_ca[2])
    code, out, err = vm.run()
    assert (code, out) == (6, "") and os.listdir(vm.root / "sbin") == []
    assert err.startswith(f"ctxagent-loader: error: {server.url}/v1/agent has SHA-256 ") and err.count("\n") == 1
    assert agent_digest(FAKE_AGENT) in err


@pytest.mark.parametrize("case", ["another CA", "another name"])
def test_loader_refuses_a_server_that_does_not_verify(tmp_path, serve, broker_ca, case):
    """A certificate from another CA, or for another name: refused at once (no retry), exit 3,
    nothing fetched, written or run."""
    from ctxd import tls

    if case == "another CA":
        other = tls.make_ca("broker CA")   # the same name, another key
        server = serve(ca=(other[0], other[1]))
    else:
        server = serve(names=("broker.example.org",))
    vm = VM(tmp_path, server.url, broker_ca[2])
    code, out, err = vm.run(timeout=20)
    assert (code, out) == (3, "") and os.listdir(vm.root / "sbin") == [] and server.requests == []
    assert err.startswith(f"ctxagent-loader: error: cannot fetch {server.url}/v1/agent: ") and err.count("\n") == 1
    assert "CERTIFICATE_VERIFY_FAILED" in err or "match" in err


def test_loader_waits_for_the_broker(tmp_path, broker_ca):
    """Nothing listening yet, then 503s (a broker starting): the loader asks again with backoff
    and runs the agent once it is served."""
    port = free_port()
    vm = VM(tmp_path, vm_url(port), broker_ca[2])
    proc = vm.start()
    time.sleep(0.5)
    server = AgentServer(tmp_path, broker_ca, port=port, failures=1)
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        server.close()
    assert (proc.returncode, json.loads(out)) == (7, vm.argv)
    assert server.requests == ["/v1/agent", "/v1/agent"]
    lines = err.splitlines()
    prefix = f"ctxagent-loader: {vm_url(port)}/v1/agent: "
    assert len(lines) >= 2 and all(line.startswith(prefix) for line in lines), err
    assert "refused" in lines[0] and lines[0].endswith("; again in 1 s")
    assert lines[-1] == prefix + f"HTTP 503; again in {2 ** (len(lines) - 1)} s"


def test_loader_replaces_a_changed_agent(tmp_path, serve, broker_ca):
    """An agent file whose hash is not the user-data's (changed on the VM) is fetched again."""
    server = serve()
    vm = VM(tmp_path, server.url, broker_ca[2])
    vm.agent.write_bytes(b"import sys\nsys.exit(99)\n")
    assert vm.run()[0] == 7 and vm.agent.read_bytes() == FAKE_AGENT and server.requests == ["/v1/agent"]


def test_loader_without_a_bootstrap_does_nothing(tmp_path, broker_ca):
    """User-data without a ctxd bootstrap (another tool's): exit 0, nothing fetched or written."""
    vm = VM(tmp_path, "https://localhost:1", broker_ca[2])
    vm.user_data.write_text("#cloud-config\nruncmd: [[true]]\n")
    assert vm.run() == (0, "", f"ctxagent-loader: no ctxd bootstrap in {vm.user_data}\n")
    assert os.listdir(vm.root / "sbin") == []


def test_loader_reads_the_default_user_data_path(tmp_path, serve, broker_ca):
    """Without --cloud-init-user-data the loader reads the path ctxctl wrote into it (cloud-init's)."""
    server = serve()
    vm = VM(tmp_path, server.url, broker_ca[2])
    vm.loader.write_text(loader_source(agent_digest(FAKE_AGENT), agent_path=str(vm.agent),
                                       user_data=str(vm.user_data)))
    vm.argv = ["--bootstrap", "cloud-init"]
    code, out, err = vm.run()
    assert (code, json.loads(out), err) == (7, vm.argv, "")
