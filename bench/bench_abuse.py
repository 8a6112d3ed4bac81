"""What hostile requests cost a real server while they are in flight (prints a Markdown table).

    python bench/bench_abuse.py [--out bench/results]

Starts a real `bentoml serve` (UGA_WORKERS=1, the tests' tokens) on a free port over a temp slide
root with a 3072² synthetic slide (s.tif) and a single-level "bomb" TIFF that claims 20000² px at
0.25 µm/px but compresses to ~1.3 MB (bomb.tif), runs one normal job so that queue items exist,
then sends each attack in turn. While an attack is in flight it samples the total RSS of the
server's process tree (main process + children; also the per-process peak, VmHWM, reset before
each attack) and polls GET /livez, both every 50 ms.
Goal per row: RSS growth < 256 MiB and max /livez < 1 s.

tests/test_abuse.py asserts the refusals; this measures what a test cannot assert stably.
"""

from __future__ import annotations

import argparse
import contextlib
import select
import shutil
import socket
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.hostile import deep, png, png_header_bomb, polygon, square_ring  # noqa: E402
from tests.server import Server, wait_for, wait_job  # noqa: E402

MIB = 1024 * 1024
POLL_S = 0.05
LIVEZ_TIMEOUT_S = 30.0
GOAL_RSS_MIB = 256
GOAL_LIVEZ_S = 1.0


# ---------------------------------------------------------------- slides


def write_bomb_tiff(path: Path, side: int = 20_000, mpp: float = 0.25, tile: int = 512) -> None:
    """A single-level tiled RGB TIFF of ``side``² px, one constant colour, written tile by tile
    (the full image is never allocated). Deflate brings ~1.2 GB of pixels to ~1 MB."""
    import tifffile

    block = np.full((tile, tile, 3), (236, 230, 238), np.uint8)  # near-white, slightly pink: background
    n = ((side + tile - 1) // tile) ** 2
    with tifffile.TiffWriter(path, bigtiff=False) as tif:
        tif.write(
            (block for _ in range(n)),
            shape=(side, side, 3),
            dtype=np.uint8,
            tile=(tile, tile),
            photometric="rgb",
            compression="deflate",
            compressionargs={"level": 9},
            resolution=(1e4 / mpp, 1e4 / mpp),
            resolutionunit="CENTIMETER",
            metadata=None,
        )


def build_slides(slides: Path) -> None:
    from models.data.slidegen import build_slide
    from models.data.sources import ensure_sources

    print("building slides ...", file=sys.stderr)
    build_slide(slides / "s.tif", size=(3072, 3072), centre="mixed", seed=5, sources=ensure_sources())
    write_bomb_tiff(slides / "bomb.tif")
    print(f"  bomb.tif: {(slides / 'bomb.tif').stat().st_size / 1024:.0f} KiB on disk", file=sys.stderr)


# ---------------------------------------------------------------- bodies


# ---------------------------------------------------------------- measuring


def tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def tree_rss(pid: int) -> int:
    """Sum of RSS over the process and all its descendants (bytes)."""
    total = 0
    for p in tree(pid):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total += p.memory_info().rss
    return total


def reset_peaks(pid: int) -> bool:
    """Reset each process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0). False if not allowed."""
    ok = True
    for p in tree(pid):
        try:
            Path(f"/proc/{p.pid}/clear_refs").write_text("5")
        except OSError:
            ok = False
    return ok


def tree_hwm(pid: int) -> int:
    """Sum of each process's peak RSS since its reset (bytes): an upper bound of the tree's peak that
    also catches spikes shorter than the 50 ms sampling."""
    total = 0
    for p in tree(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) * 1024
    return total


class InFlight:
    """Samples tree RSS and /livez latency every 50 ms between __enter__ and __exit__.

    Both samplers take a first sample before __enter__ returns, so even an attack that takes a few
    milliseconds has the /livez poll that was under way when it started and one RSS sample after.
    The peak is also read from each process's VmHWM, reset on entry, so a spike shorter than 50 ms
    counts too (the sum of per-process peaks: an upper bound when processes peak at different times)."""

    def __init__(self, server: Server):
        self.server = server
        self.hwm_ok = False
        self.stop = threading.Event()
        self.peak = self.before = 0
        self.livez_max = 0.0
        self.livez_polls = 0
        self.livez_bad: Counter = Counter()
        self.ready = [threading.Event(), threading.Event()]
        self.livez_client = httpx.Client(base_url=server.url, timeout=LIVEZ_TIMEOUT_S)  # SSL context: ~0.1 s

    def _rss(self) -> None:
        while True:
            self.peak = max(self.peak, tree_rss(self.server.proc.pid))
            self.ready[0].set()
            if self.stop.wait(POLL_S):
                break
        self.peak = max(self.peak, tree_rss(self.server.proc.pid))

    def _livez(self) -> None:
        c = self.livez_client
        while not self.stop.is_set():
            t = time.perf_counter()
            self.ready[1].set()
            try:
                r = c.get("/livez")
                dt = time.perf_counter() - t
                if r.status_code != 200:
                    self.livez_bad[r.status_code] += 1
            except httpx.TimeoutException:
                dt = LIVEZ_TIMEOUT_S
                self.livez_bad["timeout"] += 1
            except httpx.HTTPError as exc:
                dt = time.perf_counter() - t
                self.livez_bad[type(exc).__name__] += 1
            self.livez_max = max(self.livez_max, dt)
            self.livez_polls += 1
            self.stop.wait(POLL_S)

    def __enter__(self) -> InFlight:
        self.hwm_ok = reset_peaks(self.server.proc.pid)
        self.before = self.peak = tree_rss(self.server.proc.pid)
        self.threads = [threading.Thread(target=f, daemon=True) for f in (self._rss, self._livez)]
        for t in self.threads:
            t.start()
        for e in self.ready:
            e.wait(10)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.duration = time.perf_counter() - self.t0
        self.stop.set()
        for t in self.threads:
            t.join(LIVEZ_TIMEOUT_S + 5)
        self.livez_client.close()
        if self.hwm_ok:
            self.peak = max(self.peak, tree_hwm(self.server.proc.pid))

    @property
    def growth_mib(self) -> float:
        return (self.peak - self.before) / MIB


def describe(r: httpx.Response) -> str:
    """'422 (too_many_vertices)' — the status and the JSON body's error.code when there is one."""
    code = None
    with contextlib.suppress(ValueError, AttributeError, TypeError, KeyError):
        code = r.json()["error"]["code"]
    return f"{r.status_code} ({code})" if code else str(r.status_code)


def counts(statuses: list) -> str:
    return ", ".join(f"{n}× {s}" for s, n in sorted(Counter(statuses).items(), key=lambda kv: str(kv[0])))


# ---------------------------------------------------------------- attacks


class Bench:
    def __init__(self, server: Server, slides: Path):
        self.server, self.slides = server, slides
        self.rows: list[dict] = []
        with server.client("viewer") as c:
            self.items = c.get("/v1/queue", params={"slide": "s.tif", "k": 50}).json()["items"]
        if len(self.items) < 6:
            raise RuntimeError(f"need 6 queue items on s.tif, got {len(self.items)}")

    def client(self, role: str | None = "annotator", timeout: float = 120) -> httpx.Client:
        c = self.server.client(role)
        c.timeout = httpx.Timeout(timeout)
        return c

    def row(self, name: str, attack) -> None:
        print(f"attack: {name} ...", file=sys.stderr, flush=True)
        box = {}

        def run() -> None:
            try:
                box["status"] = attack()
            except Exception as exc:  # one failing row must not stop the others
                box["status"] = f"error: {type(exc).__name__}: {str(exc)[:160]}".replace("|", "/").replace("\n", " ")
                traceback.print_exc(file=sys.stderr)

        with InFlight(self.server) as m:
            t = threading.Thread(target=run, daemon=True)
            t.start()
            t.join()
        status = box.get("status", "error: no result")
        if m.livez_bad:
            status += f"; /livez non-200: {counts(list(m.livez_bad.elements()))}"
        row = {"attack": name, "status": status, "rss": m.growth_mib, "livez": m.livez_max, "s": m.duration}
        self.rows.append(row)
        print(f"  -> {status} | {m.growth_mib:.0f} MiB | {m.livez_max:.3f} s | {m.duration:.1f} s", file=sys.stderr)

    def note(self, extra) -> None:
        """Append ``extra()`` (taken outside the measurement) to the last row's status; never raises."""
        try:
            self.rows[-1]["status"] += extra()
        except Exception as exc:
            self.rows[-1]["status"] += f" (note failed: {type(exc).__name__})"
            traceback.print_exc(file=sys.stderr)

    def item_post(self, k: int, body: bytes, ctype: str, params: dict | None = None) -> str:
        with self.client() as c:
            r = c.post(
                f"/v1/queue/items/{self.items[k]['id']}/correction",
                content=body,
                headers={"content-type": ctype},
                params=params,
            )
        return describe(r)

    def side(self, k: int) -> int:
        """The item's mask side in pixels: its level-0 box at the job's µm/px (s.tif is 0.5 µm/px, job 1.0)."""
        return self.items[k]["bbox_level0"]["width"] // 2

    # 1-3: GeoJSON vertex counts
    def geojson(self, k: int, vertices: int, frac: float) -> str:
        s = self.side(k)
        body = polygon(square_ring(s * (1 - frac) / 2, s * (1 - frac) / 2, s * frac, vertices))
        return self.item_post(k, body, "application/geo+json") + f", {len(body) / MIB:.1f} MiB body"

    # 5: regions
    def region(self, x: int, y: int, w: int, h: int, mpp: float, body: bytes) -> str:
        params = {"slide": "s.tif", "x": x, "y": y, "width": w, "height": h, "mpp": mpp}
        with self.client() as c:
            r = c.post("/v1/corrections", params=params, content=body, headers={"content-type": "image/png"})
        return describe(r)

    def largest_region(self) -> str:
        """The largest region the default UGA_MAX_CORRECTION_PX (4096) allows at 0.25 µm/px on a
        0.5 µm/px slide: 2048² level-0 px = a 4096² mask; send a 4095² PNG (wrong size)."""
        side0 = min(3072, 4096 * 0.25 // 0.5)
        mask = int(side0 * 0.5 / 0.25)
        return self.region(0, 0, int(side0), int(side0), 0.25, png(np.zeros((mask - 1, mask - 1), np.uint8)))

    # 7: big bodies
    def big_unauthenticated_job(self) -> str:
        body = b'{"slide": "s.tif", "options": {}, "pad": "' + b"x" * (21 * MIB) + b'"}'
        with self.client(None) as c:
            r = c.post("/v1/jobs", content=body, headers={"content-type": "application/json"})
        return describe(r)

    def big_text_correction(self) -> str:
        return self.item_post(3, b"x" * (21 * MIB), "text/plain")

    # 8
    def upsampled_job(self) -> str:
        with self.client() as c:
            r = c.post("/v1/jobs", json={"slide": "s.tif", "options": {"slide_mpp": 4, "mpp": 0.25}})
        if r.status_code in (200, 202):
            self.upsampled_id = r.json()["id"]
        return describe(r)

    def upsampled_job_runs(self, for_s: float = 30.0) -> str:
        """The accepted job itself, its first ``for_s`` seconds (or until it ends)."""
        with self.client("viewer") as c:
            t0 = time.monotonic()
            while True:
                job = c.get(f"/v1/jobs/{self.upsampled_id}").json()
                if job["state"] in ("succeeded", "failed") or time.monotonic() - t0 >= for_s:
                    break
                time.sleep(0.5)
        err = f" ({str(job['error'])[:80]})" if job.get("error") else ""
        p = job["progress"]
        return f"{job['state']}, {p['done']}/{p['total']} tiles after {time.monotonic() - t0:.0f} s{err}"

    # 9
    def bomb_job(self) -> str:
        with self.client() as c:
            r = c.post("/v1/jobs", json={"slide": "bomb.tif"})
            if r.status_code not in (200, 202):
                return "submit " + describe(r)
            job = wait_job(c, r.json()["id"], timeout=300)
        err = str(job.get("error") or "")[:80]
        tiles = job.get("progress", {}).get("total")
        return f"submit {r.status_code}, job {job['state']}, {tiles} tiles" + (f" ({err})" if err else "")

    # 10
    def burst(self) -> str:
        """60 submissions at once with distinct options (queue_size 1..60). mpp 8 keeps the accepted
        jobs to one tile each, so they drain quickly and do not load the rows after this one."""
        statuses: list = []

        def submit(q: int) -> None:
            with self.client(timeout=60) as c:
                try:
                    r = c.post("/v1/jobs", json={"slide": "s.tif", "options": {"queue_size": q, "mpp": 8}})
                    statuses.append(r.status_code)
                    if r.status_code in (200, 202):
                        self.burst_ids.append(r.json()["id"])
                except httpx.HTTPError as exc:
                    statuses.append(type(exc).__name__)

        self.burst_ids: list[str] = []
        threads = [threading.Thread(target=submit, args=(q,)) for q in range(1, 61)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.burst_end = time.time()
        return counts(statuses)

    def burst_finished(self) -> str:
        """Outside the row: how many accepted jobs had already finished when the burst ended (they free
        a slot of UGA_MAX_ACTIVE_JOBS_PER_CALLER, so more than 20 can be accepted)."""
        with self.client("viewer") as c:
            jobs = [c.get(f"/v1/jobs/{i}").json() for i in self.burst_ids]
        done = sum(1 for j in jobs if j.get("finished_at") and j["finished_at"] <= self.burst_end)
        return f" ({done} accepted finished during the burst)"

    def drain_burst(self) -> None:
        """Outside any row: wait until the burst's accepted jobs are done (so they do not load later rows)."""
        with self.client("viewer") as c:

            def done() -> bool:
                return all(c.get(f"/v1/jobs/{i}").json()["state"] in ("succeeded", "failed") for i in self.burst_ids)

            with contextlib.suppress(TimeoutError):
                wait_for(done, 180, interval=1, what="burst jobs")

    # 11
    def same_correction(self) -> str:
        k = 5
        s = self.side(k)
        mask = np.zeros((s, s), np.uint8)
        mask[: s // 2] = 255
        body, statuses = png(mask), []

        def post() -> None:
            with self.client() as c:
                for _ in range(6):
                    try:
                        r = c.post(
                            f"/v1/queue/items/{self.items[k]['id']}/correction",
                            content=body,
                            headers={"content-type": "image/png"},
                        )
                        statuses.append(r.status_code)
                    except httpx.HTTPError as exc:
                        statuses.append(type(exc).__name__)

        threads = [threading.Thread(target=post) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return counts(statuses)

    # 12
    def slow_headers(self, n: int = 6, every_s: float = 2.0, for_s: float = 30.0) -> str:
        conns = []
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", self.server.port), timeout=10)
            s.sendall(b"GET /v1/jobs HTTP/1.1\r\n")
            conns.append(s)
        closed: dict[int, float] = {}
        t0 = time.monotonic()
        try:
            while time.monotonic() - t0 < for_s:
                for k, s in enumerate(conns):
                    if k in closed:
                        continue
                    try:
                        readable, _, _ = select.select([s], [], [], 0)
                        if readable and not s.recv(65536):
                            raise ConnectionResetError("closed by the server")
                        s.sendall(b"X")  # one byte of a header line at a time
                    except OSError:
                        closed[k] = time.monotonic() - t0
                time.sleep(every_s)
        finally:
            for s in conns:
                s.close()
        still = n - len(closed)
        cut = f", closed after {min(closed.values()):.0f}-{max(closed.values()):.0f} s" if closed else ""
        return f"{still}/{n} still open after {for_s:.0f} s{cut}"

    def run_all(self) -> None:
        s = self.side
        # (order of execution; the table keeps the numbering)
        self.row("1. GeoJSON 8000 vertices (queue item)", lambda: self.geojson(0, 8_000, 0.5))
        self.row("2. GeoJSON 99000 vertices", lambda: self.geojson(1, 99_000, 0.6))
        self.row("3. GeoJSON 150000 vertices (over limit)", lambda: self.geojson(2, 150_000, 0.7))
        self.row("4a. GeoJSON nested 100000 deep", lambda: self.item_post(3, deep(100_000), "application/geo+json"))
        self.row(
            "4b. GeoJSON features: 5",
            lambda: self.item_post(3, b'{"type": "FeatureCollection", "features": 5}', "application/geo+json"),
        )
        small = png(np.zeros((8, 8), np.uint8))
        self.row("5a. region 16384² at 0.25 µm/px (slide 3072²)", lambda: self.region(0, 0, 16384, 16384, 0.25, small))
        self.row("5b. largest region (2048² → 4096² mask), PNG 4095²", self.largest_region)
        bomb = png_header_bomb()
        self.row(f"6a. PNG header 100000² ({len(bomb) / 1024:.0f} KiB)", lambda: self.item_post(4, bomb, "image/png"))
        rgba = png(np.zeros((8192, 8192, 4), np.uint8))
        self.row(f"6b. PNG 8192² RGBA zeros ({len(rgba) / 1024:.0f} KiB)", lambda: self.item_post(4, rgba, "image/png"))
        self.row("7a. unauthenticated POST /v1/jobs, 21 MiB JSON", self.big_unauthenticated_job)
        self.row("7b. correction as text/plain, 21 MiB", self.big_text_correction)
        self.row("9. job on bomb.tif (20000² claimed), whole job", self.bomb_job)
        self.row("10. 60 job submissions at once", self.burst)
        self.note(self.burst_finished)
        with contextlib.suppress(Exception):
            self.drain_burst()
        self.row(f"11. same correction 8 threads × 6 (mask {s(5)}²)", self.same_correction)
        self.row("12. 6 slow-header connections, 1 byte / 2 s for 30 s", self.slow_headers)
        # last: if accepted, this job would hold the single worker for the rest of the run
        self.row("8a. job with slide_mpp 4, mpp 0.25 (16× upsampling)", self.upsampled_job)
        if getattr(self, "upsampled_id", None):
            self.row("8b. ... that job, if accepted: its first 30 s", self.upsampled_job_runs)
        self.rows.sort(key=lambda r: (int(r["attack"].split(".")[0].rstrip("ab")), r["attack"]))


def table(rows: list[dict]) -> str:
    lines = ["| attack | status (code) | RSS growth MiB | max /livez s | duration s |", "|---|---|---|---|---|"]
    for r in rows:
        miss = r["rss"] >= GOAL_RSS_MIB or r["livez"] >= GOAL_LIVEZ_S
        mark = " ✗" if miss else ""
        lines.append(f"| {r['attack']}{mark} | {r['status']} | {r['rss']:.0f} | {r['livez']:.3f} | {r['s']:.1f} |")
    lines.append("")
    lines.append(
        f"Goals: RSS growth < {GOAL_RSS_MIB} MiB and max /livez < {GOAL_LIVEZ_S:g} s for every row "
        "(✗ marks a row that misses one)."
    )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--keep", action="store_true", help="keep the temp directory (server log, data)")
    args = ap.parse_args()
    t_start = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="uga-abuse-"))
    slides = root / "slides"
    slides.mkdir()
    build_slides(slides)
    server = Server(root / "data", slides, UGA_WORKERS="1").start()
    try:
        with server.client("annotator") as c:
            c.timeout = httpx.Timeout(60)
            r = c.post("/v1/jobs", json={"slide": "s.tif", "options": {"patch_um": 256}})
            t = time.perf_counter()
            job = wait_job(c, r.json()["id"], timeout=300)
            assert job["state"] == "succeeded", job
            print(f"normal job on s.tif: {time.perf_counter() - t:.1f} s", file=sys.stderr)
        bench = Bench(server, slides)
        bench.run_all()
    finally:
        server.stop()
        if args.keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    out = table(bench.rows)
    print(out)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "abuse.md").write_text(out + "\n")
    print(f"total {time.perf_counter() - t_start:.0f} s; table written to {args.out / 'abuse.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
