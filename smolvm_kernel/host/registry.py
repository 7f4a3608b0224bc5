"""The SQLite registry of live VMs, and the cleanup of what dead owners left.

Every VM is recorded before its VMM starts, with the owner's pid and start
time (pids are reused; the pair is not), so ``smolvm-kernel cleanup`` can
tell a live owner from a dead one and remove exactly what the dead left.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import sqlite3
import time
from pathlib import Path

from smolvm_kernel import paths
from smolvm_kernel.host.db import transaction
from smolvm_kernel.host.procs import process_alive, process_start_time

_SCHEMA = """
CREATE TABLE IF NOT EXISTS vms (
    vm_id TEXT PRIMARY KEY,
    backend TEXT NOT NULL,
    accel TEXT NOT NULL,
    profile TEXT NOT NULL,
    run_dir TEXT NOT NULL,
    owner_pid INTEGER NOT NULL,
    owner_start INTEGER NOT NULL,
    vmm_pid INTEGER,
    vmm_start INTEGER,
    vcpus INTEGER,
    mem_mib INTEGER,
    created REAL NOT NULL,
    extra TEXT NOT NULL DEFAULT '{}'
)
"""


@dataclasses.dataclass
class VMRecord:
    vm_id: str
    backend: str
    accel: str
    profile: str
    run_dir: str
    owner_pid: int
    owner_start: int
    vmm_pid: int | None = None
    vmm_start: int | None = None
    vcpus: int | None = None
    mem_mib: int | None = None
    created: float = dataclasses.field(default_factory=time.time)
    extra: str = "{}"

    @property
    def owner_alive(self) -> bool:
        return process_alive(self.owner_pid, self.owner_start)

    @property
    def vmm_alive(self) -> bool:
        return process_alive(self.vmm_pid, self.vmm_start)


class Registry:
    """Live VMs of this user, in ``<state>/vms.db``; safe across processes."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = paths.private_dir(root or paths.state_dir())
        self.db_path = self.root / "vms.db"
        self.vms_dir = paths.private_dir(self.root / "vms")

    def _db(self):
        return transaction(self.db_path, _SCHEMA)

    def new_run_dir(self, vm_id: str) -> Path:
        path = self.vms_dir / vm_id
        path.mkdir(mode=0o700)  # fails if it exists: ids never collide silently
        return path

    def add(self, rec: VMRecord) -> None:
        fields = dataclasses.asdict(rec)
        with self._db() as con:
            con.execute(f"INSERT INTO vms ({', '.join(fields)}) VALUES "
                        f"({', '.join('?' * len(fields))})", list(fields.values()))

    def set_vmm(self, vm_id: str, pid: int) -> None:
        with self._db() as con:
            con.execute("UPDATE vms SET vmm_pid=?, vmm_start=? WHERE vm_id=?",
                        (pid, process_start_time(pid), vm_id))

    def set_extra(self, vm_id: str, **values) -> None:
        with self._db() as con:
            row = con.execute("SELECT extra FROM vms WHERE vm_id=?", (vm_id,)).fetchone()
            if row:
                extra = {**json.loads(row[0]), **values}
                con.execute("UPDATE vms SET extra=? WHERE vm_id=?", (json.dumps(extra), vm_id))

    def remove(self, vm_id: str) -> None:
        with self._db() as con:
            con.execute("DELETE FROM vms WHERE vm_id=?", (vm_id,))

    def has(self, vm_id: str) -> bool:
        with self._db() as con:
            return con.execute("SELECT 1 FROM vms WHERE vm_id=?", (vm_id,)).fetchone() is not None

    def list(self) -> list[VMRecord]:
        with self._db() as con:
            con.row_factory = sqlite3.Row
            rows = con.execute("SELECT * FROM vms ORDER BY created").fetchall()
        return [VMRecord(**dict(r)) for r in rows]

    def cleanup(self, everything: bool = False) -> list[str]:
        """Kill and remove VMs whose owner died (all of them with ``everything``).

        Returns a line per thing removed. Running it twice removes nothing the
        second time.
        """
        done: list[str] = []
        known = set()
        for rec in self.list():
            known.add(rec.vm_id)
            if rec.owner_alive and not everything:
                continue
            if rec.vmm_alive:
                try:
                    os.kill(rec.vmm_pid, signal.SIGKILL)
                    done.append(f"killed {rec.backend} pid {rec.vmm_pid} of VM {rec.vm_id}")
                except ProcessLookupError:
                    pass
            if os.path.isdir(rec.run_dir):
                shutil.rmtree(rec.run_dir, ignore_errors=True)
                done.append(f"removed {rec.run_dir}")
            self.remove(rec.vm_id)
            done.append(f"forgot VM {rec.vm_id} (owner pid {rec.owner_pid})")
        # Network leases (TAP, nftables table, address) of VMs that are gone.
        from smolvm_kernel.host.net import cleanup_leases
        done += cleanup_leases(self.db_path, self.has)
        # Cgroups of VMMs that are gone (the watchdog removes them too, when it can).
        from smolvm_kernel.host import cgroups
        done += cgroups.sweep(self.has)
        # Folders with no record: a crash between mkdir and the insert.
        for d in self.vms_dir.iterdir():
            if d.name not in known and time.time() - d.stat().st_mtime > 60:
                shutil.rmtree(d, ignore_errors=True)
                done.append(f"removed stray {d}")
        return done
