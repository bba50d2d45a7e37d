"""Host credentials at the broker (docs/credentials.md): each context's CAs, what a node may be
certified for, what is refused and audited, what is journaled and survives a restart.

The agent's half is tests/test_agent_credentials.py; real processes end to end (an openssl
s_server and an sshd presenting what ctxd issued) are tests/e2e/test_credentials.py.
"""

import datetime
import json
import os
import subprocess
import sys

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from support import ADMIN_TOKEN, AUTHORITY, Client, csr_for, identity, make_broker, replay_records, result_of

from ctxd import credentials, rules, validate
from ctxd.errors import InvalidCluster

DAY = 86400


def ssh_keys(n):
    """Real host public keys (ed25519 and ECDSA P-256) for node ``n``, as an identity lists them."""
    keys = [ed25519.Ed25519PrivateKey.generate(), ec.generate_private_key(ec.SECP256R1())]
    return [k.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
            for k in keys]


def cluster(certificate=None, ssh=None, domain="cluster.test", plain=False):
    """A context whose "web" group has host credentials, and a "plain" group without."""
    web = {"name": "web", "quantity": 2, "source_check": False}
    if certificate is not None:
        web["certificate"] = certificate
    if ssh is not None:
        web["ssh_certificate"] = ssh
    body = {"name": "creds", "groups": [web, {"name": "plain", "quantity": 1, "source_check": False}]}
    if domain:
        body["domain"] = domain
    return body


class Cluster:
    """A broker (StubTreq, a Clock) with one context and node 1 of group web enrolled."""

    def __init__(self, body, keys=None):
        self.client = Client()
        self.client.clock.advance(1_800_000_000)
        self.cid, created = self.client.create(body)
        self.created = created
        self.joins = {g: b["join_token"] for g, b in created["bootstraps"].items()}
        self.node = self.enroll("web", 1, ssh_host_keys=keys or ssh_keys(1))

    def enroll(self, group, n, **ident):
        status, node = self.client.enroll(self.cid, self.joins[group], n, **ident)
        assert status == 201, node
        return node

    def ask(self, body, node=None):
        node = node or self.node
        return self.client.call("POST", f"/v1/contexts/{self.cid}/nodes/{node['node_id']}/credentials",
                                node["node_token"], body)

    def journaled(self, op="credential"):
        return [r for r in self.client.journal.records if r["op"] == op]


def load(pem):
    return x509.load_pem_x509_certificate(pem.encode())


def verify(leaf, issuer):
    """``leaf`` is signed by ``issuer``'s key (ECDSA), and names it as its issuer."""
    assert leaf.issuer == issuer.subject
    issuer.public_key().verify(leaf.signature, leaf.tbs_certificate_bytes, ec.ECDSA(leaf.signature_hash_algorithm))


def sans(cert):
    value = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(n.value) for n in value]


# -- the cluster file's tables ------------------------------------------------------------


def test_defaults_are_filled_in():
    spec = validate.certificate({}, "certificate")
    assert spec == {"names": ["fqdn", "hostname", "ip"], "validity": 30 * DAY, "issuer": "context",
                    "key": "/etc/ctxd/tls/host.key", "certificate": "/etc/ctxd/tls/host.crt",
                    "bundle": "/etc/ctxd/tls/ca.pem", "ca_dir": None}
    assert validate.ssh_certificate({}, "ssh") == {"validity": 30 * DAY, "sshd": False}


@pytest.mark.parametrize("value, problem", [
    ({"names": []}, "names"),
    ({"names": ["fqdn", "fqdn"]}, "names"),
    ({"names": ["email"]}, "names"),
    ({"names": [["fqdn"]]}, "names"),
    ({"validity": 3599}, "validity"),
    ({"validity": 398 * DAY}, "validity"),
    ({"key": "relative/host.key"}, "key"),
    ({"key": "/etc/../shadow"}, "key"),
    ({"bundle": "/etc/ctxd/./ca.pem"}, "bundle"),
    ({"ca_dir": "/etc/grid\nsecurity"}, "ca_dir"),
    ({"certificate": "/etc/ctxd/tls/host.key"}, "three different files"),
    ({"issuer": "vault"}, "issuer"),
    ({"serial": 1}, "unknown field"),
])
def test_a_bad_certificate_table_is_refused(value, problem):
    with pytest.raises(Exception) as e:
        validate.certificate(value, "groups[0].certificate")
    assert problem in str(e.value) and e.value.code in ("bad_request", "invalid_cluster")


def test_site_issued_certificates_need_the_domain_and_the_fqdn_only():
    for body in (cluster({"issuer": "site", "names": ["fqdn"]}, domain=""),
                 cluster({"issuer": "site", "names": ["fqdn", "ip"]})):
        with pytest.raises(InvalidCluster, match="needs the context's domain and names"):
            validate.cluster(body)
    assert validate.cluster(cluster({"issuer": "site", "names": ["fqdn"]}))["groups"][0]["certificate"]["issuer"] == "site"


def test_a_broker_without_a_site_ca_refuses_site_issued_groups_and_creates_nothing():
    client = Client()
    status, body = client.call("POST", "/v1/contexts", ADMIN_TOKEN, cluster({"issuer": "site", "names": ["fqdn"]}))
    assert status == 400 and body["error"] == "invalid_cluster" and "--site-ca-cert" in body["message"]
    assert client.journal.records == [] and client.broker.model.contexts == {}


def test_a_broker_without_an_authority_refuses_groups_with_credentials():
    client = Client()
    client.broker.authority = None
    status, body = client.call("POST", "/v1/contexts", ADMIN_TOKEN, cluster(ssh={}))
    assert status == 400 and "issues no host certificates" in body["message"]


def test_groups_without_credentials_change_nothing():
    """No CA, no new keys in the create record or the views: older records and views stay as they were."""
    c = Cluster(cluster())
    create = c.journaled("create")[0]
    assert "cas" not in create and all("certificate" not in g and "ssh_certificate" not in g for g in create["groups"])
    view = c.client.broker.model.view(c.client.broker.model.contexts[c.cid].nodes[c.node["node_id"]])
    assert not {"certificate", "ssh_certificate", "ssh_ca"} & set(view)
    status, body = c.ask({"ssh": True})
    assert status == 409 and body["error"] == "not_enabled" and "[group.ssh_certificate]" in body["message"]


# -- a context's CAs ------------------------------------------------------------------------


def test_each_context_has_its_own_cas_derived_from_the_master_secret():
    a, b = Cluster(cluster({}, {})), Cluster(cluster({}, {}))
    cas_a, cas_b = a.journaled("create")[0]["cas"], b.journaled("create")[0]["cas"]
    assert cas_a["x509"] != cas_b["x509"] and cas_a["ssh"] != cas_b["ssh"]
    ca = load(cas_a["x509"])
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca.public_key().public_numbers() == AUTHORITY._x509_key(a.cid).public_key().public_numbers()
    assert cas_a["ssh"] == credentials._ssh_public(AUTHORITY._ssh_key(a.cid))
    # Another master secret: other keys for the same context id.
    other = credentials.Authority(b"\xff" * 32)
    assert credentials._ssh_public(other._ssh_key(a.cid)) != cas_a["ssh"]
    # Nothing secret in the journal.
    text = json.dumps(a.client.journal.records)
    assert "PRIVATE KEY" not in text


def test_the_master_secret_is_made_once_0600(tmp_path):
    master = credentials.load_master(str(tmp_path))
    path = tmp_path / credentials.MASTER_FILE
    assert len(master) == 32 and (path.stat().st_mode & 0o777) == 0o600
    assert credentials.load_master(str(tmp_path)) == master
    path.write_bytes(b"short")
    with pytest.raises(ValueError, match="not a ctxd credentials key"):
        credentials.load_master(str(tmp_path))
    path.chmod(0o644)
    with pytest.raises(ValueError, match="is accessible to others"):
        credentials.load_master(str(tmp_path))


def test_a_stale_signing_directory_is_removed_at_start(tmp_path):
    """A broker killed while ssh-keygen ran leaves the context's SSH CA key on disk: gone at the next start."""
    stale = tmp_path / (credentials.SIGN_DIR_PREFIX + "abc")
    stale.mkdir()
    (stale / "ca").write_text("a private key")
    (tmp_path / "journal.log").write_text("kept")
    credentials.Authority(bytes(32), workdir=str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["journal.log"]


def test_the_deployer_gets_the_bundle_and_the_cert_authority_line():
    c = Cluster(cluster({}, {}))
    status, cas = c.client.call("GET", f"/v1/contexts/{c.cid}/ca", ADMIN_TOKEN)
    assert status == 200 and cas["x509"]["bundle"] == c.journaled("create")[0]["cas"]["x509"]
    ssh = c.journaled("create")[0]["cas"]["ssh"]
    assert cas["ssh"] == {"public_key": ssh, "pattern": "*.cluster.test",
                          "known_hosts": f"@cert-authority *.cluster.test {ssh} ctxd-{c.cid}"}
    plain = Cluster(cluster(domain=""))
    assert plain.client.call("GET", f"/v1/contexts/{plain.cid}/ca", ADMIN_TOKEN) == (200, {"x509": None, "ssh": None})


def test_views_carry_the_groups_settings_and_every_group_the_ssh_ca():
    c = Cluster(cluster({"names": ["fqdn"]}, {"sshd": True}))
    model = c.client.broker.model
    ctx = model.contexts[c.cid]
    web = model.view(ctx.nodes[c.node["node_id"]])
    assert web["certificate"]["names"] == ["fqdn"] and web["ssh_certificate"] == {"validity": 30 * DAY, "sshd": True}
    plain = c.enroll("plain", 5)
    other = model.view(ctx.nodes[plain["node_id"]])
    assert "certificate" not in other and "ssh_certificate" not in other
    assert web["ssh_ca"] == other["ssh_ca"] == {"public_key": ctx.cas["ssh"], "pattern": "*", "groups": ["web"]}


# -- X.509 ----------------------------------------------------------------------------------


def test_a_node_gets_a_certificate_for_its_own_names():
    c = Cluster(cluster({}))
    me = identity(1)
    pem, key = csr_for([me["fqdn"], me["hostname"], me["primary_ip"]])
    status, body = c.ask({"csr": pem})
    assert status == 200, body
    issued = body["x509"]
    cert, ca = load(issued["certificate"]), load(c.journaled("create")[0]["cas"]["x509"])
    verify(cert, ca)
    assert issued["bundle"] == c.journaled("create")[0]["cas"]["x509"] and issued["chain"] == ""
    assert sans(cert) == [me["fqdn"], me["hostname"], me["primary_ip"]] == issued["names"]
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == me["fqdn"]
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()
    assert format(cert.serial_number, "x") == issued["serial"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_cert_sign
    cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    now = c.client.clock.seconds()
    assert issued["not_before"] == int(now) - credentials.SKEW and issued["not_after"] == int(now) + 30 * DAY
    # Journaled: what a restart must know, nothing secret, not the issuer's chain.
    [record] = c.journaled()
    assert record["issued"]["x509"]["serial"] == issued["serial"] and "bundle" not in record["issued"]["x509"]
    assert record["issued"]["x509"]["key"] == credentials.key_id(key.public_key())


def test_the_group_decides_which_names_and_how_long():
    c = Cluster(cluster({"names": ["hostname"], "validity": 2 * 3600}))
    status, body = c.ask({"csr": csr_for(["node1"])[0]})
    assert status == 200 and body["x509"]["not_after"] - c.client.clock.seconds() <= 2 * 3600
    # Its fqdn is its own, but the group does not certify fqdns.
    c.client.clock.advance(61)
    status, body = c.ask({"csr": csr_for(["node1.cluster.test"])[0]})
    assert status == 403 and body["error"] == "certificate_refused" and "node1.cluster.test" in body["message"]


def peer_and_outside_names():
    return [["node2.cluster.test"], ["node1.cluster.test", "10.9.0.2"], ["www.example.org"],
            ["node1.cluster.test", "*.cluster.test"], ["fd00::1"]]


@pytest.mark.parametrize("names", peer_and_outside_names())
def test_a_name_that_is_not_the_nodes_own_is_refused(names):
    """A peer's name or address, an outside name, a wildcard, an interface address (fd00::1 is
    node 1's, but interface addresses may repeat across nodes): refused, nothing journaled."""
    c = Cluster(cluster({}))
    c.enroll("web", 2)
    before = list(c.client.journal.records)
    status, body = c.ask({"csr": csr_for(names)[0]})
    assert status == 403 and body["error"] == "certificate_refused"
    assert "not one of this node's names" in body["message"]
    assert c.client.journal.records == before


def test_a_common_name_alone_is_checked_too():
    c = Cluster(cluster({}))
    c.enroll("web", 2)
    pem, _ = csr_for([], common_name="node2.cluster.test")
    status, body = c.ask({"csr": pem})
    assert status == 403 and "node2.cluster.test" in body["message"]


def test_a_request_not_signed_by_its_own_key_is_refused():
    """The CSR carries node 1's names and key A, but its signature was made with key B."""
    c = Cluster(cluster({}))
    pem, key_a = csr_for(["node1.cluster.test"])
    csr = x509.load_pem_x509_csr(pem.encode())
    key_b = ec.generate_private_key(ec.SECP256R1())
    forged = (x509.CertificateSigningRequestBuilder().subject_name(csr.subject)
              .sign(key_b, hashes.SHA256()))
    # Splice key A's SubjectPublicKeyInfo into the request signed by key B.
    der = bytearray(forged.public_bytes(serialization.Encoding.DER))
    spki_a = key_a.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    spki_b = key_b.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert len(spki_a) == len(spki_b) and der.count(spki_b) == 1
    der = bytes(der).replace(spki_b, spki_a)
    spliced = x509.load_der_x509_csr(der)
    assert spliced.public_key().public_numbers() == key_a.public_key().public_numbers()
    status, body = c.ask({"csr": spliced.public_bytes(serialization.Encoding.PEM).decode()})
    assert status == 403 and body["error"] == "certificate_refused"
    assert body["message"] == "the request is not signed by the key it carries"
    assert c.journaled() == []


def test_refusals_are_audited_once_a_minute_per_node(tmp_path):
    from ctxd.audit import AuditLog

    c = Cluster(cluster({}))
    c.client.broker.audit = AuditLog(str(tmp_path / "audit.log"), c.client.clock.seconds)
    for _ in range(3):
        assert c.ask({"csr": csr_for(["www.example.org"])[0]})[0] == 403
    c.client.clock.advance(60)
    assert c.ask({"csr": csr_for(["www.example.org"])[0]})[0] == 403
    c.client.broker.audit.flush()
    lines = [json.loads(line) for line in (tmp_path / "audit.log").read_text().splitlines()]
    refused = [e for e in lines if e.get("action") == "certificate_refused"]
    assert len(refused) == 2, lines
    assert "www.example.org" in refused[0]["problem"] and refused[0]["principal"] == f"node:{c.cid}/{c.node['node_id']}"


@pytest.mark.parametrize("body, problem", [
    ({}, "ask for an X.509 certificate"),
    ({"csr": "not a request"}, "not a PEM certificate request"),
    ({"csr": 7}, "must be a PEM certificate request"),
    ({"csr": "x" * (rules.MAX_CSR + 1)}, "must be a PEM certificate request"),
    ({"ssh": "yes"}, "ssh: must be true or false"),
    ({"csr": "", "extra": 1}, "unknown field"),
])
def test_malformed_requests_are_400_and_change_nothing(body, problem):
    c = Cluster(cluster({}))
    status, reply = c.ask(body)
    assert status == 400 and problem in reply["message"], reply
    assert c.journaled() == []


def test_weak_keys_are_refused():
    c = Cluster(cluster({}))
    weak = rsa.generate_private_key(65537, 1024)
    status, body = c.ask({"csr": csr_for(["node1.cluster.test"], key=weak)[0]})
    assert status == 400 and "RSA of 2048 bits" in body["message"]
    strong = rsa.generate_private_key(65537, 2048)
    status, body = c.ask({"csr": csr_for(["node1.cluster.test"], key=strong)[0]})
    assert status == 200
    assert load(body["x509"]["certificate"]).extensions.get_extension_for_class(x509.KeyUsage).value.key_encipherment


def test_the_same_request_gets_the_same_certificate_also_after_a_restart():
    c = Cluster(cluster({}))
    pem, _ = csr_for(["node1.cluster.test"])
    first = c.ask({"csr": pem})[1]["x509"]
    c.client.clock.advance(3600)
    assert c.ask({"csr": pem})[1]["x509"] == first
    assert len(c.journaled()) == 1
    # A restart: the journal replayed into a new broker on the same master secret.
    broker = make_broker(clock=c.client.clock)
    broker.model = replay_records(c.client.journal.records)
    node = broker.model.contexts[c.cid].nodes[c.node["node_id"]]
    principal = broker.authenticate(c.node["node_token"])
    again = result_of(broker.credentials(principal, c.cid, node.id, {"csr": pem}, "10.9.0.1"))
    assert again["x509"] == first
    # And the snapshot carries it.
    snap = replay_records(c.client.broker.model.snapshot_records())
    assert snap.contexts[c.cid].nodes[node.id].credentials == node.credentials


def test_renewal_after_two_thirds_and_at_most_one_new_certificate_a_minute():
    c = Cluster(dict(cluster({"validity": 30 * DAY}), expires_in=60 * DAY))
    pem, key = csr_for(["node1.cluster.test"])
    first = c.ask({"csr": pem})[1]["x509"]
    # Another key at once: rate limited.
    status, body = c.ask({"csr": csr_for(["node1.cluster.test"])[0]})
    assert status == 429 and body["error"] == "rate_limited"
    c.client.clock.advance(60)
    second = c.ask({"csr": csr_for(["node1.cluster.test"])[0]})[1]["x509"]
    assert second["serial"] != first["serial"]
    # The same key: renewed only once less than a third of the validity is left.
    pem2 = csr_for(["node1.cluster.test"], key=key)[0]
    c.client.clock.advance(60)
    third = c.ask({"csr": pem2})[1]["x509"]   # the key differs from the second one's: new
    c.client.clock.advance(19 * DAY)
    assert c.ask({"csr": pem2})[1]["x509"]["serial"] == third["serial"]
    c.client.clock.advance(2 * DAY)
    renewed = c.ask({"csr": pem2})[1]["x509"]
    assert renewed["serial"] != third["serial"] and renewed["not_after"] > third["not_after"]


def test_a_departed_node_cannot_renew():
    c = Cluster(cluster({}))
    pem, _ = csr_for(["node1.cluster.test"])
    assert c.ask({"csr": pem})[0] == 200
    status, _ = c.client.call("POST", f"/v1/contexts/{c.cid}/nodes/{c.node['node_id']}/remove", ADMIN_TOKEN, {})
    assert status == 200
    status, body = c.ask({"csr": pem})
    assert status == 401


def test_a_revoked_node_cannot_ask():
    c = Cluster(cluster({}))
    c.client.call("POST", f"/v1/contexts/{c.cid}/nodes/{c.node['node_id']}/revoke", ADMIN_TOKEN)
    assert c.ask({"csr": csr_for(["node1.cluster.test"])[0]})[0] == 401


# -- a site's intermediate CA ---------------------------------------------------------------------


def make_site_ca(tmp_path):
    """A root and an intermediate (with its key) in PEM files: the intermediate's file holds
    the intermediate, then the root."""
    from ctxd.tls import make_ca

    root, root_key = make_ca("Site Root")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Site Clusters CA")])
    root_ski = root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    inter = (x509.CertificateBuilder().subject_name(name).issuer_name(root.subject).public_key(key.public_key())
             .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
             .not_valid_after(now + datetime.timedelta(days=3650))
             .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
             .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(root_ski), critical=False)
             .sign(root_key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "site-ca.pem", tmp_path / "site-ca.key"
    cert_path.write_bytes(inter.public_bytes(serialization.Encoding.PEM) + root.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return root, inter, str(cert_path), str(key_path)


def test_a_site_intermediate_signs_site_groups(tmp_path):
    root, inter, cert_path, key_path = make_site_ca(tmp_path)
    site = credentials.SiteCA(cert_path, key_path)
    c = Cluster.__new__(Cluster)
    c.client = Client()
    c.client.broker.authority = credentials.Authority(bytes(32), site)
    c.client.clock.advance(1_800_000_000)
    c.cid, created = c.client.create(cluster({"issuer": "site", "names": ["fqdn"]}))
    assert "cas" not in c.journaled("create")[0]   # no context CA: the site's signs
    c.joins = {g: b["join_token"] for g, b in created["bootstraps"].items()}
    c.node = c.enroll("web", 1)
    status, body = c.ask({"csr": csr_for(["node1.cluster.test"])[0]})
    assert status == 200, body
    leaf = load(body["x509"]["certificate"])
    verify(leaf, inter)
    assert load(body["x509"]["chain"]).subject == inter.subject
    assert load(body["x509"]["bundle"]).subject == root.subject
    status, cas = c.client.call("GET", f"/v1/contexts/{c.cid}/ca", ADMIN_TOKEN)
    assert load(cas["x509"]["bundle"]).subject == root.subject


def test_a_site_ca_that_is_not_a_ca_or_not_its_keys_is_refused(tmp_path):
    root, inter, cert_path, key_path = make_site_ca(tmp_path)
    other = tmp_path / "other.key"
    other.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    with pytest.raises(ValueError, match="is accessible to others"):
        credentials.SiteCA(cert_path, str(other))
    other.chmod(0o600)
    with pytest.raises(ValueError, match="is not the key of the first certificate"):
        credentials.SiteCA(cert_path, str(other))


# -- SSH ------------------------------------------------------------------------------------------


def ssh_keygen_list(certificate, tmp_path):
    path = tmp_path / "host-cert.pub"
    path.write_text(certificate + "\n")
    return subprocess.run(["ssh-keygen", "-L", "-f", str(path)], check=True, capture_output=True, text=True,
                          env=dict(os.environ, TZ="UTC")).stdout


def fingerprint(public_key, tmp_path):
    path = tmp_path / "ca.pub"
    path.write_text(public_key + "\n")
    out = subprocess.run(["ssh-keygen", "-l", "-f", str(path)], check=True, capture_output=True, text=True).stdout
    return out.split()[1]


def test_ssh_host_certificates_for_the_recorded_keys_and_names(tmp_path):
    keys = ssh_keys(1)
    c = Cluster(cluster(ssh={"validity": DAY}), keys)
    status, body = c.ask({"ssh": True})
    assert status == 200, body
    ssh = body["ssh"]
    assert [x["type"] for x in ssh["certificates"]] == ["ssh-ed25519", "ecdsa-sha2-nistp256"]
    assert ssh["names"] == ["node1.cluster.test", "node1", "10.9.0.1"]
    ca = c.journaled("create")[0]["cas"]["ssh"]
    for cert, key in zip(ssh["certificates"], keys):
        assert cert["certificate"].split()[0] == key.split()[0] + "-cert-v01@openssh.com"
        listing = ssh_keygen_list(cert["certificate"], tmp_path)
        assert "host certificate" in listing and fingerprint(ca, tmp_path) in listing
        assert "node1.cluster.test" in listing and "10.9.0.1" in listing
        assert fingerprint(key, tmp_path) in listing
    assert ssh["not_after"] - ssh["not_before"] == DAY + credentials.SKEW


def test_ssh_certificates_follow_the_identity_and_are_not_reissued_without_need():
    c = Cluster(cluster(ssh={}))
    first = c.ask({"ssh": True})[1]["ssh"]
    c.client.clock.advance(61)
    assert c.ask({"ssh": True})[1]["ssh"] == first
    # New host keys (a re-imaged VM keeping its instance): new certificates.
    status, _ = c.client.call("PUT", f"/v1/contexts/{c.cid}/nodes/{c.node['node_id']}/identity",
                              c.node["node_token"], dict(identity(1), ssh_host_keys=ssh_keys(1)),
                              source="10.9.0.1")
    assert status == 200
    assert c.ask({"ssh": True})[1]["ssh"]["serial"] != first["serial"]


def test_both_kinds_in_one_request_make_one_record():
    c = Cluster(cluster({}, {}))
    status, body = c.ask({"csr": csr_for(["node1.cluster.test"])[0], "ssh": True})
    assert status == 200 and set(body) == {"x509", "ssh"}
    [record] = c.journaled()
    assert set(record["issued"]) == {"x509", "ssh"}


def test_ssh_keygen_signs_the_same(tmp_path):
    """Debian 12's cryptography 38 cannot sign SSH certificates: OpenSSH's ssh-keygen does, in a
    real reactor (this runs in a child process so this one's reactor stays unstarted)."""
    keys = ssh_keys(3)
    script = f"""
import json, sys
from twisted.internet import task
from ctxd import credentials
credentials.SSHCertificateBuilder = None
authority = credentials.Authority(bytes(range(32)), workdir={str(tmp_path)!r})
def main(reactor):
    d = authority.issue_ssh("C" * 22, "N" * 22, {keys!r}, ["node3", "node3.cluster.test", "10.9.0.3"], 3600, 1.8e9)
    return d.addCallback(lambda issued: print(json.dumps(issued)))
task.react(main)
"""
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))).stdout
    issued = json.loads(out)
    assert len(issued["certificates"]) == 2
    ca = credentials._ssh_public(credentials.Authority(bytes(range(32)))._ssh_key("C" * 22))
    for cert, key in zip(issued["certificates"], keys):
        listing = ssh_keygen_list(cert["certificate"], tmp_path)
        assert fingerprint(ca, tmp_path) in listing and fingerprint(key, tmp_path) in listing
        assert "node3.cluster.test" in listing and "host certificate" in listing
        # The validity asked for (seconds since the epoch, in hex on ssh-keygen's command line).
        assert "Valid: from 2027-01-15T07:55:00 to 2027-01-15T09:00:00" in listing
    assert issued["not_before"] == 1.8e9 - credentials.SKEW and issued["not_after"] == 1.8e9 + 3600
    # The CA key was on disk only while ssh-keygen ran.
    assert not [n for n in os.listdir(tmp_path) if n.startswith("ssh-sign-")]


def test_a_lost_credentials_key_signs_nothing_for_the_contexts_it_did_not_make():
    """A state directory restored without its credentials.key gets a new one: the contexts made
    before it keep their CAs (in the journal), which the new key cannot sign for."""
    c = Cluster(cluster({}, {}))
    c.client.broker.authority = credentials.Authority(b"\x01" * 32)
    status, body = c.ask({"csr": csr_for(["node1.cluster.test"])[0]})
    assert status == 409 and body["error"] == "ca_key_lost" and "restore credentials.key" in body["message"]
    assert c.journaled() == []
    # A context made after it is fine.
    d = Cluster.__new__(Cluster)
    d.client = c.client
    d.cid, created = c.client.create(dict(cluster({}), name="after"))
    d.joins = {g: b["join_token"] for g, b in created["bootstraps"].items()}
    d.node = d.enroll("web", 7)
    assert d.ask({"csr": csr_for(["node7.cluster.test"])[0]})[0] == 200


def test_a_site_ca_without_basic_constraints_is_one_clear_error(tmp_path):
    from ctxd.tls import make_ca

    ca, key = make_ca("x")
    leaf = (x509.CertificateBuilder().subject_name(ca.subject).issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(1).not_valid_before(datetime.datetime(2020, 1, 1))
            .not_valid_after(datetime.datetime(2040, 1, 1)).sign(key, hashes.SHA256()))
    (tmp_path / "c.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "k.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    (tmp_path / "k.pem").chmod(0o600)
    with pytest.raises(ValueError, match="is not a CA"):
        credentials.SiteCA(str(tmp_path / "c.pem"), str(tmp_path / "k.pem"))


def test_mangled_requests_are_refused_never_a_500():
    """Byte-flipped and truncated requests (names that are not UTF-8, extensions that do not
    parse, signatures OpenSSL cannot read): 400 or 403 (or, for a flip that leaves a valid
    request of the node's own names, 200), never an internal error."""
    import base64
    import random

    c = Cluster(cluster({}))
    pem, _ = csr_for(["node1.cluster.test", "node1", "10.9.0.1"])
    der = x509.load_pem_x509_csr(pem.encode()).public_bytes(serialization.Encoding.DER)
    rng = random.Random(14)
    statuses = set()
    for i in range(300):
        mangled = bytearray(der)
        if i % 3 == 0:
            mangled = mangled[:rng.randrange(1, len(mangled))]
        else:
            for _ in range(rng.randrange(1, 4)):
                mangled[rng.randrange(len(mangled))] = rng.randrange(256)
        text = base64.encodebytes(bytes(mangled)).decode()
        status, body = c.ask({"csr": f"-----BEGIN CERTIFICATE REQUEST-----\n{text}-----END CERTIFICATE REQUEST-----\n"})
        assert status in (200, 400, 403), (i, status, body)
        statuses.add(status)
        c.client.clock.advance(61)
    assert {400, 403} <= statuses


def test_a_key_certified_for_one_node_is_refused_for_another():
    """Two VMs of one image sharing a TLS key: the second is refused (409 key_in_use), also after
    a restart and after the first departed."""
    c = Cluster(cluster({}))
    other = c.enroll("web", 2)
    key = ec.generate_private_key(ec.SECP256R1())
    assert c.ask({"csr": csr_for(["node1.cluster.test"], key=key)[0]})[0] == 200
    status, body = c.ask({"csr": csr_for(["node2.cluster.test"], key=key)[0]}, node=other)
    assert status == 409 and body["error"] == "key_in_use"
    assert c.client.call("POST", f"/v1/contexts/{c.cid}/nodes/{c.node['node_id']}/remove", ADMIN_TOKEN, {})[0] == 200
    c.client.broker.model = replay_records(c.client.journal.records)
    assert c.ask({"csr": csr_for(["node2.cluster.test"], key=key)[0]}, node=other)[0] == 409
    assert c.ask({"csr": csr_for(["node2.cluster.test"])[0]}, node=other)[0] == 200


def test_groups_whose_sshd_does_not_present_certificates_keep_per_host_lines():
    """With sshd = false the certificates are installed but sshd shows plain host keys: the view's
    ssh_ca does not list the group, so peers keep its per-host known_hosts lines."""
    c = Cluster(cluster(ssh={"sshd": False}))
    model = c.client.broker.model
    view = model.view(model.contexts[c.cid].nodes[c.node["node_id"]])
    assert view["ssh_ca"]["groups"] == [] and view["ssh_certificate"]["sshd"] is False
