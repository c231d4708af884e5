# Everything runs inside .venv, which `make setup` creates (tools/install.sh: torch, mmcv built with ops, densevision).
VENV ?= .venv
BIN := $(VENV)/bin
# A sample-data folder for the demo (wsi/CMU-1-Small-Region.svs, geotiff/RGB.byte.tif); empty: the copies the
# package ships (densevision/samples).
DATA ?=
STAMP := $(VENV)/.densevision-ready

.PHONY: setup demo test test-slow lint format typecheck clean bench bench-read

$(STAMP): pyproject.toml tools/install.sh
	bash tools/install.sh
	touch $@

setup: $(STAMP)

# The main job: big images built from the real sample data with planted objects, small models trained on the same
# kind of images (cached in ~/.cache/densevision/demo), the slide segmented and the scene's objects detected tile by
# tile, scored against the planted truth. Outputs and demo_summary.json in outputs/demo/.
demo: setup
	$(BIN)/densevision demo $(if $(DATA),--data $(DATA))

lint: setup
	$(BIN)/ruff check densevision tests tools benchmarks configs
	$(BIN)/ruff format --check densevision tests tools benchmarks configs

typecheck: setup
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/pytest

test-slow: setup
	$(BIN)/pytest -m slow

format: setup
	$(BIN)/ruff format densevision tests tools benchmarks configs
	$(BIN)/ruff check --fix densevision tests tools benchmarks configs

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# Peak memory reading 4k^2 .. 32k^2 (1 gigapixel) generated slides region by region; see benchmarks/README.md.
bench-read: setup
	nice -n 10 $(BIN)/python benchmarks/read_memory.py

# Every comparison in one run (peers installed first; about 1.5 h on 2 cores): benchmarks/BENCHMARKS.md.
bench: setup
	$(BIN)/pip install -q -e ".[dev,bench]"
	$(BIN)/python benchmarks/run_all.py
