# One venv, two commands: `make up` (set up + run the service) and `make test` (`make lint` + pytest).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch; a loose `torch` requirement would download several GB of CUDA wheels.
TORCH ?= torch==2.13.0

.PHONY: setup redis up test lint format bench clean

$(BIN)/psad: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[train,dev]"
	@touch $@

setup: $(BIN)/psad redis

# redis-server from Debian's packages when missing (root only; otherwise say what to run).
redis:
	@command -v redis-server >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq redis-server; \
	  else echo "redis-server missing: run 'sudo apt-get install -y redis-server' (or set PSAD_REDIS_URL)"; exit 1; fi; }

up: setup
	$(BIN)/psad up

# ruff; the layers of docs/architecture.md (import-linter); the types of the request path and the
# contract (mypy); no block of 6 or more lines repeated in the package code (pylint's duplicate check).
lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/mypy
	$(BIN)/pylint --rcfile pyproject.toml training export service loadtest psad

format:
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: setup lint
	$(BIN)/pytest

bench: setup
	$(BIN)/psad bench model --run runs/demo --out docs/benchmarks-model.md
	$(BIN)/psad bench service --out docs/benchmarks-service.md

clean:
	rm -rf var runs/demo models/psad data/demo
