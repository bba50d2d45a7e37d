# ctxd: `make run` installs and runs the broker with embedded defaults;
# `make test` installs what the tests need and runs them: on the newest PyPI releases, then
# (on Debian 12) on Debian's own packaged libraries, then the Debian packages on a fresh
# Debian 12 machine (as root). Each makes its own virtualenv.
PYTHON ?= python3
RUN_VENV ?= .venv-run
TEST_VENV ?= .venv-test
DEBIAN_VENV ?= .venv-debian
PYTEST_ARGS ?=

.PHONY: run test test-pypi test-debian test-package deb vermin fuzz crash-test bench clean cli-docs

$(RUN_VENV)/.installed: setup.py
	$(PYTHON) -m venv $(RUN_VENV)
	$(RUN_VENV)/bin/pip install -q --upgrade pip
	$(RUN_VENV)/bin/pip install -q .
	touch $@

run: $(RUN_VENV)/.installed
	$(RUN_VENV)/bin/twistd -n --pidfile= ctxd

# compat mode puts the work tree on sys.path, so twistd finds twisted/plugins/ here.
$(TEST_VENV)/.installed: setup.py
	$(PYTHON) -m venv $(TEST_VENV)
	$(TEST_VENV)/bin/pip install -q --upgrade pip
	$(TEST_VENV)/bin/pip install -q -e '.[test]' --config-settings editable_mode=compat
	touch $@

test: test-pypi test-debian test-package

test-pypi: $(TEST_VENV)/.installed
	$(TEST_VENV)/bin/vermin --no-tips --violations --target=3.6- ctxagent.py
	PATH=$(CURDIR)/$(TEST_VENV)/bin:$$PATH $(TEST_VENV)/bin/python -m pytest $(PYTEST_ARGS)

# The same suite on Debian 12's python3-twisted 22.4, python3-treq 22.2, python3-openssl 23.0,
# python3-cryptography 38, python3-service-identity 18.1 (tests/deb/libs.sh installs them);
# skipped, saying why, where that is not possible. The fuzz test needs schemathesis (PyPI only).
# The Slurm tests (-m slurm: the example's scripts and daemons, the broker as in every e2e test)
# run once, in test-pypi: they exercise no library the other e2e tests do not; so do the agent's
# own tests (-m agent: ctxagent.py is standard library only; the e2e tests run it against the
# broker on Debian's libraries) and two process-level e2e tests (-m once: failover, an agent's
# failing re-run), which keep the whole of `make test` under CI's 20 minutes.
test-debian:
	@if tests/deb/libs.sh $(DEBIAN_VENV); then \
		PATH=$(CURDIR)/$(DEBIAN_VENV)/bin:$$PATH CTXD_LIBRARIES=debian12 \
			$(DEBIAN_VENV)/bin/python -m pytest -m "not slurm and not agent and not once" $(PYTEST_ARGS); \
	else [ $$? = 3 ]; fi

# The Debian packages (ctxd, ctxd-agent) built from the work tree's files (tracked and new,
# not ignored) into build/deb/; needs debhelper dh-python python3-all python3-setuptools.
deb:
	rm -rf build/deb && mkdir -p build/deb/ctxd
	git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -C build/deb/ctxd -xf -
	cd build/deb/ctxd && dpkg-buildpackage -us -uc -b >../build.log 2>&1 || { tail -40 ../build.log; exit 1; }
	@ls build/deb/*.deb

# The packages on a fresh Debian 12 machine booted with systemd (debootstrap, systemd-nspawn;
# root): install, a cluster end to end, upgrade keeping state, init script, purge
# (tests/deb/test_package.py). tests/deb/tools.sh installs the tools, or says why it cannot.
test-package: $(TEST_VENV)/.installed
	@if tests/deb/tools.sh; then \
		$(MAKE) --no-print-directory deb && \
		CTXD_DEB_DIR=$(CURDIR)/build/deb PATH=$(CURDIR)/$(TEST_VENV)/bin:$$PATH \
			$(TEST_VENV)/bin/python -m pytest tests/deb $(PYTEST_ARGS); \
	else [ $$? = 3 ]; fi

# A long schemathesis campaign against a real broker (the bounded one runs in `make test`).
FUZZ_EXAMPLES ?= 1000
fuzz: $(TEST_VENV)/.installed
	CTXD_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) PATH=$(CURDIR)/$(TEST_VENV)/bin:$$PATH \
		$(TEST_VENV)/bin/python -m pytest tests/test_fuzz.py -q -s $(PYTEST_ARGS)

# A long kill -9 campaign against a real broker (the bounded one runs in `make test`).
TRIALS ?= 1000
crash-test: $(TEST_VENV)/.installed
	CTXD_CRASH_TRIALS=$(TRIALS) PATH=$(CURDIR)/$(TEST_VENV)/bin:$$PATH \
		$(TEST_VENV)/bin/python -m pytest tests/crash -q -s $(PYTEST_ARGS)

# ctxctl's shell completion (bash, zsh) and man page, generated from its argparse definitions
# (ctxd/ctxctl/main.py) by shtab and argparse-manpage - build-time tools, pinned in the test
# extras - with the man page's own sections from docs/man/ctxctl.1.include and its date from
# debian/changelog. Run it after changing an option or a command, and commit what it writes;
# tests/test_manpages.py checks the committed files are what it makes (CLI_DOCS_DIR: elsewhere).
CLI_DOCS_PYTHON ?= $(TEST_VENV)/bin/python
CLI_DOCS_DIR ?= .
CLI_DOCS_MADE = made by make cli-docs from ctxd/ctxctl/main.py ($(shell $(CLI_DOCS_PYTHON) -c 'import sys, shtab, \
	importlib.metadata as m; print("shtab %s, argparse-manpage %s, Python %d.%d" % (shtab.__version__, \
	m.version("argparse-manpage"), *sys.version_info[:2]))')): do not edit
CLI_DOCS_EPOCH = $(shell date -u -d "$$(sed -n 's/^ -- .*>  //p' debian/changelog | head -n 1)" +%s)
CLI_DOCS_SHTAB = $(CLI_DOCS_PYTHON) -m shtab --prog ctxctl --prefix ctxctl ctxd.ctxctl.main.build_parser
cli-docs: $(if $(filter $(TEST_VENV)/bin/python,$(CLI_DOCS_PYTHON)),$(TEST_VENV)/.installed)
	@mkdir -p $(CLI_DOCS_DIR)/etc/bash-completion $(CLI_DOCS_DIR)/etc/zsh $(CLI_DOCS_DIR)/docs/man
	@cd $(CLI_DOCS_DIR) && echo "# ctxctl's bash completion, $(CLI_DOCS_MADE)" > etc/bash-completion/ctxctl.tmp
	$(CLI_DOCS_SHTAB) --shell=bash >> $(CLI_DOCS_DIR)/etc/bash-completion/ctxctl.tmp
	$(CLI_DOCS_SHTAB) --shell=zsh > $(CLI_DOCS_DIR)/etc/zsh/_ctxctl.tmp
	@echo '.\" ctxctl(1), $(CLI_DOCS_MADE)' > $(CLI_DOCS_DIR)/docs/man/ctxctl.1.tmp
	COLUMNS=80 SOURCE_DATE_EPOCH=$(CLI_DOCS_EPOCH) $(CLI_DOCS_PYTHON) -c \
		'from argparse_manpage.cli import main; main()' --module ctxd.ctxctl.main --function manual_parser \
		--format single-commands-section --include docs/man/ctxctl.1.include --project-name ctxd \
		--version $$($(CLI_DOCS_PYTHON) -c 'import ctxd; print(ctxd.__version__)') \
		--manual-title "User Commands" \
		--description "the deployer's client for the ctxd contextualization broker" \
		>> $(CLI_DOCS_DIR)/docs/man/ctxctl.1.tmp
	@cd $(CLI_DOCS_DIR) && mv etc/bash-completion/ctxctl.tmp etc/bash-completion/ctxctl && \
		sed "1a # ctxctl's zsh completion, $(CLI_DOCS_MADE)" etc/zsh/_ctxctl.tmp > etc/zsh/_ctxctl && \
		rm etc/zsh/_ctxctl.tmp && mv docs/man/ctxctl.1.tmp docs/man/ctxctl.1

vermin: $(TEST_VENV)/.installed
	$(TEST_VENV)/bin/vermin --no-tips --violations --target=3.6- ctxagent.py

# Figures, not tests: medians of several runs on this machine (docs/benchmarks.md, bench/README.md).
# About 55 minutes on the 2-core development machine; run it with nothing else running.
BENCH_NODES ?= 10000
bench: $(TEST_VENV)/.installed
	$(TEST_VENV)/bin/python bench/floor.py --nodes 1000 --runs 3
	$(TEST_VENV)/bin/python bench/floor.py --nodes $$(( $(BENCH_NODES) / 2 )) --runs 3
	$(TEST_VENV)/bin/python bench/floor.py --nodes $(BENCH_NODES) --runs 3
	$(TEST_VENV)/bin/python bench/loadgen.py allids --nodes 1000 --runs 3
	$(TEST_VENV)/bin/python bench/watch_bench.py --nodes 1000 --join 100 --runs 3
	$(TEST_VENV)/bin/python bench/floor.py idle --nodes $(BENCH_NODES) --runs 3
	$(TEST_VENV)/bin/python bench/journal_bench.py throughput --clients 100 --seconds 10 --runs 3
	$(TEST_VENV)/bin/python bench/journal_bench.py replay --records 1000000 --runs 3
	$(TEST_VENV)/bin/python bench/journal_bench.py compaction --nodes 10000
	$(TEST_VENV)/bin/python bench/agent_bench.py --runs 5
	$(TEST_VENV)/bin/python bench/credentials_bench.py --nodes 1000 --runs 5

clean:
	rm -rf $(RUN_VENV) $(TEST_VENV) $(DEBIAN_VENV) build *.egg-info ctxd-state
	find . -name __pycache__ -prune -exec rm -rf {} +
