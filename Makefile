# The two entry points a new user needs (see README): `make run` and `make test`.
# Both create/update .venv and install genbench with constraints.txt first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.genbench-installed
SUITE  ?= quick
OUT    ?= results/$(SUITE)
ARGS   ?=
# make bench fails when a benchmark's mean is this much slower than the saved baseline.
BENCH_FAIL    ?= mean:25%
BENCH_STORAGE := file://benchmarks/baselines

.PHONY: run test test-slow bench bench-save lint typecheck install clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/genbench run --suite $(SUITE) --out $(OUT) $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(ARGS)

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow $(ARGS)

bench: $(STAMP)
	$(BIN)/python -m pytest -q -m benchmark --benchmark-enable \
	  --benchmark-storage=$(BENCH_STORAGE) --benchmark-compare \
	  --benchmark-compare-fail=$(BENCH_FAIL) $(ARGS)

# Save the current timings as the baseline `make bench` compares against (on a quiet machine).
bench-save: $(STAMP)
	$(BIN)/python -m pytest -q -m benchmark --benchmark-enable \
	  --benchmark-storage=$(BENCH_STORAGE) --benchmark-save=baseline $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check benchmark defenses attacks threat_models tests
	$(BIN)/mypy benchmark defenses attacks threat_models
	$(BIN)/mypy --strict benchmark/api benchmark/plugins

clean:
	rm -rf $(VENV) results/quick results/digits .pytest_cache
