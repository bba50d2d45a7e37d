"""End-to-end acceptance tests: real twistd -n ctxd, real ctxctl, real ctxagent.py.

Run: ``.venv/bin/python -m pytest tests/e2e -v`` (the namespace test needs root
and ``ip netns``; it is skipped otherwise).  Every test is skipped while a
component has not landed.  CTXD_E2E_TWISTD, CTXD_E2E_CTXCTL, CTXD_E2E_AGENT and
CTXD_E2E_AGENT_PYTHON point the tests at other builds or interpreters (e.g. an
old python3 for the agent).  Shared helpers: helpers.py; namespace hosts:
netns.py.
"""
