from setuptools import setup

setup(
    name="ctxd",
    version="0.1.0",
    description="Contextualization broker for virtual clusters",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.9",
    packages=["ctxd", "ctxd.ctxctl", "ctxd.journal", "twisted.plugins"],
    package_data={"twisted.plugins": ["ctxd_plugin.py"]},
    py_modules=["ctxagent"],
    # The oldest versions are Debian 12's (python3-twisted and friends): the suite runs on
    # them (make test-debian) as on the newest releases.
    install_requires=[
        "twisted>=22.4",
        "pyopenssl>=23.0",
        "service-identity>=18.1",
        "cryptography>=38",
        "treq>=22.2",
        # /metrics: the Prometheus client, well kept and packaged by Debian (python3-prometheus-client).
        "prometheus-client>=0.16",
        # tomllib is in the standard library from Python 3.11; tomli is the same
        # parser, published separately for older Pythons.
        "tomli; python_version < '3.11'",
        # ctxctl's user-data: zopfli writes gzip any cloud-init reads, about 5% smaller than
        # zlib's best; what keeps the agent, its bootstrap and unit within EC2's 16384 bytes.
        # (Debian 12 has no python3-zopfli: there ctxctl runs the zopfli command instead.)
        "zopfli>=0.2",
    ],
    extras_require={
        # shtab and argparse-manpage make ctxctl's shell completion and man page (`make
        # cli-docs`) at build time; pinned, since the committed files are compared with their
        # output (tests/test_manpages.py). Never needed at run time.
        "test": ["pytest", "hypothesis", "pyyaml", "vermin", "schemathesis",
                 "shtab==1.13.0", "argparse-manpage==4.8"],
    },
    entry_points={
        "console_scripts": [
            "ctxctl = ctxd.ctxctl.main:main",
            "ctxagent = ctxagent:console_main",
        ],
    },
)
