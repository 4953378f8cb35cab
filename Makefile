# enclavekit developer entry points. Only `python3` (>= 3.11) is needed on the machine:
# the first target bootstraps uv into .tools/ and installs the locked environment into .venv/.
PYTHON ?= python3
UV := .tools/bin/uv
export UV_PYTHON_DOWNLOADS := never
export UV_PYTHON := $(shell command -v $(PYTHON))
# Installed packages ship compiled bytecode, as pip installs them: environments that set
# PYTHONDONTWRITEBYTECODE (CI machines often do) would otherwise compile every import in every process.
export UV_COMPILE_BYTECODE := 1
VENV := .venv
BIN := $(VENV)/bin

.PHONY: all venv demo test lint typecheck check bench docs clean

all: check test

$(UV):
	$(PYTHON) -m venv .tools
	.tools/bin/pip install --quiet 'uv>=0.5,<1'

$(BIN)/enclavekit: $(UV) pyproject.toml uv.lock
	$(UV) sync --frozen --all-extras
	$(BIN)/python -m compileall -q src
	@touch $@

venv: $(BIN)/enclavekit

demo: venv
	$(BIN)/enclavekit demo

test: venv
	$(BIN)/pytest -q -p no:cacheprovider

lint: venv
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

typecheck: venv
	$(BIN)/mypy

check: lint typecheck

docs: venv
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir site

# Every benchmark at its default size, each recording its figures in $(BENCH_RESULTS)/<bench>.json (committed,
# so the figures are reviewable); then docs/performance.md and README.md's Performance section are rendered
# from them. A failing bench does not stop the others; `make bench` fails at the end and names it.
BENCH_RESULTS := benchmarks/results

bench: venv
	@mkdir -p $(BENCH_RESULTS); failed=""; \
	for b in benchmarks/bench_*.py; do \
		echo "== $$b"; \
		ENCLAVEKIT_BENCH_RESULTS=$(BENCH_RESULTS) ENCLAVEKIT_BENCH_LOADAVG="$$(cat /proc/loadavg 2>/dev/null)" \
			$(BIN)/python $$b || failed="$$failed $$b"; \
	done; \
	$(BIN)/python benchmarks/report.py --results $(BENCH_RESULTS) || exit 1; \
	if [ -n "$$failed" ]; then echo "make bench: failed:$$failed (their figures may be missing or stale)" >&2; exit 1; fi

clean:
	rm -rf .venv .tools .mypy_cache .ruff_cache build dist site

vm-setup:
	bash scripts/qemu-nitro/setup.sh
