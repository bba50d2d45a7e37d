"""ctxctl's side of host credentials (issue 14): the [group.certificate] and
[group.ssh_certificate] tables of the cluster file, `ctxctl ca`, and `ctxctl known-hosts` with
an SSH CA.

The cluster-file checks need no broker; the body they build is checked against the broker's own
validation (ctxd.validate.cluster), so what ctxctl fills in is what the broker keeps. The commands
run against the real broker through tests/test_cli_args.py's Deployment (the real API over an
in-memory journal); canned resources only for what the real broker never answers (an older
broker's 404, a tampered answer).
"""

import json
import os
import re
import stat

import pytest
from cryptography import x509
from hypothesis import given, settings
from hypothesis import strategies as st
from support import torque_cluster
from test_cli_args import Deployment, Tampered
from twisted.web.resource import Resource

from ctxd import rules, validate
from ctxd.ctxctl import render
from ctxd.ctxctl.cluster import ClusterFileError, build_create_request, parse_cluster_text
from ctxd.ctxctl.main import parse_args

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
DAY = 86400
DEFAULT_CERTIFICATE = {"names": ["fqdn", "hostname", "ip"], "validity": 30 * DAY,
                       "key": "/etc/ctxd/tls/host.key", "certificate": "/etc/ctxd/tls/host.crt",
                       "bundle": "/etc/ctxd/tls/ca.pem", "ca_dir": None, "issuer": "context"}
DEFAULT_SSH_CERTIFICATE = {"validity": 30 * DAY, "sshd": False}

CLUSTER = '''\
name = "creds"
[[group]]
name = "head"
quantity = 1
provides = ["master"]
'''


def parse(text):
    return parse_cluster_text(text, read_file=lambda path: b"x")


def group_with(tables, top=""):
    """The one group of ``top`` + CLUSTER followed by ``tables`` (TOML attaches them to it)."""
    return parse(top + CLUSTER + tables)["groups"][0]


@pytest.fixture
def broker():
    """A fresh real broker, its clock at T0."""
    return Deployment()


# ------------------------------------------------------------------ the cluster file

def test_the_documented_complete_example_sends_both_tables():
    """docs/cluster-file.md's complete example: its tables become exactly these JSON objects, and
    the broker keeps them as they are."""
    with open(os.path.join(REPO, "docs", "cluster-file.md"), encoding="utf-8") as f:
        text = re.search(r"## A complete example.*?```toml\n(.*?)```", f.read(), re.S).group(1)
    body = parse(text)
    head, compute, login = body["groups"]
    assert head["certificate"] == {
        "names": ["fqdn", "hostname"], "validity": 30 * DAY, "key": "/etc/ctxd/tls/host.key",
        "certificate": "/etc/ctxd/tls/host.crt", "bundle": "/etc/ctxd/tls/ca.pem",
        "ca_dir": "/etc/grid-security/certificates", "issuer": "context"}
    assert head["ssh_certificate"] == {"validity": 7 * DAY, "sshd": True}
    assert "certificate" not in compute and compute["ssh_certificate"] == DEFAULT_SSH_CERTIFICATE
    assert "certificate" not in login and "ssh_certificate" not in login
    kept = validate.cluster(body)["groups"]
    assert [(g.get("certificate"), g.get("ssh_certificate")) for g in kept] == [
        (g.get("certificate"), g.get("ssh_certificate")) for g in body["groups"]]


def test_empty_tables_mean_every_default_written_out():
    """[group.certificate] and [group.ssh_certificate] without keys opt in with every default,
    spelled out in the body; a group without them sends neither key."""
    group = group_with("[group.certificate]\n[group.ssh_certificate]\n")
    assert (group["certificate"], group["ssh_certificate"]) == (DEFAULT_CERTIFICATE, DEFAULT_SSH_CERTIFICATE)
    assert set(parse(CLUSTER)["groups"][0]) == {"name", "quantity", "provides", "requires", "data",
                                                "all_identities", "source_check"}


@pytest.mark.parametrize("value, seconds", [
    ('"30d"', 30 * DAY), ('"12h"', 12 * 3600), ('"1h"', 3600), ("3600", 3600), ('"397d"', 397 * DAY),
    ('"90m"', 5400), ("34300800", 34300800),
])
def test_validity_is_a_duration_or_seconds(value, seconds):
    """validity reads as the lease does: one unit or plain seconds; 1 h to 397 days, for both kinds."""
    group = group_with(f"[group.certificate]\nvalidity = {value}\n[group.ssh_certificate]\nvalidity = {value}\n")
    assert group["certificate"]["validity"] == group["ssh_certificate"]["validity"] == seconds


def test_site_issuer_with_domain_and_fqdn():
    """issuer = "site" is accepted with the context's domain and names = ["fqdn"]."""
    group = group_with('[group.certificate]\nissuer = "site"\nnames = ["fqdn"]\n', top='domain = "Grid.Example.org"\n')
    assert group["certificate"] == dict(DEFAULT_CERTIFICATE, names=["fqdn"], issuer="site")


BAD_TABLES = [
    ("certificate = true\n", 'group[0].certificate: must be a table: [group.certificate] after the group\'s '
                             '[[group]] line'),
    ("ssh_certificate = 3\n", "group[0].ssh_certificate: must be a table: [group.ssh_certificate] after the "
                              "group's [[group]] line"),
    ("[group.certificate]\nnmaes = []\n", "group[0].certificate.nmaes: unknown key (allowed: names, validity, "
                                          "key, certificate, bundle, ca_dir, issuer)"),
    ("[group.ssh_certificate]\nprincipals = []\n", "group[0].ssh_certificate.principals: unknown key (allowed: "
                                                   "validity, sshd)"),
    ("[group.certificate]\nnames = []\n", 'group[0].certificate.names: must be a non-empty array of "fqdn", '
                                          '"hostname", "ip", e.g. ["fqdn"]'),
    ('[group.certificate]\nnames = "fqdn"\n', 'group[0].certificate.names: must be a non-empty array of "fqdn", '
                                              '"hostname", "ip", e.g. ["fqdn"]'),
    ('[group.certificate]\nnames = ["fqdn", "FQDN"]\n', 'group[0].certificate.names[1]: \'FQDN\' is not one of '
                                                        '"fqdn", "hostname", "ip"'),
    ('[group.certificate]\nnames = [1]\n', 'group[0].certificate.names[0]: must be one of "fqdn", "hostname", "ip"'),
    ('[group.certificate]\nnames = ["ip", "ip"]\n', "group[0].certificate.names[1]: 'ip' is listed twice"),
    ('[group.certificate]\nvalidity = "59m"\n', "group[0].certificate.validity: a certificate of group 'head' is "
                                                "valid from 1 h to 397 days, not '59m'"),
    ("[group.ssh_certificate]\nvalidity = 34300801\n", "group[0].ssh_certificate.validity: a certificate of group "
                                                       "'head' is valid from 1 h to 397 days, not 34300801"),
    ('[group.certificate]\nvalidity = "1y"\n', "group[0].certificate.validity: '1y' is not a duration: a number of "
                                               'seconds, or a number with a unit s, m, h or d, e.g. "90s", "10m", '
                                               "\"12h\", \"30d\" (group 'head')"),
    ("[group.certificate]\nvalidity = 1.5\n", 'group[0].certificate.validity: must be a duration such as "30d" or '
                                              "an integer of seconds (group 'head')"),
    ("[group.certificate]\nvalidity = true\n", 'group[0].certificate.validity: must be a duration such as "30d" or '
                                               "an integer of seconds (group 'head')"),
    ('[group.certificate]\nkey = "host.key"\n', "group[0].certificate.key: 'host.key' is not an absolute path "
                                                "(starting with /, without empty, . or .. parts or control "
                                                "characters, at most 4096 characters)"),
    ('[group.certificate]\ncertificate = "/etc/../shadow"\n', "group[0].certificate.certificate: '/etc/../shadow' "
                                                              "is not an absolute path (starting with /, without "
                                                              "empty, . or .. parts or control characters, at "
                                                              "most 4096 characters)"),
    ('[group.certificate]\nbundle = "/etc/ctxd/tls/"\n', "group[0].certificate.bundle: '/etc/ctxd/tls/' is not an "
                                                         "absolute path (starting with /, without empty, . or .. "
                                                         "parts or control characters, at most 4096 characters)"),
    ('[group.certificate]\nca_dir = "/etc/grid\\nsecurity"\n', "group[0].certificate.ca_dir: '/etc/grid\\nsecurity' "
                                                               "is not an absolute path (starting with /, without "
                                                               "empty, . or .. parts or control characters, at "
                                                               "most 4096 characters)"),
    ("[group.certificate]\nkey = 3\n", "group[0].certificate.key: must be a string: an absolute path on the VMs"),
    ('[group.certificate]\nbundle = "/etc/ctxd/tls/host.key"\n', "group[0].certificate.bundle: "
                                                                 "'/etc/ctxd/tls/host.key' is also the key: key, "
                                                                 "certificate and bundle must be three different "
                                                                 "files"),
    ('[group.certificate]\nissuer = "ca"\n', "group[0].certificate.issuer: 'ca' is not \"context\" (the context's "
                                             "own CA) or \"site\" (the broker's site CA)"),
    ('[group.certificate]\nissuer = "site"\nnames = ["fqdn"]\n', 'group[0].certificate.issuer: "site" needs the '
                                                                 "context's domain (domain = \"...\" at the top of "
                                                                 "the file): the site's CA signs only names in it "
                                                                 "(group 'head')"),
    ("[group.ssh_certificate]\nsshd = \"yes\"\n", "group[0].ssh_certificate.sshd: must be true or false"),
]


@pytest.mark.parametrize("tables, message", BAD_TABLES)
def test_bad_table_gives_one_line_naming_the_field(tables, message):
    """Each mistake in the two tables is exactly this one line, naming the field."""
    with pytest.raises(ClusterFileError) as info:
        parse(CLUSTER + tables)
    assert str(info.value) == "cluster.toml: " + message


def test_site_issuer_needs_only_the_fqdn():
    """issuer = "site" with a domain but other names (the default: all three) says what to write."""
    with pytest.raises(ClusterFileError) as info:
        parse('domain = "grid.example.org"\n' + CLUSTER + '[group.certificate]\nissuer = "site"\n')
    assert str(info.value) == ('cluster.toml: group[0].certificate.issuer: "site" needs names = ["fqdn"]: short '
                               "names and addresses repeat across contexts (group 'head')")


def test_the_broker_keeps_what_ctxctl_sends():
    """For tables with and without each key, the broker's own validation of ctxctl's body leaves
    the two objects unchanged: ctxctl's defaults are the broker's."""
    for tables in ("[group.certificate]\n", "[group.ssh_certificate]\n",
                   '[group.certificate]\nnames = ["ip"]\nvalidity = "2h"\nca_dir = "/x/y"\n',
                   '[group.certificate]\nkey = "/k"\ncertificate = "/c"\nbundle = "/b"\n'
                   '[group.ssh_certificate]\nsshd = true\nvalidity = 3600\n'):
        body = parse(CLUSTER + tables)
        kept = validate.cluster(json.loads(json.dumps(body)))["groups"][0]
        for kind in ("certificate", "ssh_certificate"):
            assert kept.get(kind) == body["groups"][0].get(kind), tables


def _value():
    leaves = (st.none() | st.booleans() | st.integers(-5, 40000000) | st.floats(allow_nan=True)
              | st.sampled_from(["fqdn", "ip", "hostname", "site", "context", "30d", "/a/b", "/", "x", ""])
              | st.text(max_size=6))
    return st.recursive(leaves, lambda inner: st.lists(inner, max_size=4), max_leaves=8)


KEYS = ["names", "validity", "key", "certificate", "bundle", "ca_dir", "issuer", "sshd", "zz"]


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(KEYS), _value(), max_size=6),
       st.dictionaries(st.sampled_from(KEYS), _value(), max_size=3), st.booleans())
def test_any_table_gives_a_body_the_broker_keeps_or_one_line(certificate, ssh, domain):
    """Whatever the tables hold: a body whose tables the broker keeps as they are, or one
    ClusterFileError line."""
    document = {"name": "t", "group": [{"name": "g", "quantity": 1, "certificate": certificate,
                                        "ssh_certificate": ssh}]}
    if domain:
        document["domain"] = "example.org"
    try:
        body = build_create_request(document)
    except ClusterFileError as e:
        assert "\n" not in str(e)
        return
    kept = validate.cluster(json.loads(json.dumps(body)))["groups"][0]
    assert (kept["certificate"], kept["ssh_certificate"]) == (body["groups"][0]["certificate"],
                                                              body["groups"][0]["ssh_certificate"])


# ------------------------------------------------------------------ a context with host credentials

def credentials_cluster(domain=True, sshd=False):
    """The torque cluster with an X.509 certificate for the head and SSH certificates for the
    computes (that their sshd presents when ``sshd``)."""
    body = torque_cluster()
    if domain:
        body["domain"] = "cluster.test"
    body["groups"][0]["certificate"] = dict(DEFAULT_CERTIFICATE)
    body["groups"][1]["ssh_certificate"] = dict(DEFAULT_SSH_CERTIFICATE, sshd=sshd)
    return body


def test_create_sends_the_tables_and_the_broker_keeps_them(broker, tmp_path):
    """ctxctl create with the tables: the status's groups show them as the file said."""
    path = tmp_path / "cluster.toml"
    path.write_text(CLUSTER + '[group.certificate]\nnames = ["fqdn"]\n[group.ssh_certificate]\nsshd = true\n')
    code, out, err = broker.run(["create", str(path), "--out", str(tmp_path / "boot")])
    assert code == 0, err
    [group] = broker.status(out.strip())["groups"]
    assert group["certificate"] == dict(DEFAULT_CERTIFICATE, names=["fqdn"])
    assert group["ssh_certificate"] == dict(DEFAULT_SSH_CERTIFICATE, sshd=True)


def test_ca_prints_the_contexts_bundle(broker, tmp_path):
    """ctxctl ca CTX prints the context's CA certificate (PEM, a CA), exactly the broker's bundle;
    --out writes it 0644 and says so; --json prints the broker's answer."""
    cid, _ = broker.create(credentials_cluster())
    answer = broker.call("GET", f"/v1/contexts/{cid}/ca")
    code, out, err = broker.run(["ca", cid])
    assert (code, out, err) == (0, answer["x509"]["bundle"], "")
    cert = x509.load_pem_x509_certificate(out.encode())
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    path = tmp_path / "ca.pem"
    code, out, err = broker.run(["ca", cid, "--out", str(path)])
    assert (code, out, err) == (0, "", f"wrote the X.509 CA bundle (1 certificate) of context {cid} to {path}\n")
    assert path.read_text() == answer["x509"]["bundle"] and stat.S_IMODE(path.stat().st_mode) == 0o644
    code, out, err = broker.run(["ca", cid, "--json"])
    assert (code, json.loads(out), err) == (0, answer, "")


def test_ca_of_a_context_without_an_x509_ca_is_one_line(broker, tmp_path):
    """A context whose groups have no [group.certificate]: one line saying so, nothing written;
    its --json still shows the broker's answer (the SSH CA)."""
    body = credentials_cluster()
    del body["groups"][0]["certificate"]
    cid, _ = broker.create(body)
    code, out, err = broker.run(["ca", cid, "--out", str(tmp_path / "ca.pem")])
    assert (code, out, err) == (1, "", f"ctxctl: error: context {cid} has no X.509 CA: none of its groups has a "
                                       "[group.certificate] table\n")
    assert not (tmp_path / "ca.pem").exists()
    code, out, _ = broker.run(["ca", cid, "--json"])
    assert code == 0 and json.loads(out)["x509"] is None and json.loads(out)["ssh"]["pattern"] == "*.cluster.test"


def test_ca_of_a_missing_context_is_the_brokers_404(broker):
    """ca on a context that does not exist: the broker's 404, in one line."""
    code, out, err = broker.run(["ca", "A" * 22])
    assert (code, out, err) == (1, "", "ctxctl: error: broker: no such context (not_found, HTTP 404)\n")


class OldBroker(Resource):
    """The real API behind a broker older than host credentials and the agent route: those
    routes are 404 like any unknown path."""

    isLeaf = True

    def __init__(self, real):
        super().__init__()
        self.real = real

    def render(self, request):
        if request.path.endswith(b"/ca") or request.path == b"/v1/agent":
            request.setResponseCode(404)
            request.setHeader(b"content-type", b"application/json")
            return b'{"error": "not_found", "message": "no such resource"}'
        return self.real.render(request)


def test_ca_on_an_older_broker_says_so(broker):
    """A broker without GET .../ca (its 404 while the context exists): one line naming the cause."""
    cid, _ = broker.create()
    code, out, err = broker.run(["ca", cid], client=broker.stub(OldBroker(broker.spy)))
    assert (code, out) == (1, "")
    assert err == (f"ctxctl: error: broker: GET /v1/contexts/{cid}/ca answered 404 though the context exists: "
                   "a ctxd older than host credentials\n")


@pytest.mark.parametrize("bundle", [
    "", "not a certificate\n", "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
    None, ["x"],
])
def test_ca_refuses_a_bundle_that_is_not_certificates(broker, bundle, tmp_path):
    """A bundle that is empty or is not PEM certificates (a tampered answer) is one line; nothing written."""
    cid, _ = broker.create(credentials_cluster())

    def tamper(answer):
        if isinstance(answer, dict) and "x509" in answer:
            answer["x509"]["bundle"] = bundle
        return answer
    good = broker.call("GET", f"/v1/contexts/{cid}/ca")["x509"]["bundle"]
    for tampered in (bundle, good + "\x1b[31m junk\n"):
        bundle = tampered
        code, out, err = broker.run(["ca", cid, "--out", str(tmp_path / "ca.pem")],
                                    client=broker.stub(Tampered(broker, tamper)))
        assert (code, out) == (1, "") and err.startswith(f"ctxctl: error: broker: the X.509 CA of context {cid}: ")
        assert err.count("\n") == 1 and not (tmp_path / "ca.pem").exists()


def test_ca_checks_its_arguments():
    """ca takes one context id (or name); anything else is a usage error before anything is sent."""
    assert parse_args(["ca", "A" * 22, "--out", "f", "--json"]).command_key == "ca"
    with pytest.raises(SystemExit) as info:
        parse_args(["ca", "not/an-id"])
    assert info.value.code == 2


# ------------------------------------------------------------------ known-hosts with an SSH CA

def enrolled(broker, body):
    """``body`` created, its head (VM 1) and two computes (VMs 2, 3) enrolled: the context id."""
    cid, joins = broker.create(body)
    for n, group in ((1, "head"), (2, "compute"), (3, "compute")):
        broker.enroll(cid, joins[group], n)
    return cid


def host_line(n):
    return f"node{n}.cluster.test,node{n},10.9.0.{n} ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI{n:04d}key"


def test_known_hosts_puts_the_ca_line_first_and_only_uncertified_hosts(broker):
    """With SSH certificates sshd presents in the computes' group: the @cert-authority line (the
    broker's), then per-host lines for the head alone; --per-host: every node's lines and no CA
    line, without asking for the CA."""
    cid = enrolled(broker, credentials_cluster(sshd=True))
    ca = broker.call("GET", f"/v1/contexts/{cid}/ca")["ssh"]
    assert ca["known_hosts"].startswith("@cert-authority *.cluster.test ssh-ed25519 ")
    code, out, err = broker.run(["known-hosts", cid])
    assert (code, out.splitlines(), err) == (0, [ca["known_hosts"], host_line(1)], "")
    broker.spy.requests.clear()
    code, out, err = broker.run(["known-hosts", cid, "--per-host"])
    assert (code, out.splitlines(), err) == (0, [host_line(1), host_line(2), host_line(3)], "")
    assert [r[1] for r in broker.spy.requests] == [f"/v1/contexts/{cid}"]


def test_known_hosts_without_a_domain_trusts_the_ca_for_any_host(broker):
    """A context without a domain: the broker's pattern is *, and ctxctl passes it on."""
    cid = enrolled(broker, credentials_cluster(domain=False, sshd=True))
    code, out, _ = broker.run(["known-hosts", cid])
    assert code == 0 and out.splitlines()[0].startswith("@cert-authority * ssh-ed25519 ")
    assert out.splitlines()[1:] == [host_line(1)]


def test_known_hosts_write_puts_the_ca_line_in_the_managed_block(broker, tmp_path):
    """--write: the managed block holds the CA line and the head's keys; the rest of the file stays."""
    cid = enrolled(broker, credentials_cluster(sshd=True))
    ca_line = broker.call("GET", f"/v1/contexts/{cid}/ca")["ssh"]["known_hosts"]
    path = tmp_path / "known_hosts"
    path.write_text("github.com ssh-ed25519 AAAAgithub\n")
    code, out, err = broker.run(["known-hosts", cid, "--write", "--file", str(path)])
    assert (code, out, err) == (0, "", f"wrote its SSH CA and 1 host keys of context {cid} to {path}\n")
    assert path.read_text() == ("github.com ssh-ed25519 AAAAgithub\n" f"# BEGIN ctxd (context {cid})\n"
                                f"{ca_line}\n{host_line(1)}\n# END ctxd (context {cid})\n")


def test_known_hosts_of_a_context_without_an_ssh_ca_is_as_before(broker):
    """No group with SSH certificates (or a broker without GET .../ca): a line per host key, as before."""
    body = credentials_cluster()
    del body["groups"][1]["ssh_certificate"]
    cid = enrolled(broker, body)
    expected = [host_line(1), host_line(2), host_line(3)]
    assert broker.run(["known-hosts", cid])[:2] == (0, "\n".join(expected) + "\n")
    cid = enrolled(broker, credentials_cluster())
    assert broker.run(["known-hosts", cid], client=broker.stub(OldBroker(broker.spy)))[:2] == (
        0, "\n".join(expected) + "\n")


def test_known_hosts_follows_the_cas_group_list_when_given(broker):
    """When the CA answer names the certified groups (as a view's ssh_ca does), only those are skipped."""
    body = credentials_cluster(sshd=True)
    body["groups"][0]["ssh_certificate"] = dict(DEFAULT_SSH_CERTIFICATE, sshd=True)
    cid = enrolled(broker, body)

    def name_head(answer):
        if isinstance(answer, dict) and isinstance(answer.get("ssh"), dict):
            answer["ssh"]["groups"] = ["head"]
        return answer
    code, out, _ = broker.run(["known-hosts", cid], client=broker.stub(Tampered(broker, name_head)))
    assert code == 0 and out.splitlines()[1:] == [host_line(2), host_line(3)]


def test_known_hosts_keeps_per_host_lines_where_sshd_does_not_present_certificates(broker):
    """sshd = false (the default): the certificates are installed but sshd presents the plain host
    keys, so those nodes keep per-host lines, even when the CA answer (an older broker) lists the group."""
    cid = enrolled(broker, credentials_cluster())
    all_hosts = [host_line(1), host_line(2), host_line(3)]
    code, out, _ = broker.run(["known-hosts", cid])
    assert code == 0 and out.splitlines()[0].startswith("@cert-authority ") and out.splitlines()[1:] == all_hosts

    def name_compute(answer):
        if isinstance(answer, dict) and isinstance(answer.get("ssh"), dict):
            answer["ssh"]["groups"] = ["compute"]
        return answer
    code, out, _ = broker.run(["known-hosts", cid], client=broker.stub(Tampered(broker, name_compute)))
    assert code == 0 and out.splitlines()[1:] == all_hosts
    status = {"groups": [{"name": "compute", "ssh_certificate": dict(DEFAULT_SSH_CERTIFICATE)},
                         {"name": "head", "ssh_certificate": dict(DEFAULT_SSH_CERTIFICATE, sshd=True)}]}
    assert render.ssh_certified_groups({}, status) == ["head"]
    assert render.ssh_certified_groups({"groups": ["compute", "head"]}, status) == ["head"]


@pytest.mark.parametrize("line", [
    "@cert-authority *.cluster.test ssh-ed25519 AAAAC3Nza\n* ssh-rsa AAAAinjected",
    "@cert-authority * ssh-ed25519 AAAAC3Nza ctxd x",
    "@revoked * ssh-ed25519 AAAAC3Nza",
    "@cert-authority *,evil.org ssh-ed25519 AAAAC3Nza",
    "@cert-authority * ssh-dss! AAAA",
    "@cert-authority * ssh-ed25519 AAAAC3Nza \x1b[2J",
    None,
])
def test_known_hosts_refuses_a_ca_line_it_cannot_vouch_for(broker, tmp_path, line):
    """A CA line that is not exactly '@cert-authority PATTERN TYPE KEY [COMMENT]' (a tampered
    answer): one error line, nothing printed or written."""
    cid = enrolled(broker, credentials_cluster())

    def tamper(answer):
        if isinstance(answer, dict) and isinstance(answer.get("ssh"), dict):
            answer["ssh"]["known_hosts"] = line
        return answer
    path = tmp_path / "known_hosts"
    code, out, err = broker.run(["known-hosts", cid, "--write", "--file", str(path)],
                                client=broker.stub(Tampered(broker, tamper)))
    assert (code, out) == (1, "") and not path.exists()
    assert err.startswith(f"ctxctl: error: broker: the SSH CA of context {cid}: ") and err.count("\n") == 1


def test_cert_authority_line_keeps_a_plain_comment():
    """The broker's line, comment included, is rebuilt unchanged when every part checks out."""
    line = "@cert-authority *.a.example ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIabc ctxd-Q2x1c3Rlci1pZC0xMjM0NT"
    assert render.cert_authority_line({"known_hosts": line}) == line
    assert rules.is_ssh_key(line.split(" ")[2] + " " + line.split(" ")[3])
