# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install run test bench load sim clean browser image-test

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	-$(PY) -m pip install -q -e '.[browser]'  # optional: the browser tests skip without it
	touch $(STAMP)

# Headless Chromium for the browser tests (tests/test_browser.py), from the system's packages when apt is
# usable (root, or password-less sudo); otherwise those tests skip and say why.
APT := $(shell if [ "$$(id -u)" = 0 ]; then echo apt-get; elif sudo -n true 2>/dev/null; then echo "sudo apt-get"; fi)
browser:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then :; \
	elif [ -n "$(APT)" ] && command -v apt-get >/dev/null 2>&1; then \
	  $(APT) install -y -q chromium >/dev/null 2>&1 || { $(APT) update -q >/dev/null 2>&1 && $(APT) install -y -q chromium >/dev/null 2>&1; } \
	  || echo "browser tests will skip: apt-get could not install chromium"; \
	else echo "browser tests will skip: no chromium, and apt-get is not usable here"; fi

install: $(STAMP)

run: install
	$(PY) -m service serve $(ARGS)

test: install browser
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

# Build the Dockerfile with buildah (base image made locally by debootstrap) and run it against a private
# Redis: /healthz, a 402, a paid call, uid 10001, clean SIGTERM. Prints SKIP where the tools cannot be had.
image-test: install
	$(PY) .ci/image_test.py

clean:
	rm -rf $(VENV) var *.egg-info
