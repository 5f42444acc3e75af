# The two set-up commands on a fresh machine (see README):
#   make demo   runs the main job on the embedded default (offline, CPU; about 40 minutes on 2 cores)
#   make test   installs everything and runs the whole test suite, slow tests included
# Then `make ui` (Dagster) and `make mlflow-ui` (MLflow) open the UIs on what the main job wrote.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo ui mlflow-ui team-mlflow browser test test-fast lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, from the CPU wheel: a plain `torch` requirement could pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# curvlinops is a test-only peer check; its backpack dependency would replace torch, so no deps.
	$(BIN)/pip install -q --no-deps curvlinops-for-pytorch==3.0.1 einconv unfoldNd
	$(BIN)/pip install -q einops linear_operator opt-einsum
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	@echo "The main job on $${MEMKFAC_CONFIG:-configs/default.yaml}: about 40 minutes on a 2-core CPU for the default (configs/full.yaml: about 80)."
	@echo "Ctrl-C stops it; the same command resumes. Then: make ui, make mlflow-ui."
	$(BIN)/python -m jobs.main

# The UIs read what the main job wrote; pass them the same MEMKFAC_HOME / MEMKFAC_CONFIG / DAGSTER_HOME.
ui: $(STAMP)
	$(BIN)/python -m jobs.ui dagster

mlflow-ui: $(STAMP)
	$(BIN)/python -m jobs.ui mlflow

# The team's MLflow server on PostgreSQL (MLFLOW_PG_URL, MLFLOW_ARTIFACTS, MLFLOW_PORT: see the script).
team-mlflow: $(STAMP)
	PYTHON=$(BIN)/python scripts/team-mlflow-server.sh

# Debian's chromium, for the UI browser test (tests/dagster/test_dagster_ui_browser.py), which skips
# and says why when no browser starts. Installs only as root with apt-get (CI); else says what to run.
browser:
	@if command -v chromium >/dev/null; then echo "chromium: $$(command -v chromium)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	    || echo "could not install chromium: the UI browser test will be skipped"; \
	else echo "no chromium: 'sudo apt-get install chromium' enables the UI browser test"; fi

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/dagster definitions validate -w workspace.yaml
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Each benchmark prints a table and writes bench/results/<name>.json; see README "Benchmarks", results in docs/results.md.
BENCHES := bench_factors bench_selection bench_edit_model bench_generation bench_downstream bench_baselines
bench: $(STAMP)
	for b in $(BENCHES); do $(BIN)/python bench/$$b.py || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache dbt_reports/target
