"""Copy an embedded SQLite store into an empty PostgreSQL database (moving to the scale-out topology).

One transaction on the target: every table in schema order (parents before children), identity
sequences moved past the copied ids. The source is only read. Files (jobs/, models/, corrections/)
stay in the data directory, which becomes the shared volume.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

from service.store.db import SCHEMA, Database, StoreError, open_database

TABLES = re.findall(r"CREATE TABLE IF NOT EXISTS (\w+)", SCHEMA)
IDENTITY_TABLES = ("pointer_history", "audit")  # INTEGER PRIMARY KEY AUTOINCREMENT in SQLite


def copy_store(data_dir: Path, url: str) -> dict[str, int]:
    """Rows copied per table from ``data_dir/uga.sqlite`` into the empty database at ``url``."""
    path = Path(data_dir) / "uga.sqlite"
    if not path.exists():
        raise StoreError(f"no SQLite store at {path}: set UGA_DATA_DIR to the data directory to copy")
    source = Database(path)  # brings an older store to the current schema first
    target = open_database(data_dir, url)
    try:
        filled = [t for t in TABLES if target.scalar(f"SELECT COUNT(*) FROM {t}")]
        if filled:
            raise StoreError(f"{target.path} is not empty ({', '.join(filled)}): copy into a new database")
        copied: dict[str, int] = {}
        source.conn().execute("BEGIN")  # one consistent snapshot of every table, even if the service runs
        with target.transaction() as db:
            for table in TABLES:
                rows = source.conn().execute(f"SELECT * FROM {table}").fetchall()
                if rows:
                    columns = rows[0].keys()
                    db.executemany(
                        f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
                        [tuple(r) for r in rows],
                    )
                copied[table] = len(rows)
            for table in IDENTITY_TABLES:
                db.execute(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), COALESCE(MAX(id), 0) + 1, false)"
                    f" FROM {table}"
                )
        return copied
    finally:
        with contextlib.suppress(Exception):
            source.conn().execute("ROLLBACK")
        source.close()
        target.close()
