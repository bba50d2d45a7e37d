"""User-data (ctxd/ctxctl/userdata.py): the #cloud-config layout, the bootstrap line, the 16 KB limit."""

import argparse
import ast
import base64
import gzip
import json
import os
import subprocess
import sys

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from support import ca_pem

from ctxd.ctxctl import userdata
from ctxd.ctxctl.userdata import (
    AGENT_PATH,
    BOOTSTRAP_MARKER,
    UNIT_PATH,
    USER_DATA_LIMIT,
    UserDataError,
    compact_source,
    is_gzip,
    load_agent_source,
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


def test_real_agent_fits_ec2_user_data():
    """The real ctxagent.py, compacted as ctxctl embeds it, fits EC2's 16384-byte user-data."""
    try:
        agent = load_agent_source()
    except UserDataError:
        pytest.skip("ctxagent.py is not on the path")
    data = render_user_data(BOOTSTRAP, compact_source(agent))
    assert len(data) <= USER_DATA_LIMIT
    print(f"user-data with the compacted agent: {len(data)} of {USER_DATA_LIMIT} bytes")


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
    """A watching group's user-data: the unit runs the agent with --watch and restarts it (but not
    after exit 6: the node departed); runcmd starts it without waiting, instead of running the
    agent inline (which would hold cloud-init forever)."""
    document = yaml.safe_load(render_cloud_config(BOOTSTRAP, SMALL_AGENT, watch=True))
    _, unit = document["write_files"]
    lines = unit["content"].splitlines()
    assert "ExecStart=/usr/bin/python3 /usr/local/sbin/ctxagent.py --bootstrap cloud-init --watch" in lines
    assert {"Type=exec", "Restart=on-failure", "RestartPreventExitStatus=6"} <= set(lines)
    assert document["runcmd"] == [
        ["systemctl", "daemon-reload"],
        ["systemctl", "enable", "--now", "--no-block", "ctxagent.service"],
    ]
    assert read_bootstrap(render_user_data(BOOTSTRAP, compact_source(load_agent_source()), watch=True)) == BOOTSTRAP
