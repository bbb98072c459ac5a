# The two commands of the README: `make bench` (the main job) and `make test`.
# Each creates .venv and installs envfleet into it on first use.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: bench test install clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

bench: install
	$(BIN)/rollout bench --env openspiel --game catch --n 256 --backend local --seconds 10

test: install
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) .pytest_cache artifacts loadtests/out
