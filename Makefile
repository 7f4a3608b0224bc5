# Two entry points, both safe on a fresh Debian 12 machine:
#   make demo   install what is needed, build the guest image, run the demo in a microVM
#   make test   the same set-up, then the test suite (which boots real microVMs)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test setup system-deps venv image clean

demo: setup
	$(VENV)/bin/smolvm-kernel demo

test: setup
	$(PY) -m pytest tests -rs

setup: system-deps venv image

system-deps:
	./scripts/install-system-deps

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $@

image: venv
	$(VENV)/bin/smolvm-kernel image build --profile base

clean:
	rm -rf $(VENV) build *.egg-info
