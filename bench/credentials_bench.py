"""What host credentials cost the broker: signing one node's certificates (docs/credentials.md).

Per run, for N nodes: the time to issue an X.509 host certificate (ctxd.credentials.Authority.
issue_x509, from a parsed request: key derivation, building, signing) and to sign one SSH host
certificate (issue_ssh on the library path, cryptography >= 40), against a floor measured in
the same run: one bare ECDSA P-256 signature, which every X.509 certificate needs. Medians of
--runs runs; the ratio says what ctxd adds on top of the signature itself.

    python bench/credentials_bench.py --nodes 1000 --runs 5
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec, ed25519  # noqa: E402
from support import csr_for  # noqa: E402

from ctxd import credentials  # noqa: E402


def one_run(nodes: int):
    authority = credentials.Authority(os.urandom(32))
    cid = "B" * 22
    ca_pem = authority.context_cas(cid, "bench", time.time(), True, True)["x509"]
    requests = [credentials.parse_csr(csr_for([f"node{n}.bench.test"])[0]) for n in range(nodes)]
    host_keys = [ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode() for _ in range(nodes)]
    floor_key = ec.generate_private_key(ec.SECP256R1())
    data = os.urandom(600)   # about a certificate's to-be-signed part

    start = time.perf_counter()
    for _ in range(nodes):
        floor_key.sign(data, ec.ECDSA(hashes.SHA256()))
    floor = (time.perf_counter() - start) / nodes

    start = time.perf_counter()
    for n, csr in enumerate(requests):
        authority.issue_x509(cid, ca_pem, "context", csr, [f"node{n}.bench.test"], 30 * 86400, time.time())
    x509_s = (time.perf_counter() - start) / nodes

    ssh_s = None
    if credentials.SSHCertificateBuilder is not None:
        start = time.perf_counter()
        for n, key in enumerate(host_keys):
            authority.issue_ssh(cid, f"N{n:021d}", [key], [f"node{n}.bench.test"], 30 * 86400, time.time())
        ssh_s = (time.perf_counter() - start) / nodes
    return floor, x509_s, ssh_s


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    runs = [one_run(args.nodes) for _ in range(args.runs)]
    floor = statistics.median(r[0] for r in runs)
    x509_s = statistics.median(r[1] for r in runs)
    print(f"credentials, {args.nodes} nodes, median of {args.runs} runs")
    print(f"  floor (one ECDSA P-256 signature): {floor * 1e6:8.1f} us")
    print(f"  X.509 host certificate:            {x509_s * 1e6:8.1f} us  ({x509_s / floor:.1f}x floor; "
          f"{x509_s * 10000:.1f} s for 10,000 nodes)")
    if runs[0][2] is not None:
        ssh_s = statistics.median(r[2] for r in runs)
        print(f"  SSH host certificate (one key):    {ssh_s * 1e6:8.1f} us  ({ssh_s / floor:.1f}x floor; "
              f"{ssh_s * 10000:.1f} s for 10,000 nodes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
