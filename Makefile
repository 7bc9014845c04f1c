# The front door. `make bench` and `make test` set up everything they need.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# arq's modes run in a venv of their own: arq 0.28 pins redis-py < 6, Celery needs >= 6.4.
# The harness starts those modes' servers and workers with its python (servers.modes).
ARQ_VENV  ?= .venv-arq
ARQ_STAMP := $(ARQ_VENV)/.installed

.PHONY: install bench bench-full bench-frameworks test test-lowest lint format services-up services-down clean bench-ci microbench

install: $(STAMP) $(ARQ_STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,frameworks]'
	touch $(STAMP)

$(ARQ_STAMP): pyproject.toml
	$(PYTHON) -m venv $(ARQ_VENV)
	$(ARQ_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(ARQ_VENV)/bin/python -m pip install --quiet -e '.[arq]'
	touch $(ARQ_STAMP)

bench: install
	$(BIN)/mailbench run --profile quick

bench-full: install
	$(BIN)/mailbench run --profile full

# The task-queue frameworks beside the reference queues on the same brokers (SQLite: huey's;
# PostgreSQL: Procrastinate's).
bench-frameworks: install
	$(BIN)/mailbench run --profile quick --modes frameworks,redis,rabbitmq,sqlite,postgres

test: install
	$(BIN)/python -m pytest --durations=25

# The unit tests against the lowest versions pyproject.toml allows (uv's lowest-direct
# resolution: each direct dependency at its floor), in a venv of their own: a floor below
# what the code uses fails here rather than on a user's machine.
LOWEST ?= .venv-lowest
test-lowest:
	$(PYTHON) -m venv $(LOWEST)
	$(LOWEST)/bin/python -m pip install --quiet --upgrade pip uv
	$(LOWEST)/bin/uv pip install --quiet --python $(LOWEST)/bin/python \
		--resolution lowest-direct -e '.[dev,frameworks]'
	$(LOWEST)/bin/python -m pytest -p no:cacheprovider tests/unit

# The CI gate: baseline and candidate measured side by side now, then `mailbench compare`.
# BASELINE_COMMIT=<ref> measures that commit from a git worktree; BASELINE_DIR=<dirs>
# compares with folders measured before; by default both sides are this checkout.
# Writes results/ci/compare.md and results/ci/benchmark.json; exits 1 on a regression.
bench-ci: install
	$(BIN)/mailbench bench-ci \
		$(if $(BASELINE_COMMIT),--baseline-commit $(BASELINE_COMMIT)) \
		$(if $(BASELINE_DIR),--baseline-dir $(BASELINE_DIR)) $(BENCH_CI_ARGS)

# Micro-benchmarks of the hot paths, saved under .benchmarks/; once a previous run is
# saved, one slower than it by MICROBENCH_FAIL fails. A single comparison on a shared
# machine is noisy (broker enqueues swing by 30-40%): min:25% is the steadier choice.
MICROBENCH_FAIL ?= mean:25%
microbench: install
	$(BIN)/python -m pytest tests/microbench --benchmark-enable --benchmark-autosave \
		--benchmark-columns=min,median,mean,stddev,rounds \
		$(if $(wildcard .benchmarks/*/[0-9][0-9][0-9][0-9]_*.json),--benchmark-compare --benchmark-compare-fail=$(MICROBENCH_FAIL)) \
		-W ignore::pytest_benchmark.logger.PytestBenchmarkWarning

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

services-up: install
	$(BIN)/mailbench services up

services-down: install
	$(BIN)/mailbench services down

clean:
	rm -rf $(VENV) $(ARQ_VENV) $(LOWEST) build *.egg-info .pytest_cache .mypy_cache .ruff_cache .benchmarks
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
