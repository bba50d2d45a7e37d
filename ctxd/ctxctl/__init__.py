"""ctxctl, the deployer's command-line client of the broker.

- :mod:`~ctxd.ctxctl.main` - the argument parser and the top level (``ctxctl``'s entry point);
- :mod:`~ctxd.ctxctl.commands` - one coroutine per subcommand;
- :mod:`~ctxd.ctxctl.client` - where the broker is, the credentials, JSON calls to it;
- :mod:`~ctxd.ctxctl.config` - the configuration file: profiles, each a broker, its CA and a token;
- :mod:`~ctxd.ctxctl.contexts` - contexts by name;
- :mod:`~ctxd.ctxctl.render` - tables, the progress line, report files, known_hosts lines;
- :mod:`~ctxd.ctxctl.cluster` - the cluster file (docs/cluster-file.md) as a create request;
- :mod:`~ctxd.ctxctl.userdata` - bootstraps wrapped as cloud-init user-data;
- :mod:`~ctxd.ctxctl.loader` - the program that user-data installs to fetch, check and run the
  agent (not imported: its source goes into the user-data);
- :mod:`~ctxd.ctxctl.errors` - one-line errors and exit codes.
"""
