# Every target sets itself up: a fresh clone needs nothing but `make train` or `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup train test test-slow test-all chaos-test chaos-test-ranks chaos-test-remote bench bench-quality lint clean

setup: $(STAMP)

# Re-install when pyproject.toml changes. pip takes torch 2.14.1 / torchvision 0.29.1 from the
# machine's local wheels; uv and poetry do not see them, so plain pip it is.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]' 2>&1 | grep -v "is ignored: it is neither" || true
	@$(PY) -c "import resilient_train, magvit2_pytorch, hydra, safetensors" || (echo "set-up failed: see pip output above" >&2; exit 1)
	@touch $(STAMP)

train: $(STAMP)
	$(PY) train.py +experiment=magvit64

test: $(STAMP)
	$(PY) -m pytest -m "not slow and not gpu" -q

test-slow: $(STAMP)
	$(PY) -m pytest -m "slow and not gpu" -q

test-all: $(STAMP)
	$(PY) -m pytest -m "not gpu" -q

chaos-test: $(STAMP)
	$(PY) scripts/chaos_test.py

# The same proof with 2 ranks under torchrun (one thread per rank).
chaos-test-ranks: $(STAMP)
	$(PY) scripts/chaos_test.py --nproc 2

# The proof with an object store (a local S3 server, moto): uploads, kills during an upload, and node
# losses (the run directory deleted) that must resume from the store.
chaos-test-remote: $(STAMP)
	$(PY) scripts/chaos_test.py --remote

bench: $(STAMP)
	$(PY) -m benchmarks

# Training quality against an outside reference: our loop and magvit2-pytorch's own VideoTokenizerTrainer on the
# same clips, initial weights, batch, LR and steps, judged by one metric code on held-out clips (benchmarks.quality).
bench-quality: $(STAMP)
	$(PY) -m benchmarks.quality

lint: $(STAMP)
	$(PY) -m ruff check src tests scripts benchmarks train.py
	$(PY) -m ruff format --check src tests scripts benchmarks train.py

clean:
	rm -rf outputs .pytest_cache
