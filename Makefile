# Two entry points: `make run` (the main job) and `make test` (the test suite). Each creates
# .venv and installs what it needs, once (re-installs when the requirements change).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test bench clean-venv

$(STAMP): pyproject.toml requirements-cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-cpu.txt
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

run: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m lightning_mpipemoe.recipes.finetune

# pytest's exit code 5 (no test collected) is a failure too.
test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; fi; exit $$rc

BENCH_STAMP := $(VENV)/.installed-bench

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e ".[test,bench]"
	touch $(BENCH_STAMP)

# The side-by-side benchmark suite (every system of a comparison interleaved in one process launch,
# ~15 min on 2 quiet cores, < 20): regenerates benchmarks/RESULTS.md, benchmarks/plots/*.png and
# benchmarks/results/suite.{json,csv}. BENCH_ARGS=--quick for a smoke run (results under
# benchmarks/results/quick/); BENCH_ARGS="--out-dir DIR" to keep the committed results as they are.
bench: $(BENCH_STAMP)
	OMP_NUM_THREADS=1 $(PY) benchmarks/suite.py $(BENCH_ARGS)

clean-venv:
	rm -rf $(VENV)
