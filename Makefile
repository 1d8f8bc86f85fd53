# The README's commands. `make setup` is idempotent: it reinstalls only when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# CPU build that lies on this machine's disk; the cluster image installs a CUDA build instead.
TORCH_SPEC ?= torch==2.13.0
# rfc3987-syntax comes with the jupyter extra (jsonschema[format-nongpl]) and compiles a grammar when it is
# imported, which every Ray process does through jsonschema: the smoke study took 113-118 s with it and
# 68-72 s without on this 2-core machine. Nothing here checks IRI formats; it is removed after each install.
UNWANTED := rfc3987-syntax

.PHONY: setup test test-fast study chaos lab lint lock clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -c requirements.lock -e ".[dev]"
	$(BIN)/python -m pip uninstall --quiet -y $(UNWANTED)
	# the native CPU projection (kernels/cpu_projection.py), compiled once into torch's extension cache
	$(BIN)/python -c "from kernels.cpu_projection import native_module; native_module()"
	# DeepSpeed's shared-memory allreduce op for CPU runs of two or more workers (about 100 s of g++ on 2
	# cores), cached like the projection: otherwise the first such run (or test) pays for it
	$(BIN)/python -c "from infra.distributed import prebuild_cpu_comm_op; prebuild_cpu_comm_op()"
	touch $(STAMP)

# ruff, then DESIGN.md's import layers and the absence of import cycles (contracts in pyproject.toml)
lint: setup
	$(BIN)/ruff check .
	$(BIN)/lint-imports

# The whole suite, slow end-to-end tests included (the README's test command; CI runs it).
test: lint
	$(BIN)/python -m pytest

# Day-to-day: everything but the tests marked slow.
test-fast: lint
	$(BIN)/python -m pytest -m "not slow"

# The main job: the `cpu` study (Ray Tune grid -> trials -> pruning -> MLflow -> report). Run again, it resumes.
study: setup
	$(BIN)/circuitscale study sweeps/cpu.yaml

# The study under fire (benchmarks/chaos.py): the smoke study fault-free, then with 5 faults of each kind
# (worker / driver SIGKILL, MLflow server down, disk full, corrupt shard and checkpoint); root mounts the tmpfs.
chaos: setup
	$(BIN)/python benchmarks/chaos.py --study smoke --seed 0

# JupyterLab (the `jupyter` extra) on 127.0.0.1, opening the analysis notebook on the latest study
# (or on CIRCUITSCALE_STUDY when set).
LAB_PORT ?= 8888
LAB_STAMP := $(VENV)/.installed-jupyter
$(LAB_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -c requirements.lock -e ".[dev,jupyter]"
	$(BIN)/python -m pip uninstall --quiet -y $(UNWANTED)
	touch $(LAB_STAMP)

lab: $(LAB_STAMP)
	study="$${CIRCUITSCALE_STUDY:-$$($(BIN)/python -c 'from analysis.load import latest_study; print(latest_study())')}" \
	  && echo "study: $$study" && CIRCUITSCALE_STUDY="$$study" \
	  $(BIN)/jupyter lab --ip 127.0.0.1 --port $(LAB_PORT) --ServerApp.root_dir="$(CURDIR)" \
	  $$([ "$$(id -u)" = 0 ] && echo --allow-root) analysis/frontier.ipynb

# Re-pin every dependency (after changing pyproject.toml): torch is installed per platform, so not pinned here.
lock: setup
	{ sed -n '1,4p' requirements.lock; $(BIN)/python -m pip freeze --exclude-editable | grep -v '^torch==' \
	  | sed 's#^triton @ .*triton-\([0-9.]*\)-.*#triton==\1#'; } > requirements.lock.new
	mv requirements.lock.new requirements.lock

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
