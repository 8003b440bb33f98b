# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install run test bench load sim clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: install
	$(PY) -m service serve $(ARGS)

test: install
	$(PY) -m pytest $(ARGS)

bench: install
	$(PY) bench/paid_vs_free.py $(ARGS)
	$(PY) bench/qa_runs.py

load: install
	$(PY) bench/mixed_load.py $(ARGS)

# The fault simulator: OPS ops (default 10000) of a random SEED, stopped after SECONDS (default 3600).
OPS     ?= 10000
SECONDS ?= 3600
sim: install
	$(PY) -m sim --ops $(OPS) --max-seconds $(SECONDS) $(if $(SEED),--seed $(SEED)) $(ARGS)

clean:
	rm -rf $(VENV) var *.egg-info
