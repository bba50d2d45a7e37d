"""Cluster files (ctxd/ctxctl/cluster.py): the issue's example, every kind of bad file, junk."""

import base64
import datetime
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ctxd.ctxctl.cluster import (
    ClusterFileError,
    build_create_request,
    load_cluster_file,
    parse_cluster_text,
)

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLE = os.path.join(HERE, os.pardir, "examples", "torque", "cluster.toml")

GRIDMAP = b"/DC=org/CN=Alice alice\n"


def reader(files=None):
    """A read_file callable over an in-memory {path: bytes}; anything else is ENOENT."""
    files = {"grid-mapfile": GRIDMAP} if files is None else files

    def read_file(path):
        if path in files:
            return files[path]
        raise FileNotFoundError(2, "No such file or directory", path)
    return read_file


def parse(text, files=None):
    return parse_cluster_text(text, label="cluster.toml", read_file=reader(files))


def b64(data):
    return base64.b64encode(data).decode("ascii")


def test_issue_example_gives_the_exact_request_body():
    """The issue's cluster file, read from examples/, becomes exactly this POST /v1/contexts body."""
    with open(os.path.join(os.path.dirname(EXAMPLE), "grid-mapfile"), "rb") as f:
        gridmap = f.read()
    assert load_cluster_file(EXAMPLE) == {
        "name": "torque-demo",
        "open_for_injection": False,
        "groups": [
            {"name": "head", "quantity": 1, "provides": ["torquemaster"],
             "requires": [{"role": "torqueslave", "ready": False}], "data": ["gridmap"],
             "all_identities": False, "source_check": True},
            {"name": "compute", "quantity": 3, "provides": ["torqueslave"],
             "requires": [{"role": "torquemaster", "ready": True}], "data": [],
             "all_identities": True, "source_check": True},
        ],
        "data": {"gridmap": [{"b64": b64(gridmap)}]},
    }


def test_data_files_are_relative_to_the_cluster_file_not_the_cwd(tmp_path, monkeypatch):
    """`file = "x"` is read next to the cluster file even when ctxctl runs elsewhere."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "c.toml").write_text(
        'name = "c"\n[[group]]\nname = "g"\nquantity = 1\ndata = ["d"]\n[data]\nd = { file = "x" }\n')
    (tmp_path / "site" / "x").write_bytes(b"\x00\xffbinary")
    monkeypatch.chdir(tmp_path)
    body = load_cluster_file("site/c.toml")
    assert body["data"] == {"d": [{"b64": b64(b"\x00\xffbinary")}]}


def test_files_value_inject_and_times_are_carried():
    """files = [..] gives several values, value = inline text, inject = true an empty list; name and times pass."""
    body = parse(
        'name = "x y (test)"\nopen_for_injection = true\nexpires_in = 3600\njoin_token_ttl = 600\n'
        '[[group]]\nname = "g"\nquantity = 2\ndata = ["many", "inline", "later", "empty"]\n'
        '[data]\nmany = { files = ["a", "b"] }\ninline = { value = "héllo" }\n'
        'later = { inject = true }\nempty = {}\n',
        files={"a": b"A", "b": b"B"})
    assert body["name"] == "x y (test)"
    assert body["expires_in"] == 3600 and body["join_token_ttl"] == 600
    assert body["data"] == {
        "many": [{"b64": b64(b"A")}, {"b64": b64(b"B")}],
        "inline": [{"b64": b64("héllo".encode())}],
        "later": [],
        "empty": [],
    }


MINIMAL_GROUPS = '[[group]]\nname = "g"\nquantity = 1\n'

BAD_FILES = [
    # (cluster text, expected one-line error)
    ('name = "t"\n[[group]]\nname = "a"\nquantity = 1\n[[group]]\nname = "b"\nquantity = 0\n',
     "cluster.toml: group[1].quantity: must be an integer >= 1"),
    ('name = "t"\n[[group]]\nname = "a"\nquantity = "3"\n',
     "cluster.toml: group[0].quantity: must be an integer >= 1"),
    ('name = "t"\n[[group]]\nname = "a"\nquantity = true\n',
     "cluster.toml: group[0].quantity: must be an integer >= 1"),
    ('name = "t"\n[[group]]\nname = "a"\nquantity = 100001\n',
     "cluster.toml: group[0].quantity: must be an integer <= 100000"),
    ('name = "t"\n[[group]]\nname = "a"\n',
     "cluster.toml: group[0].quantity: is required (an integer 1..100000)"),
    ('nmae = "t"\n' + MINIMAL_GROUPS,
     "cluster.toml: nmae: unknown key (allowed: name, open_for_injection, expires_in, "
     "join_token_ttl, domain, group, data, scripts)"),
    (MINIMAL_GROUPS, "cluster.toml: name: is required"),
    ('name = "   "\n' + MINIMAL_GROUPS, "cluster.toml: name: must be 1-128 printable characters, not only spaces"),
    ('name = "t"\n', "cluster.toml: group: at least one [[group]] is required"),
    ('name = "t"\ngroup = 3\n', "cluster.toml: group: must be an array of tables ([[group]])"),
    ('name = "t"\n[[group]]\nname = "a"\nquantity = 1\nprovide = ["x"]\n',
     "cluster.toml: group[0].provide: unknown key (allowed: name, quantity, provides, requires, "
     "data, all_identities, certificate, ssh_certificate, source_check, lease, watch)"),
    ('name = "t"\ndomain = "10.0.0.1"\n' + MINIMAL_GROUPS,
     "cluster.toml: domain: '10.0.0.1' is not a domain name (dotted labels, the last not all digits)"),
    ('name = "t"\n' + MINIMAL_GROUPS + 'source_check = "no"\n',
     "cluster.toml: group[0].source_check: must be true or false"),
    ('name = "t"\n[[group]]\nname = "-a"\nquantity = 1\n',
     "cluster.toml: group[0].name: '-a' is not a valid name: 1-64 of A-Z a-z 0-9 _ . - "
     "starting with a letter or digit"),
    ('name = "t"\n[[group]]\nname = "a"\nquantity = 1\nprovides = ["ok", "../etc"]\n',
     "cluster.toml: group[0].provides[1]: '../etc' is not a valid name: 1-64 of A-Z a-z 0-9 _ . - "
     "starting with a letter or digit"),
    ('name = "t"\n[[group]]\nname = "a"\nquantity = 1\nprovides = "x"\n',
     'cluster.toml: group[0].provides: must be an array of names, e.g. ["torquemaster"]'),
    ('name = "t"\n[[group]]\nname = "a"\nquantity = 1\n[[group]]\nname = "a"\nquantity = 2\n',
     "cluster.toml: group[1].name: duplicate group name 'a' (also group[0])"),
    ('name = "t"\n[[group]]\nname = "a"\nquantity = 1\nprovides = ["x"]\n'
     'requires = [{ role = "x", redy = true }]\n',
     "cluster.toml: group[0].requires[0].redy: unknown key (allowed: role, ready)"),
    ('name = "t"\n[[group]]\nname = "a"\nquantity = 1\nprovides = ["x"]\nrequires = ["x"]\n',
     'cluster.toml: group[0].requires[0]: must be a table, e.g. { role = "torquemaster", ready = true }'),
    ('name = "t"\n[[group]]\nname = "a"\nquantity = 1\nprovides = ["x"]\n'
     'requires = [{ role = "x", ready = "yes" }]\n',
     "cluster.toml: group[0].requires[0].ready: must be true or false"),
    ('name = "t"\n[[group]]\nname = "a"\nquantity = 1\nrequires = [{ role = "ghost" }]\n',
     "cluster.toml: group[0].requires[0].role: no group provides role 'ghost'"),
    ('name = "t"\n[[group]]\nname = "a"\nquantity = 1\ndata = ["gridmap"]\n',
     "cluster.toml: group[0].data[0]: 'gridmap' is not declared in [data]"),
    ('name = "t"\n' + MINIMAL_GROUPS + 'all_identities = 1\n',
     "cluster.toml: group[0].all_identities: must be true or false"),
    ('name = "t"\nopen_for_injection = "no"\n' + MINIMAL_GROUPS,
     "cluster.toml: open_for_injection: must be true or false"),
    ('name = "t"\nexpires_in = 59\n' + MINIMAL_GROUPS,
     "cluster.toml: expires_in: must be an integer >= 60 (seconds)"),
    ('name = "t"\nexpires_in = 600\njoin_token_ttl = 1200\n' + MINIMAL_GROUPS,
     "cluster.toml: join_token_ttl: must not exceed expires_in (600)"),
    ('name = "tab\\there"\n' + MINIMAL_GROUPS,
     "cluster.toml: name: must be 1-128 printable characters, not only spaces"),
    ('name = "' + "n" * 129 + '"\n' + MINIMAL_GROUPS,
     "cluster.toml: name: must be 1-128 printable characters, not only spaces"),
    ('name = "t"\n' + "".join(f'[[group]]\nname = "g{i}"\nquantity = 1\n' for i in range(65)),
     "cluster.toml: group: at most 64 groups (got 65)"),
    ('name = "t"\n[[group]]\nname = "a"\nquantity = 1\nprovides = [' + ", ".join(f'"r{i}"' for i in range(65)) + "]\n",
     "cluster.toml: group[0].provides: at most 64 names (got 65)"),
    ('name = "t"\n' + MINIMAL_GROUPS + '[data]\ngridmap = { file = "nope" }\n',
     "cluster.toml: data.gridmap.file: cannot read 'nope': No such file or directory"),
    ('name = "t"\n' + MINIMAL_GROUPS + '[data]\ngridmap = { files = ["grid-mapfile", "nope"] }\n',
     "cluster.toml: data.gridmap.files[1]: cannot read 'nope': No such file or directory"),
    ('name = "t"\n' + MINIMAL_GROUPS + '[data]\ngridmap = { files = [] }\n',
     "cluster.toml: data.gridmap.files: must be a non-empty array of paths"),
    ('name = "t"\n' + MINIMAL_GROUPS + '[data]\ngridmap = { file = "grid-mapfile", value = "x" }\n',
     "cluster.toml: data.gridmap: give only one of file, files, value (got file, value)"),
    ('name = "t"\n' + MINIMAL_GROUPS + '[data]\ngridmap = { flie = "grid-mapfile" }\n',
     "cluster.toml: data.gridmap.flie: unknown key (allowed: file, files, value, inject)"),
    ('name = "t"\n' + MINIMAL_GROUPS + '[data]\ngridmap = {}\n',
     "cluster.toml: data.gridmap: has no value; that is only allowed with open_for_injection = true"),
    ('name = "t"\n' + MINIMAL_GROUPS + '[data]\ngridmap = { inject = true }\n',
     "cluster.toml: data.gridmap: has no value; that is only allowed with open_for_injection = true"),
    ('name = "t"\nopen_for_injection = true\n' + MINIMAL_GROUPS + '[data]\ngridmap = { inject = false }\n',
     "cluster.toml: data.gridmap: needs file, files or value (or inject = true)"),
    ('name = "t"\n' + MINIMAL_GROUPS + '[data]\ngridmap = { value = "x", inject = true }\n',
     "cluster.toml: data.gridmap.inject: cannot be combined with value"),
    ('name = "t"\n' + MINIMAL_GROUPS + '[data]\ngridmap = { value = 3 }\n',
     "cluster.toml: data.gridmap.value: must be a string"),
    ('name = "t"\n' + MINIMAL_GROUPS + '[data]\n"bad name" = { value = "x" }\n',
     "cluster.toml: data.bad name: invalid data name: must match [A-Za-z0-9][A-Za-z0-9_.-]{0,63}"),
    ('name = "t"\n' + MINIMAL_GROUPS + '[data]\ngridmap = "grid-mapfile"\n',
     'cluster.toml: data.gridmap: must be a table: { file = "PATH" }, { files = [...] }, '
     '{ value = "TEXT" } or { inject = true }'),
]


@pytest.mark.parametrize("text, message", BAD_FILES)
def test_bad_file_gives_one_line_naming_the_field(text, message):
    """Each kind of mistake is reported as exactly this one line, naming the field."""
    with pytest.raises(ClusterFileError) as info:
        parse(text)
    assert str(info.value) == message


def test_invalid_toml_is_one_line_with_the_position():
    """A TOML syntax error names the file and the line, on one line."""
    with pytest.raises(ClusterFileError) as info:
        parse('name = "t"\n[[group]\n')
    message = str(info.value)
    assert message.startswith("cluster.toml: invalid TOML: ") and "line 2" in message
    assert "\n" not in message


def test_unreadable_or_non_utf8_cluster_file(tmp_path):
    """A missing cluster file and a non-UTF-8 one both give one line starting with the path."""
    missing = str(tmp_path / "missing.toml")
    with pytest.raises(ClusterFileError, match=r"^.*missing\.toml: cannot read: No such file or directory$"):
        load_cluster_file(missing)
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b'name = "\xff"\n')
    with pytest.raises(ClusterFileError, match=r"bin\.toml: not UTF-8 text \(byte 8\)$"):
        load_cluster_file(str(binary))


# ---------------------------------------------------------------- property tests

FRAGMENTS = [
    'name = "t"\n', 'name = ', '[[group]]\n', '[data]\n', '[group]\n', 'quantity = ', 'provides = ',
    'requires = ', 'data = ', 'all_identities = ', 'open_for_injection = ', 'expires_in = ',
    'join_token_ttl = ', 'gridmap = ', 'role = ', 'ready = ', 'file = ', 'files = ', 'value = ',
    'inject = ', '{ role = "a", ready = true }', '{ file = "grid-mapfile" }', '{ files = ["grid-mapfile"] }',
    '{ value = "v" }', '{ inject = true }', '{}', '["a", "b"]', '["gridmap"]', '[{ role = "a" }]',
    '"a"', '"-x"', '"g"', '"nope"', '"\\u00e9"', '1', '0', '-1', '3', '100001', '1.5', 'inf', 'nan',
    'true', 'false', '1979-05-27T07:32:00Z', '07:32:00', '[', ']', '{', '}', ',', '=', '"', "'''",
    '#', '\n', ' ', '.', 'a.b = 1\n', '[[group.x]]\n', '[data.gridmap]\n',
]

toml_ish = st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=4), max_size=40).map("".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(toml_ish)
def test_toml_ish_junk_raises_only_cluster_file_error(text):
    """Whatever the text, parsing returns a body or raises ClusterFileError with a one-line message."""
    try:
        body = parse(text)
    except ClusterFileError as e:
        assert "\n" not in str(e) and str(e).startswith("cluster.toml")
    else:
        assert body["groups"] and isinstance(body["data"], dict)


leaves = (st.none() | st.booleans() | st.integers(-3, 200000) | st.floats(allow_nan=True)
          | st.text(max_size=8) | st.sampled_from(["g", "a", "gridmap", "grid-mapfile", "x/y", ""])
          | st.datetimes().map(lambda d: d.replace(tzinfo=datetime.timezone.utc)))
KEYS = ["name", "quantity", "group", "data", "provides", "requires", "role", "ready", "file",
        "files", "value", "inject", "all_identities", "open_for_injection", "expires_in",
        "join_token_ttl", "gridmap", "zzz"]
documents = st.recursive(
    leaves,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=3),
                                                                 inner, max_size=5),
    max_leaves=25)


@settings(max_examples=300, deadline=None)
@given(documents)
def test_arbitrary_documents_raise_only_cluster_file_error(document):
    """Any parsed structure (wrong types anywhere) gives a body or a one-line ClusterFileError."""
    try:
        build_create_request(document, read_file=reader())
    except ClusterFileError as e:
        assert "\n" not in str(e)


def test_data_file_too_large_is_refused(tmp_path):
    """A data file the broker could never accept is refused without reading it all."""
    from ctxd.ctxctl.cluster import ClusterFileError, load_cluster_file
    from ctxd.rules import MAX_DATA_FILE

    (tmp_path / "big").write_bytes(b"x" * (MAX_DATA_FILE + 1))
    (tmp_path / "cluster.toml").write_text(
        'name = "x"\n[[group]]\nname = "g"\nquantity = 1\ndata = ["big"]\n[data]\nbig = { file = "big" }\n'
    )
    with pytest.raises(ClusterFileError) as info:
        load_cluster_file(str(tmp_path / "cluster.toml"))
    assert "data.big" in str(info.value) and "larger than" in str(info.value)
