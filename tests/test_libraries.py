"""Which library versions this run tests: make test-debian must run on Debian 12's own."""

import os

import pytest

DEBIAN12 = {"twisted": "22.4.0", "treq": "22.2.0", "OpenSSL": "23.0.0", "cryptography": "38.0.4",
            "service_identity": "18.1.0"}


@pytest.mark.skipif(os.environ.get("CTXD_LIBRARIES") != "debian12", reason="not the Debian 12 run")
def test_the_debian_run_uses_debian_12s_libraries():
    """With CTXD_LIBRARIES=debian12, every library is the version bookworm ships, from /usr/lib."""
    import importlib

    for name, version in DEBIAN12.items():
        module = importlib.import_module(name)
        assert module.__version__ == version, (name, module.__version__)
        assert module.__file__.startswith("/usr/lib/python3/dist-packages/"), (name, module.__file__)
