# clado-supervisor — developer entry points. `make test` works on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
LINT_STAMP := $(VENV)/.lint-installed

.PHONY: install test test-httpx demo run bench lint lint-report clean

install: $(STAMP)

# The test extra (which brings [postgres]) at the versions of requirements/constraints.txt,
# the same pins the Docker image installs.
CONSTRAINTS := requirements/constraints.txt

$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --constraint $(CONSTRAINTS) -e ".[test]"
	touch $(STAMP)

# The whole suite on the default API transport (aiohttp), then the daemon's chaos and fault
# suites again on httpx's own (`test-httpx`); both run even when the first fails.
test: install
	@status=0; \
	echo "== make test: the whole suite, API transport aiohttp (the default)"; \
	CLADO_SUPERVISOR_TEST_TRANSPORT=aiohttp $(BIN)/python -m pytest || status=1; \
	$(MAKE) --no-print-directory test-httpx || status=1; \
	exit $$status

# The second pass, on api.transport = "httpx" (tests/conftest.py's config builder writes it from
# CLADO_SUPERVISOR_TEST_TRANSPORT; tests/acceptance/test_transport_switch.py fails if the daemon
# under test is on another). Only the suites whose outcome the transport can change: API faults
# (5xx, 429, garbage, dropped connections, answers slower than the timeout), daemons killed with
# requests in flight, initiates whose answer is lost (orphaned), slow answers against leases, and
# the secrets scan (a transport's error text could carry a header). Left out, because no request
# of theirs reaches the API transport: bad job ids (refused before any request), the
# api_key_env echo check (a config error) and signed webhooks (their own client). The client's
# and the simulator's suites are parametrized over both transports in the first pass already.
# Measured: 5 min 48 s (27 tests) on this 2-core machine while other work ran, next to the
# first pass's 12 minutes in CI.
HTTPX_SUITES := \
	tests/acceptance/test_transport_switch.py \
	tests/acceptance/test_fault_injection.py \
	tests/acceptance/test_crash_safety.py \
	tests/acceptance/test_slow_clients.py \
	tests/acceptance/test_orphaned_submit.py \
	tests/acceptance/test_queue_cli.py::test_an_orphaned_submission_shows_in_jobs_list_on_a_terminal \
	tests/integration/test_real_api_lifecycle.py \
	tests/integration/test_db_outage.py \
	tests/integration/test_daemon_scenario.py \
	tests/integration/test_queue.py \
	tests/integration/test_continue.py \
	tests/integration/test_replicas.py::test_slow_api_calls_keep_their_lease_and_cancel_once
HTTPX_LEFT_OUT := \
	tests/acceptance/test_fault_injection.py::test_bad_job_ids_are_rejected_before_any_request \
	tests/acceptance/test_fault_injection.py::test_an_api_key_pasted_into_api_key_env_is_not_echoed \
	tests/acceptance/test_fault_injection.py::test_a_webhook_configured_with_a_secret_is_never_sent_unsigned

test-httpx: install
	@echo "== make test-httpx: the daemon's chaos and fault suites, API transport httpx"
	CLADO_SUPERVISOR_TEST_TRANSPORT=httpx $(BIN)/python -m pytest $(HTTPX_SUITES) $(addprefix --deselect ,$(HTTPX_LEFT_OUT))

demo: install
	$(BIN)/clado-supervisor demo

run: install
	$(BIN)/clado-supervisor run

bench: install
	$(BIN)/pip install --quiet -e ".[bench]"
	$(BIN)/python -m bench

# The memory soak (bench/soak.py): 5,000 jobs polled every 5 s for 30 minutes, the RSS slope
# printed next to the simulator's; `make bench-soak QUICK=1` runs 5 minutes.
.PHONY: bench-soak
bench-soak: install
	$(BIN)/python -m bench.soak $(if $(QUICK),--quick)

# The linters alone (the `lint` extra), so `make lint` needs no test dependencies.
$(LINT_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[lint]"
	touch $(LINT_STAMP)

# Every check runs even when an earlier one fails, so one run shows all that is wrong.
lint: $(LINT_STAMP)
	@status=0; \
	$(BIN)/ruff check . || status=1; \
	$(BIN)/ruff format --check . || status=1; \
	$(BIN)/mypy supervisor || status=1; \
	$(BIN)/lint-imports || status=1; \
	exit $$status

# Where the code stands: ruff and mypy findings per file, and the import contracts. Never fails.
lint-report: $(LINT_STAMP)
	@echo "ruff check (findings per file):"
	@$(BIN)/ruff check --output-format concise --quiet . | cut -d: -f1 | sort | uniq -c | sort -rn || true
	@echo "ruff format (files it would change):"
	@$(BIN)/ruff format --check --output-format concise . 2>/dev/null | sed -n 's/^\([^:]*\):.*unformatted.*/      \1/p' || true
	@echo "mypy supervisor (errors per file):"
	@$(BIN)/mypy supervisor | grep -oE '^[^:]+\.py(:[0-9]+: error)' | cut -d: -f1 | sort | uniq -c | sort -rn || true
	@$(BIN)/lint-imports | sed -n '/^Contracts:/p;/ BROKEN$$/p' || true

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .import_linter_cache

# The web console's pictures in README (docs/console-*.png), taken by the browser tests in a
# headless Chromium (Debian's chromium + chromium-driver) against the daemon and the simulator.
.PHONY: screenshots
screenshots: install
	CLADO_CONSOLE_SCREENSHOTS=$(CURDIR)/docs $(BIN)/python -m pytest tests/browser -k screenshots -q -p no:cacheprovider
