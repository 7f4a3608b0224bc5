"""Boot a real Firecracker microVM through the Sandbox and run one cell."""

from __future__ import annotations

import os

import pytest

from smolvm_kernel.backends.firecracker import firecracker_available

pytestmark = pytest.mark.vm


def test_firecracker_sandbox_runs_a_cell() -> None:
    binary = os.environ.get("SMOLVM_FIRECRACKER") or "firecracker"
    ok, why = firecracker_available(binary)
    if not ok:
        pytest.skip(f"Firecracker backend unavailable: {why}")
    # Imported here: a broken sandbox.py must not stop the skip above from being reported.
    from smolvm_kernel.vm.sandbox import Sandbox

    with Sandbox(backend="firecracker", firecracker_path=binary, vcpus=1, mem_mib=512) as sb:
        assert sb.backend is not None and sb.backend.name == "firecracker"
        outputs = list(sb.execute("6*7"))
    results = [o.text for o in outputs if o.type == "execute_result"]
    errors = [o.text for o in outputs if o.type == "error"]
    assert results == ["42"], f"outputs: {outputs}; errors: {errors}"
