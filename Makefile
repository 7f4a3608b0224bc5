# Two entry points, both safe on a fresh Debian 12 machine:
#   make demo   install what is needed, build the guest image, run the demo in a microVM
#   make test   the same set-up, then the test suite (which boots real microVMs)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test setup system-deps venv image clean

demo: setup
	$(VENV)/bin/smolvm-kernel demo notebooks/demo.ipynb

test: SYSTEM_DEPS_ARGS := --test
test: setup
	$(PY) -m pytest tests -rs

setup: system-deps venv image

system-deps:
	./scripts/install-system-deps $(SYSTEM_DEPS_ARGS)

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $@

# Builds (or reuses, by content hash) both images and registers the
# smolvm-python and smolvm-scipy kernelspecs in the venv.
image: venv
	$(VENV)/bin/smolvm-kernel setup --profile base --profile scipy

clean:
	rm -rf $(VENV) build *.egg-info
