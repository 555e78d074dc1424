# Two commands set everything up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
OUT    ?= runs/world

.PHONY: install run world test test-e2e lint clean deploy bench world-bench bench-scale

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

## The main job: the whole pipeline on the `world` preset (the shipped trained world models; CPU, no
## server, no downloads), then verify. PRESET=tiny runs the random-weight plumbing preset instead.
PRESET ?= world
run: $(STAMP)
	$(VENV)/bin/synth-ood run --preset $(PRESET) --out $(OUT)
	$(VENV)/bin/synth-ood verify $(OUT)

## Train every world model from scratch (seeded) into ood_core/world/weights; skips what is up to date.
world: $(STAMP)
	$(VENV)/bin/synth-ood world build $(if $(ONLY),--only $(ONLY)) $(if $(FORCE),--force)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

## The long end-to-end runs on a live Prefect server with several workers (not in `make test`: ~12 min).
test-e2e: $(STAMP)
	$(PY) -m pytest -q -m e2e

## Generation throughput, batch 1 vs batch B (tiny models on the CPU; real-size SD-2 on a GPU if one is visible).
bench: $(STAMP)
	$(PY) benchmarks/generate_bench.py

world-bench: $(STAMP)
	$(PY) benchmarks/world_bench.py

## ImageNet-scale bookkeeping on a hard-linked tree (CLASSES x PER_CLASS files), one line per part.
CLASSES ?= 1000
PER_CLASS ?= 1300
bench-scale: $(STAMP)
	$(PY) benchmarks/scale.py --classes $(CLASSES) --per-class $(PER_CLASS)

## Create the work pools from deploy/work-pools/*.json and register deploy/prefect.yaml (needs PREFECT_API_URL).
deploy: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" deploy/deploy.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs .pytest_cache
