# One command to use it, one to test it (README). Everything installs into .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test lint browsers serve demo bench toyworld toy-bundle openapi compose-check clean

install: $(STAMP)

# torch is installed first with its exact pin (a CPU build lies on disk here; an unpinned
# torch would pull a multi-GB CUDA build). open-clip-torch comes without its dependencies:
# only its BPE vocabulary file is used.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[service,dev,eval]'
	$(BIN)/pip install -q --no-deps open-clip-torch
	touch $@

lint: install
	$(BIN)/ruff check .

test: install lint browsers
	$(BIN)/python -m pytest -q

# The web page's browser tests drive Debian's Chromium (never a browser Playwright downloads).
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
browsers:
	@test -x /usr/bin/chromium || \
	  { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium; }

# One command to use it: embedded queue server + API + one worker on the shipped toy
# pipeline and bundle; prints the URL. Set REDIS_URL to use a Redis server (API only).
serve: install
	$(BIN)/steer serve

# Regenerate openapi/openapi.json from the app (a test fails when it drifts).
openapi: install
	$(BIN)/steer openapi

# Validate docker-compose.yml (needs the docker compose plugin or docker-compose).
compose-check:
	STEER_URL_SIGNING_SECRET=x STEER_WEBHOOK_SECRET=x sh -c 'docker compose config -q 2>/dev/null || docker-compose config -q'

# Generate with the shipped toy pipeline, no service (see README).
demo: install
	$(BIN)/steer generate --prompt "a red circle on a striped background" --n-images 8 --out out/demo

# Benchmarks print one JSON line each and write bench/results/ (ratios measured side by side).
bench: install
	$(BIN)/python bench/steering_overhead.py
	$(BIN)/python bench/translate_delta.py
	$(BIN)/python bench/fit_swap_memory.py
	$(BIN)/python bench/bundle_scale.py
	$(BIN)/python bench/collection_throughput.py
	$(BIN)/python bench/loader_throughput.py
	$(BIN)/python bench/sae_training_vs_sparsify.py
	$(BIN)/python bench/training_memory.py
	$(BIN)/python bench/service_submit.py
	$(BIN)/python bench/service_e2e_latency.py
	$(BIN)/python bench/worker_rss.py
	$(BIN)/python bench/worker_throughput.py

# Rebuild assets/ from scratch (about an hour on 2 CPU cores; rerun to resume).
toyworld: install
	$(BIN)/steer toyworld build --out assets --work-dir toyworld-build

# Rebuild assets/toy-bundle with the training chain (about 30 min on 2 CPU cores; resumes).
toy-bundle: install
	$(BIN)/steer toyworld bundle --out assets/toy-bundle --work-dir toyworld-build/bundle

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache out
