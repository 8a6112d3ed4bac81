"""Scale-out benchmark: the store on SQLite vs PostgreSQL, and 1 vs 2 serving replicas on one database.

    .venv/bin/python bench/bench_scale.py [--jobs 8] [--ops 300]

1. Store operations, in process, one after another: the latency of a job's claim (submit + claim +
   finish) and of a correction's ingest, on SQLite (the embedded default, synchronous=FULL) and on a
   real PostgreSQL server on loopback (Debian's package, started here in a temp dir, fsync on).
2. Real `uga serve` replicas on that PostgreSQL (one worker each, shared artifact root): jobs per
   minute for a batch of small slides submitted through the replicas in turn, and p95 latency of
   API reads (GET /v1/jobs, /v1/queue, /v1/models/current) from a steady client meanwhile.

Ratios are taken within one run (the machine is noisy). On a 2-core machine two replicas share the
same cores, so their throughput cannot double: the table says what this machine gives.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from service.store import Correction, Store  # noqa: E402
from tests.postgres import PostgresServer  # noqa: E402
from tests.server import Server, wait_job  # noqa: E402

QUEUE = [
    {"id": "q1", "rank": 1, "score": 0.9, "measure": "uga", "scoring": "mean"}
    | {
        "bbox_level0": {"x": 0, "y": 0, "width": 64, "height": 64},
        "bbox_um": {"x": 0, "y": 0, "width": 64, "height": 64},
    }
    | {"mean_uncertainty": 0.9, "mean_probability": 0.4, "tissue_fraction": 1.0, "model_version": "v1"}
]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def store_latencies(store: Store, ops: int) -> dict[str, list[float]]:
    """Seconds per job cycle (submit, claim, finish) and per correction ingest."""
    claim, ingest = [], []
    for i in range(ops):
        t0 = time.perf_counter()
        job, _ = store.jobs.submit(
            slide=f"s{i}.tif", options={}, resolved={}, model_version="v1", dedup_key=f"k{i}", actor="bench"
        )
        taken = store.jobs.claim("bench-worker")
        store.jobs.finish(taken.id, "bench-worker", {"model_version": "v1"}, [q | {"id": f"q{i}"} for q in QUEUE])
        claim.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        store.corrections.add(
            Correction(f"{i:064x}", f"s{i}.tif", 0, 0, 64, 64, 1.0, "bench", 0.3, 0, time.time(), f"q{i}", "v1", 0.8),
            "bench",
        )
        ingest.append(time.perf_counter() - t0)
    return {"claim": claim, "ingest": ingest}


def replica_run(root: Path, url: str, slide: Path, replicas: int, jobs: int) -> tuple[float, float, int]:
    """(jobs per minute, p95 API read latency in s, reads) with ``replicas`` serving processes."""
    slides = root / f"slides-{replicas}"
    slides.mkdir()
    for i in range(jobs):
        shutil.copy(slide, slides / f"s{i}.tif")
    env = {"UGA_DATABASE_URL": url, "UGA_WORKERS": "1", "UGA_ORT_THREADS": "2"}
    servers = [
        Server(root / f"shared-{replicas}", slides, name=f"r{replicas}-{k}", **env).start() for k in range(replicas)
    ]
    latencies: list[float] = []
    stop = threading.Event()

    def reader() -> None:
        clients = [s.client("viewer") for s in servers]
        k = 0
        while not stop.is_set():
            for url_path in ("/v1/jobs?limit=20", "/v1/queue?k=5", "/v1/models/current"):
                t0 = time.perf_counter()
                clients[k % len(clients)].get(url_path).raise_for_status()
                latencies.append(time.perf_counter() - t0)
                k += 1
            time.sleep(0.05)

    thread = threading.Thread(target=reader, daemon=True)
    try:
        thread.start()
        t0 = time.perf_counter()
        ids = []
        for i in range(jobs):
            with servers[i % replicas].client("annotator") as c:
                r = c.post("/v1/jobs", json={"slide": f"s{i}.tif", "options": {"patch_um": 512, "queue_size": 2}})
                r.raise_for_status()
                ids.append(r.json()["id"])
        with servers[0].client("viewer") as c:
            states = [wait_job(c, job_id, timeout=1800)["state"] for job_id in ids]
        elapsed = time.perf_counter() - t0
        assert states == ["succeeded"] * jobs, states
    finally:
        stop.set()
        thread.join(10)
        for s in servers:
            s.stop()
    return jobs / elapsed * 60, percentile(latencies, 0.95), len(latencies)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=8, help="jobs per replica configuration")
    parser.add_argument("--ops", type=int, default=300, help="store operations per backend")
    args = parser.parse_args()
    why = PostgresServer.available()
    if why:
        print(f"bench_scale: {why}", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="uga-bench-scale-"))
    pg = PostgresServer(durable=True).start()  # fsync on, like SQLite's synchronous=FULL
    try:
        rows = {}
        for name, url in (("SQLite", None), ("PostgreSQL", pg.new_database())):
            store = Store(root / f"store-{name}", url)
            try:
                rows[name] = store_latencies(store, args.ops)
            finally:
                store.close()
        print(f"\n### Store operations ({args.ops} each, one after another, loopback)\n")
        print("| operation | SQLite p50 / p95 ms | PostgreSQL p50 / p95 ms | PostgreSQL / SQLite (p50) |")
        print("|---|---|---|---|")
        for op in ("claim", "ingest"):
            s, p = rows["SQLite"][op], rows["PostgreSQL"][op]
            print(
                f"| {op} | {statistics.median(s) * 1e3:.2f} / {percentile(s, 0.95) * 1e3:.2f} "
                f"| {statistics.median(p) * 1e3:.2f} / {percentile(p, 0.95) * 1e3:.2f} "
                f"| {statistics.median(p) / statistics.median(s):.2f} |"
            )

        from models.data.slidegen import build_slide
        from models.data.sources import ensure_sources

        slide = root / "slide.tif"
        build_slide(slide, size=(2048, 2048), centre="mixed", seed=9001, sources=ensure_sources())
        results = {n: replica_run(root, pg.new_database(), slide, n, args.jobs) for n in (1, 2)}
        print(f"\n### Replicas on one PostgreSQL ({args.jobs} jobs of a 2048² slide, 1 worker per replica)\n")
        print("| replicas | jobs / min | API read p95 ms | reads | jobs / min vs 1 replica |")
        print("|---|---|---|---|---|")
        for n, (rate, p95, reads) in results.items():
            print(f"| {n} | {rate:.1f} | {p95 * 1e3:.0f} | {reads} | {rate / results[1][0]:.2f} |")
    finally:
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
