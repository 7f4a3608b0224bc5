"""Shared test set-up: each session gets its own private state directory."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest


_created: list[str] = []


def pytest_configure(config):
    # VMs, sockets and the registry of this test run live apart from the
    # user's own; the image cache is shared (it is content-addressed).
    if "SMOLVM_STATE_DIR" not in os.environ:
        os.environ["SMOLVM_STATE_DIR"] = tempfile.mkdtemp(prefix="smolvm-test-state-")
        _created.append(os.environ["SMOLVM_STATE_DIR"])
    # The kernelspecs under test are installed into a private Jupyter path.
    jupyter = tempfile.mkdtemp(prefix="smolvm-test-jupyter-")
    _created.append(jupyter)
    os.environ["JUPYTER_PATH"] = os.path.join(jupyter, "share", "jupyter")
    os.environ["SMOLVM_TEST_PREFIX"] = jupyter


def pytest_unconfigure(config):
    for path in _created:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def state_dir() -> str:
    return os.environ["SMOLVM_STATE_DIR"]
