"""A context's ctx-scripts tree at the broker (issue 16, "scripts that travel"): checked whole at
creation, announced in every view by its SHA-256, served to the context's nodes only.

ctxctl's packing is tests/test_ctxctl_day.py; the agent's fetching, checking and unpacking,
tests/test_agent_deployer_day.py.
"""

import base64
import gzip
import hashlib
import io
import tarfile

import pytest
from support import ADMIN_TOKEN, Client, model_state, replay_records, scripts_tree

from ctxd import rules
from ctxd.model import Quotas

FILES = {"1-config/head": b"#!/bin/sh\necho head\n", "2-start/compute": b"#!/bin/sh\necho compute\n"}


def body(scripts):
    return {"name": "travel", "groups": [{"name": "head", "quantity": 1, "source_check": False},
                                          {"name": "compute", "quantity": 1, "source_check": False}],
            "scripts": scripts}


def enrolled(client, scripts=None):
    cid, created = client.create(body(scripts or scripts_tree(FILES)))
    status, node = client.enroll(cid, created["bootstraps"]["compute"]["join_token"], 2)
    assert status == 201, node
    return cid, node


def fetch(client, cid, node, token=None):
    d = client.stub.get(f"https://ctxd.test:8443/v1/contexts/{cid}/nodes/{node['node_id']}/scripts",
                        headers={"Authorization": f"Bearer {token or node['node_token']}"})
    client.stub.flush()
    import treq
    from support import result_of

    response = result_of(d)
    content = result_of(treq.content(response))
    return response.code, response.headers.getRawHeaders("content-type", [""])[0], content


def test_the_tree_is_announced_in_every_view_and_served_to_the_contexts_nodes():
    client = Client()
    tree = scripts_tree(FILES)
    cid, node = enrolled(client, tree)
    view = client.call("GET", f"/v1/contexts/{cid}/nodes/{node['node_id']}/view", node["node_token"])[1]
    packed = base64.b64decode(tree["b64"])
    assert view["scripts"] == {"sha256": hashlib.sha256(packed).hexdigest(), "size": len(packed)}
    code, ctype, content = fetch(client, cid, node)
    assert (code, ctype, content) == (200, "application/gzip", packed)
    # Another context's node: refused like every node route.
    other, other_node = enrolled(client)
    assert fetch(client, cid, node, token=other_node["node_token"])[0] == 403


def test_a_context_without_a_tree_has_none_in_its_views_and_answers_404():
    client = Client()
    cid, created = client.create({"name": "plain", "groups": [{"name": "g", "quantity": 1, "source_check": False}]})
    status, node = client.enroll(cid, created["bootstraps"]["g"]["join_token"], 3)
    view = client.call("GET", f"/v1/contexts/{cid}/nodes/{node['node_id']}/view", node["node_token"])[1]
    assert "scripts" not in view and "scripts" not in client.journal.records[0]
    assert fetch(client, cid, node)[0] == 404


def symlink(tar):
    info = tarfile.TarInfo("1-config/link")
    info.type, info.linkname = tarfile.SYMTYPE, "/etc/shadow"
    tar.addfile(info)


def escaping(tar):
    tar.addfile(tarfile.TarInfo("../../etc/cron.d/x"), io.BytesIO(b""))


def absolute(tar):
    tar.addfile(tarfile.TarInfo("/etc/passwd"), io.BytesIO(b""))


def device(tar):
    info = tarfile.TarInfo("dev")
    info.type = tarfile.CHRTYPE
    tar.addfile(info)


@pytest.mark.parametrize("extra, problem", [
    (symlink, "is not a regular file or a directory"),
    (escaping, "is not a regular file or a directory with a relative name"),
    (absolute, "is not a regular file or a directory with a relative name"),
    (device, "is not a regular file or a directory"),
])
def test_an_unsafe_tree_is_refused_and_nothing_is_created(extra, problem):
    client = Client()
    status, reply = client.call("POST", "/v1/contexts", ADMIN_TOKEN, body(scripts_tree(FILES, extra)))
    assert status == 400 and reply["error"] == "invalid_cluster" and problem in reply["message"], reply
    assert client.journal.records == []


def test_a_wrong_hash_a_non_tar_or_a_large_tree_is_refused():
    client = Client()
    tree = scripts_tree(FILES)
    bad = dict(tree, sha256="0" * 64)
    status, reply = client.call("POST", "/v1/contexts", ADMIN_TOKEN, body(bad))
    assert status == 400 and "is not the SHA-256 of the tree" in reply["message"]
    junk = gzip.compress(b"not a tar" * 100)
    status, reply = client.call("POST", "/v1/contexts", ADMIN_TOKEN, body(
        {"b64": base64.b64encode(junk).decode(), "sha256": hashlib.sha256(junk).hexdigest()}))
    assert status == 400 and "not a tar" in reply["message"]
    large = base64.b64encode(bytes(600 * 1024)).decode()
    status, reply = client.call("POST", "/v1/contexts", ADMIN_TOKEN, body({"b64": large, "sha256": ""}))
    assert status == 400 and f"at most {rules.MAX_SCRIPTS} bytes" in reply["message"]
    bomb = scripts_tree({"big": b"\0" * (17 << 20)})
    status, reply = client.call("POST", "/v1/contexts", ADMIN_TOKEN, body(bomb))
    assert status == 400 and "16777216 bytes" in reply["message"]
    assert client.journal.records == []


def test_the_tree_counts_against_the_data_quota():
    client = Client()
    client.broker.model.quotas = Quotas(data_bytes_per_context=100)
    status, reply = client.call("POST", "/v1/contexts", ADMIN_TOKEN, body(scripts_tree(
        {f"f{i}": hashlib.sha512(bytes([i])).digest() for i in range(20)})))
    assert status == 409 and reply["error"] == "quota_exceeded" and "data and scripts" in reply["message"]


def test_the_tree_survives_a_compaction():
    client = Client()
    cid, node = enrolled(client)
    model = client.broker.model
    again = replay_records(model.snapshot_records())
    assert model_state(again) == model_state(model)
    assert again.contexts[cid].scripts == model.contexts[cid].scripts


def below_a_file(tar):
    tar.addfile(tarfile.TarInfo("1-config/head/x"), io.BytesIO(b""))


def file_and_directory(tar):
    info = tarfile.TarInfo("1-config/head")
    info.type = tarfile.DIRTYPE
    tar.addfile(info)


def dot_file(tar):
    tar.addfile(tarfile.TarInfo("."), io.BytesIO(b""))


def long_header(tar):
    """A GNU long name of 4 MiB: tarfile reads a header whole, so it must be inflated within a bound."""
    info = tarfile.TarInfo("x" * (4 << 20))
    tar.format = tarfile.GNU_FORMAT
    tar.addfile(info, io.BytesIO(b""))


def safe_dot_prefix(tar):
    tar.addfile(tarfile.TarInfo("./2-start/head"), io.BytesIO(b"#!/bin/sh\n"))


@pytest.mark.parametrize("extra", [None, symlink, escaping, absolute, device, below_a_file, file_and_directory,
                                   dot_file, long_header, safe_dot_prefix])
def test_what_the_broker_accepts_every_agent_accepts(extra):
    """What the broker accepts, every agent accepts (ctxagent.read_scripts), tree by tree; the broker
    also refuses names no file system takes (the 4 MiB one), which the agent finds out only as it writes."""
    import ctxagent

    from ctxd.validate import scripts_problem

    packed = base64.b64decode(scripts_tree(FILES, extra)["b64"])
    broker_ok = scripts_problem(packed) is None
    try:
        ctxagent.read_scripts(packed)
        agent_ok = True
    except ctxagent.InputError:
        agent_ok = False
    assert agent_ok or not broker_ok, (extra, "the broker accepts a tree the agent refuses")
    assert broker_ok == (extra in (None, safe_dot_prefix)), (extra, scripts_problem(packed))
    assert agent_ok == (extra in (None, safe_dot_prefix, long_header))


def test_a_tree_one_byte_over_the_limit_is_refused():
    packed = bytes(rules.MAX_SCRIPTS + 1)
    client = Client()
    status, reply = client.call("POST", "/v1/contexts", ADMIN_TOKEN, body(
        {"b64": base64.b64encode(packed).decode(), "sha256": hashlib.sha256(packed).hexdigest()}))
    assert status == 400 and f"at most {rules.MAX_SCRIPTS} bytes" in reply["message"]
    status, reply = client.call("POST", "/v1/contexts", ADMIN_TOKEN, body(dict(scripts_tree(FILES), sha256="\u00e9" * 64)))
    assert status == 400 and "64 hexadecimal digits" in reply["message"]
