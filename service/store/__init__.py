"""Durable metadata: one database (SQLite in the data directory, or PostgreSQL for several hosts; one
transaction per change) and the blob directories.

``Store`` groups one repository per resource over the shared transaction helper:
``store.jobs``, ``store.queue``, ``store.corrections``, ``store.models``, ``store.runs``, ``store.tokens``.
"""

from __future__ import annotations

from pathlib import Path

from service.fsutil import durable_dir
from service.store.corrections import CorrectionRepository
from service.store.db import Lease, StoreError, open_database
from service.store.deliveries import DeliveryRepository
from service.store.jobs import JobRepository
from service.store.models import ModelRepository
from service.store.queue import QueueRepository
from service.store.records import ApiToken, Correction, Delivery, FinetuneRun, Job, ModelVersion, QueueItem
from service.store.runs import RunRepository
from service.store.tokens import TokenRepository

__all__ = [
    "ApiToken",
    "Correction",
    "Delivery",
    "FinetuneRun",
    "Job",
    "Lease",
    "ModelVersion",
    "QueueItem",
    "Store",
    "StoreError",
]


class Store:
    """The database (``<data_dir>/uga.sqlite``, or ``database_url``) plus ``<data_dir>/jobs/<id>/``."""

    def __init__(self, data_dir: Path, database_url: str | None = None, pool_size: int = 8, timeout_s: float = 10.0):
        self.data_dir = Path(data_dir)
        self.jobs_dir = self.data_dir / "jobs"
        self.db = open_database(self.data_dir, database_url, pool_size, timeout_s)  # refused: nothing made
        durable_dir(self.jobs_dir)
        self.db_path = self.db.path
        self.jobs = JobRepository(self.db)
        self.queue = QueueRepository(self.db)
        self.corrections = CorrectionRepository(self.db)
        self.models = ModelRepository(self.db)
        self.runs = RunRepository(self.db)
        self.tokens = TokenRepository(self.db)
        self.deliveries = DeliveryRepository(self.db)

    @classmethod
    def open(cls, settings) -> Store:
        """The store the settings name: UGA_DATA_DIR, and UGA_DATABASE_URL when set."""
        return cls(settings.data_dir, settings.database_url, settings.database_pool_size, settings.database_timeout_s)

    def job_dir(self, job_id: str) -> Path:
        return self.jobs_dir / job_id

    def audit_log(self, limit: int = 100) -> list[dict]:
        return self.db.all("SELECT * FROM audit ORDER BY id DESC LIMIT ?", (limit,))

    def writable(self) -> bool:
        return self.db.writable()

    def try_lease(self, name: str) -> Lease | None:
        """The deployment-wide lease ``name`` if this process now holds it, else None."""
        return self.db.try_lease(name)

    def close(self) -> None:
        self.db.close()
