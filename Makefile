# The three commands a newcomer needs: make race, make test, make lint (make test-fast for the
# edit loop).
# Each bootstraps .venv on first use (Python 3.11+ required).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: race test test-fast lint load bench chaos baseline clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "payrace needs Python 3.11+; set PYTHON=python3.11 (found " + sys.version.split()[0] + ")")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

race: $(STAMP)
	$(BIN)/payrace race

# Two pytest workers (pytest-xdist), a test file to a worker so a module's fixtures (a Locust
# run, a virtualenv) are made once. Much of the suite waits rather than computes (a running
# target's deadlock count settling, Locust windows, processes starting), so two workers
# overlap the waits even on 2 cores: 1.4-2.3x faster per directory on a shared 2-core machine,
# every test passing (docs/benchmarks.md, "The test suite"). Four workers, not one per core:
# at -n 2 the workers kept the 2 cores only about half busy (345 s of CPU in a 370 s run),
# so two more overlap the remaining waits: 370 -> 238 s for the whole suite, back to back on
# the same 2-core machine, CI=true, every test passing. A fifth worker fills the rest: 184.5,
# 183.7 s with four against 176.0, 173.7 s with five, alternated on the same quiet 2-core
# machine (2026-12-01; six were slower, 210 s: each worker collects the whole suite and
# starts its own PostgreSQL). PYTEST_WORKERS=0 runs one process; auto one worker per core.
PYTEST_WORKERS ?= 5
PYTEST_SPLIT   := --dist loadfile --no-loadscope-reorder
PYTEST_DIST    := -n $(PYTEST_WORKERS) $(PYTEST_SPLIT)
# The fast set waits less, so it keeps four: 54.8, 54.2 s against 59.2, 54.9 s with five
# (alternated, the same machine and day).
PYTEST_FAST_WORKERS ?= 4

# pytest rewrites the asserts of every module it imports from a distribution that has a
# pytest plugin (payrace, schemathesis, hypothesis, anyio: about 490 modules) and caches the
# result beside the bytecode, unless PYTHONDONTWRITEBYTECODE is set: then each worker redid
# what it imported before tests/conftest.py turns writing back on (a collection 3.7 s, 2.4 s
# once all is cached). And in a new virtualenv the workers all built that cache at once (7.2 s
# each): the first run collects once, alone, so they start from it.
PYTEST := PYTHONDONTWRITEBYTECODE= $(BIN)/pytest
WARM   := $(VENV)/.collected-stamp

$(WARM): $(STAMP)
	@echo "pytest: caching the rewritten modules once (first run in this virtualenv)"
	@$(PYTEST) --collect-only -q -p no:cacheprovider > /dev/null || true
	@touch $(WARM)

test: $(STAMP) $(WARM)
	$(PYTEST) -rs $(PYTEST_DIST)

# The edit loop: everything but the tests marked slow (processes, Locust, virtualenvs).
test-fast: $(STAMP) $(WARM)
	$(PYTEST) -rs -m "not slow" -n $(PYTEST_FAST_WORKERS) $(PYTEST_SPLIT)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

load: $(STAMP)
	$(BIN)/payrace load

# What the service and the harness cost on this machine (docs/benchmarks.md): a few minutes.
bench: $(STAMP)
	$(BIN)/payrace bench

# Every fault of the nemesis on for_update and naive; rewrites the README's chaos table.
chaos: $(STAMP)
	$(BIN)/payrace chaos --readme README.md

# The figures `--gate 'lock_p99_ms<=1.5*baseline'` compares with (README "Gates in CI"): run it
# on the runner class that will be gated and commit the file; written only when the run is valid.
BASELINE      ?= payrace-baseline.json
BASELINE_ARGS ?= --strategy for_update --mode forced --trials 1000
baseline: $(STAMP)
	$(BIN)/payrace run $(BASELINE_ARGS) --quiet --write-baseline $(BASELINE)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
	find reports -mindepth 1 ! -name README.md -exec rm -rf {} +
