"""Nothing is left behind by many VMs: benchmarks/leak_cycles.py with a small count.

The benchmark runs 100 of each (README, SECURITY.md); CI runs 5, which is
enough to see a per-cycle leak of a process, a file, a registry row or a
file descriptor.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "leak_cycles.py"


def test_start_stop_restart_and_reset_cycles_leave_nothing(kernelspec, tmp_path):
    # A state folder of its own: the session's shared VMs are not this run's.
    env = {**os.environ, "SMOLVM_STATE_DIR": str(tmp_path / "state")}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--cycles", "5", "--restarts", "5"],
                          capture_output=True, text=True, env=env, timeout=600)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| 5 ")]
    assert len(rows) == 20, proc.stdout       # the table has every count, for all three runs
    assert all(f"'{what}': 0" in proc.stdout for what in ("QEMU processes", "zombie QEMU processes", "VM registry rows",
                                                         "VM cgroups"))
