# Two commands on a fresh machine: `make demo` (the main job end to end) and `make test`.
# Each creates .venv and installs the pinned stack (requirements.lock) the first time.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export GX_ANALYTICS_ENABLED := False
export RAY_USAGE_STATS_ENABLED := 0
export PYTHONUNBUFFERED := 1

.PHONY: setup demo test lint bench lock clean rehearse

setup: $(STAMP)

# torch first: its CPU build comes from local disk; the lock then pins everything else.
$(STAMP): requirements.lock pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q --no-deps -e .
	@# GX's Data Docs templates, compiled once per machine (ingest.gx_template_cache), as pip compiled bytecode.
	$(BIN)/python -m ingestion.expectations --compile-templates
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m ray_jobs.demo $(DEMO_ARGS)

# The cluster path on this machine: S3 and Redis servers, a 3-node Ray, every stage via `ray job submit`
# (ray_jobs/rehearsal.py); writes bench/results/rehearsal.json.
rehearse: $(STAMP)
	@command -v redis-server >/dev/null || (apt-get update -qq && apt-get install -y -qq redis-server >/dev/null) \
		|| { echo "the rehearsal needs redis-server: apt-get install redis-server"; exit 1; }
	$(BIN)/python -m ray_jobs.rehearsal $(REHEARSE_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP) lint
	@# The Redis tests need a real redis-server (Debian's); install it where it is missing (CI runs as root).
	@command -v redis-server >/dev/null || (apt-get update -qq && apt-get install -y -qq redis-server >/dev/null) \
		|| { echo "redis-server is required by the tests: apt-get install redis-server"; exit 1; }
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# Every benchmark, one after another (many hours on 2 cores); each line also runs alone (BENCHMARKS.md).
bench: $(STAMP)
	$(BIN)/python -m bench.ingest
	$(BIN)/python -m bench.models
	$(BIN)/python -m bench.features
	$(BIN)/python -m bench.crash --stage features
	$(BIN)/python -m bench.crash --stage samples
	$(BIN)/python -m bench.quality_retrieval --dataset ml-1m
	$(BIN)/python -m bench.quality --dataset all
	$(BIN)/python -m bench.oracle_terms
	$(BIN)/python -m bench.train_fault --lake data/bench/quality/ml-100k/lake --model dlrm --kill-after 60 --every 25 \
		--set training.batch_size=32 --set training.max_hist_len=64
	$(BIN)/python -m bench.retrieval --dataset all
	$(BIN)/python -m bench.decoders
	test -d data/demo/artifacts/retriever || $(BIN)/python -m ray_jobs.demo
	$(BIN)/python -m bench.serve
	$(BIN)/python -m bench.hostile

# Re-freeze the pins from the current venv (after changing pyproject.toml's direct needs), and the image's
# runtime subset (requirements.runtime.lock: no test or lint tools).
lock: $(STAMP)
	{ head -2 requirements.lock; $(BIN)/pip freeze --exclude-editable | sed 's/^torch==\(.*\)+cpu/torch==\1/'; } > requirements.lock.new
	mv requirements.lock.new requirements.lock
	$(BIN)/python infra/runtime_lock.py

clean:
	rm -rf data .pytest_cache
