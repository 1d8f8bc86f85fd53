# The README's commands. `make setup` is idempotent: it reinstalls only when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# CPU build that lies on this machine's disk; the cluster image installs a CUDA build instead.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup test study lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

lint: setup
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest

# The main job. Until the Ray Tune study lands (issue 8) this runs one trial of the `cpu` preset.
study: setup
	@echo "make study: the Ray Tune grid is not built yet; running one trial of the cpu preset"
	$(BIN)/circuitscale train --config sweeps/configs/cpu.yaml

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
