# atlasflow: `make demo` runs the demo cohort end to end, `make test` runs the test suite.
# Both create .venv and install everything on first use (CPU build of torch via constraints.txt).

PYTHON ?= python3
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
STAMP := $(VENV)/.installed
CORES ?= all
export PATH := $(BIN):$(PATH)

.PHONY: install demo test test-fast lint system-deps clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

system-deps:
	bash scripts/install-system-deps.sh

demo: $(STAMP)
	$(BIN)/snakemake --profile profiles/default --cores $(CORES)
	@echo ""
	@echo "atlasflow demo finished. Results: $(CURDIR)/results"
	@test ! -f results/reports/cohort.html || echo "Cohort report: $(CURDIR)/results/reports/cohort.html"

# Two workers: the SLURM test (mostly waiting on its queue) runs beside the others.
TEST_WORKERS ?= 2

test: $(STAMP) system-deps
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadgroup

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/snakemake --lint

clean:
	rm -rf results demo_data .snakemake
