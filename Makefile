# Two entry points: `make demo` (the whole pipeline on a generated dataset, CPU) and `make test` (the suite).
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python

.PHONY: demo test bench install clean-demo

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --disable-pip-version-check -q -r requirements.txt
	$(VPY) -m pip install --disable-pip-version-check -q --no-deps -e .
	touch $@

demo: $(VENV)/.installed
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash runners/demo.sh

bench: $(VENV)/.installed
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash runners/benchmark.sh

test: $(VENV)/.installed
	$(VPY) -m ruff check --quiet .
	$(VPY) -m ruff format --check --quiet .
	$(VPY) -m pytest -q

# Every output of the demo carries -demo in its run name (EID=demo, or demo-fp32); so does any run of EID *-demo*.
clean-demo:
	[ ! -d experiments ] || find experiments -name '*-demo*' -prune -exec rm -rf {} +
	rm -rf experiments/data/synthetic
