#!/usr/bin/env python3
"""ctxagent-loader: fetch ctxagent.py from the broker, check its SHA-256, run it.

What ctxctl's default user-data installs instead of the whole agent (docs/agent.md):
cloud-init writes it 0700 and runs it with the agent's arguments (``--bootstrap cloud-init
[--watch]``), now and, through ctxagent.service, at every later boot.

It reads the broker's URL and CA from the ``# ctxd-bootstrap:`` line of the user-data
cloud-init saved (or of the file after ``--cloud-init-user-data``, which the agent reads
too), fetches ``URL/v1/agent`` over TLS verified against that CA with the host name
checked, refuses it unless its SHA-256 is SHA256, writes it to AGENT (0755, a temporary
file renamed over it) and replaces itself with it, same arguments: the agent's exit code
is then the exit code. An agent already at AGENT with that hash runs without asking the
broker (every later boot).

While the network or the broker is not up (no route, connection refused, a timeout, a 5xx)
it asks again with backoff, for up to PATIENCE seconds. A certificate that does not verify,
a 4xx answer and an agent with another hash are final. It exits 0 when the user-data holds
no bootstrap (as the agent does); 6 when the broker's agent is not the one the user-data names
(a broker upgraded since it was written: like the agent's 6, final, so the watch unit does not
fetch it again every 10 s); 3 for any other failure; with one ``ctxagent-loader: error:`` line
on stderr.

Every byte of it is in every VM's user-data, so it is written tersely: imports on one line,
no function that is used once but ``main``.

ctxctl (ctxd/ctxctl/userdata.py: loader_source) fills in SHA256, AGENT and USER_DATA, and
strips these comments and docstrings: what is left must stay small (the default user-data
is under 4 KB with it). Standard library only, Python 3.6+, like the agent.
"""

import base64, gzip, hashlib, http.client, json, os, ssl, sys, tempfile, time, urllib.parse

SHA256 = ""
AGENT = "/usr/local/sbin/ctxagent.py"
USER_DATA = "/var/lib/cloud/instance/user-data.txt"
PATIENCE = 1800


def fail(code, message):
    """One error line on stderr; exit CODE."""
    print("ctxagent-loader: error:", message, file=sys.stderr)
    sys.exit(code)


def download(url, ca_pem):
    """The body of a 200 answer to GET URL from a server CA_PEM vouches for, asked again
    while the network or the broker is not up."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)   # verifies, and checks the host name
    context.load_verify_locations(cadata=ca_pem)
    parts, delay, deadline = urllib.parse.urlsplit(url), 1, time.monotonic() + PATIENCE
    while True:
        connection = http.client.HTTPSConnection(parts.hostname, parts.port or 443, timeout=60, context=context)
        try:
            connection.request("GET", parts.path)
            reply = connection.getresponse()
            if reply.status == 200:
                return reply.read()
            problem, final = "HTTP %d" % reply.status, reply.status < 500
        except (OSError, http.client.HTTPException, ssl.CertificateError) as exc:
            # ssl.CertificateError: a wrong name on Python 3.6; from 3.7 on any failed verification.
            problem = str(exc) or type(exc).__name__
            final = isinstance(exc, ssl.CertificateError) or "CERTIFICATE_VERIFY_FAILED" in problem
        finally:
            connection.close()
        if final or time.monotonic() > deadline:
            fail(3, "cannot fetch %s: %s" % (url, problem))
        print("ctxagent-loader: %s: %s; again in %d s" % (url, problem, delay), file=sys.stderr)
        time.sleep(delay)
        delay = min(2 * delay, 30)


def main(argv):
    """Make AGENT the agent with SHA256 unless it is already, then run it with ARGV."""
    try:
        with open(AGENT, "rb") as f:
            ready = hashlib.sha256(f.read()).hexdigest() == SHA256
    except OSError:
        ready = False
    if not ready:
        option = "--cloud-init-user-data"
        path = argv[argv.index(option) + 1] if option in argv[:-1] else USER_DATA
        with open(path, "rb") as f:
            data = f.read()
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        marker = b"# ctxd-bootstrap: "
        lines = [line for line in data.splitlines() if line.startswith(marker)]
        if not lines:
            print("ctxagent-loader: no ctxd bootstrap in", path, file=sys.stderr)
            sys.exit(0)
        bootstrap = json.loads(base64.b64decode(lines[0][len(marker):]))
        url = bootstrap["url"].rstrip("/") + "/v1/agent"
        body = download(url, bootstrap["ca_pem"])
        found = hashlib.sha256(body).hexdigest()
        if found != SHA256:
            fail(6, "%s has SHA-256 %s, not %s: not run (after a broker upgrade, write new user-data)"
                    % (url, found, SHA256))
        fd, temporary = tempfile.mkstemp(dir=os.path.dirname(AGENT))
        with os.fdopen(fd, "wb") as f:
            f.write(body)
            os.fsync(f.fileno())
        os.chmod(temporary, 0o755)
        os.rename(temporary, AGENT)
    os.execv(sys.executable, [sys.executable, AGENT] + argv)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except Exception as exc:   # unreadable user-data, a corrupt bootstrap, a full disk...
        fail(3, "%s: %s" % (type(exc).__name__, exc))
