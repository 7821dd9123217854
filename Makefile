# One command each: `make run`, `make test`, `make lint`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
CONFIG ?= throttled.dev.toml

.PHONY: run test lint fmt venv demo bench faults clean

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: venv
	$(BIN)/throttled migrate --config $(CONFIG)
	$(BIN)/throttled serve --config $(CONFIG)

demo: venv
	$(BIN)/throttled demo --config $(CONFIG)

test: venv
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The fault suite in full (tests/faults/: more tries and longer outages than `make test`
# runs); its figures go to var/faults.json (docs/reliability.md quotes them).
faults: venv
	THROTTLED_FAULTS=full THROTTLED_FAULTS_REPORT=var/faults.json \
		$(BIN)/python -m pytest -q -p no:cacheprovider tests/faults $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check throttled tests $(wildcard bench)
	$(BIN)/ruff format --check throttled tests $(wildcard bench)
	$(BIN)/mypy

fmt: venv
	$(BIN)/ruff check --fix throttled tests bench
	$(BIN)/ruff format throttled tests bench

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache
