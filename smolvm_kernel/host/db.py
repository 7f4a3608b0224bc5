"""The state folder's SQLite database: one write transaction at a time, across processes."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def transaction(db_path, *schemas: str) -> Iterator[sqlite3.Connection]:
    """One write transaction on the state DB: one writer at a time, across processes."""
    con = sqlite3.connect(db_path, timeout=30, isolation_level=None)
    try:
        _use_wal(con, time.monotonic() + 30)
        for schema in schemas:
            con.execute(schema)
        con.execute("BEGIN IMMEDIATE")
        yield con
        con.execute("COMMIT")
    except BaseException:
        if con.in_transaction:
            con.execute("ROLLBACK")
        raise
    finally:
        con.close()


def _use_wal(con: sqlite3.Connection, deadline: float) -> None:
    """Switch a new database to WAL. Unlike other statements, the switch does not
    wait for a lock held by a concurrent first user: retry it (seen with four
    processes creating the database at once)."""
    while True:
        try:
            if con.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                con.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)
