# clado-supervisor — developer entry points. `make test` works on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
LINT_STAMP := $(VENV)/.lint-installed

.PHONY: install test demo run bench lint lint-report clean

install: $(STAMP)

# The test extra (which brings [postgres]) at the versions of requirements/constraints.txt,
# the same pins the Docker image installs.
CONSTRAINTS := requirements/constraints.txt

$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --constraint $(CONSTRAINTS) -e ".[test]"
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest

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
