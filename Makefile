# ctxd: `make run` installs and runs the broker with embedded defaults;
# `make test` installs what the tests need and runs them. Each makes its own virtualenv.
PYTHON ?= python3
RUN_VENV ?= .venv-run
TEST_VENV ?= .venv-test
PYTEST_ARGS ?=

.PHONY: run test test-fast vermin fuzz crash-test bench clean

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

test: $(TEST_VENV)/.installed
	$(TEST_VENV)/bin/vermin --no-tips --violations --target=3.6- ctxagent.py
	PATH=$(CURDIR)/$(TEST_VENV)/bin:$$PATH $(TEST_VENV)/bin/python -m pytest $(PYTEST_ARGS)

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

vermin: $(TEST_VENV)/.installed
	$(TEST_VENV)/bin/vermin --no-tips --violations --target=3.6- ctxagent.py

# Figures, not tests: medians of several runs on this machine (docs/benchmarks.md, bench/README.md).
# About 45 minutes on the 2-core development machine; run it with nothing else running.
BENCH_NODES ?= 10000
bench: $(TEST_VENV)/.installed
	$(TEST_VENV)/bin/python bench/floor.py --nodes 1000 --runs 3
	$(TEST_VENV)/bin/python bench/floor.py --nodes $$(( $(BENCH_NODES) / 2 )) --runs 3
	$(TEST_VENV)/bin/python bench/floor.py --nodes $(BENCH_NODES) --runs 3
	$(TEST_VENV)/bin/python bench/loadgen.py allids --nodes 1000 --runs 3
	$(TEST_VENV)/bin/python bench/floor.py idle --nodes $(BENCH_NODES) --window 60 --runs 3
	$(TEST_VENV)/bin/python bench/journal_bench.py throughput --clients 100 --seconds 10 --runs 3
	$(TEST_VENV)/bin/python bench/journal_bench.py replay --records 1000000 --runs 3
	$(TEST_VENV)/bin/python bench/journal_bench.py compaction --nodes 10000
	$(TEST_VENV)/bin/python bench/agent_bench.py --runs 5

clean:
	rm -rf $(RUN_VENV) $(TEST_VENV) build *.egg-info ctxd-state
	find . -name __pycache__ -prune -exec rm -rf {} +
