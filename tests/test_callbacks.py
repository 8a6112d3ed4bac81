"""Callbacks instead of polling: a job that names a configured callback POSTs a signed event when it
ends. A real receiver on loopback checks the signature; a 500 is retried with backoff; a receiver
that is down when the job ends still gets the event after the service restarts (the outbox is in
the store); a callback that never answers ends failed, visible over the API, and an admin retries it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from service.loop.callbacks import sign
from tests.inprocess import InProcessService
from tests.server import free_port, hostile_slide_root, wait_for, wait_job

SECRET = "s" * 40


class Receiver:
    """A LIS endpoint on loopback: records what it got, answers with the next planned status."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.received: list[dict] = []
        self.plan: list[int] = []
        self.reply = b""  # the body of every answer
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.received.append({"headers": {k.lower(): v for k, v in self.headers.items()}, "body": body})
                status = receiver.plan.pop(0) if receiver.plan else 200
                self.send_response(status)
                self.send_header("Content-Length", str(len(receiver.reply)))
                self.end_headers()
                self.wfile.write(receiver.reply)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/uga-events"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def verify(secret: str, headers: dict, body: bytes, tolerance_s: float = 300) -> bool:
    """What a receiver does (the README's snippet): recompute the HMAC, compare in constant time."""
    timestamp = headers["x-uga-timestamp"]
    expected = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    fresh = abs(time.time() - int(timestamp)) <= tolerance_s
    return fresh and hmac.compare_digest(headers["x-uga-signature"], f"sha256={expected}")


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def service(root, slides, url: str, **settings) -> InProcessService:
    settings = {"callback_backoff_s": 0.3, **settings}
    return InProcessService(root / "data", slides, callbacks=f"lis={url}", callback_secret=SECRET, **settings)


@pytest.fixture
def slides(tmp_path, source_slide):
    return hostile_slide_root(tmp_path, source_slide)


def submit(svc: InProcessService, callback: str | None = "lis", slide: str = "cases/a.tif") -> dict:
    with svc.client("annotator") as c:
        r = c.post("/v1/jobs", json={"slide": slide, "options": {"patch_um": 512}, "callback": callback})
        assert r.status_code == 202, r.text
        assert r.json()["callback"] == callback
        return wait_job(c, r.json()["id"])


def deliveries(svc: InProcessService, job_id: str) -> list[dict]:
    with svc.client("viewer") as c:
        return c.get(f"/v1/jobs/{job_id}/deliveries").json()["deliveries"]


@pytest.mark.slow  # over 5 s on 2 cores: not in make test-fast
def test_a_finished_job_posts_one_signed_event_and_a_500_is_retried(tmp_path, slides, receiver):
    receiver.plan = [500]  # the LIS is briefly unwell
    svc = service(tmp_path, slides, receiver.url)
    try:
        job = submit(svc)
        assert job["state"] == "succeeded"
        [d] = wait_for(
            lambda: [d for d in deliveries(svc, job["id"]) if d["state"] == "delivered"] or None,
            timeout=30,
            what="the callback delivered",
        )
    finally:
        svc.close()
    assert d["attempts"] == 2 and d["last_status"] == 200 and d["event"] == "job.succeeded"
    assert len(receiver.received) == 2
    first, second = receiver.received
    assert first["headers"]["x-uga-delivery"] == second["headers"]["x-uga-delivery"] == d["id"]  # idempotency key
    assert json.loads(first["body"])["delivery"] == d["id"]  # also in the signed body: a replay is the same event
    assert first["body"] == second["body"]  # the same event, byte for byte
    for got in receiver.received:
        assert verify(SECRET, got["headers"], got["body"])
        assert not verify("another-secret-of-the-same-length-xxxxxx", got["headers"], got["body"])
    event = json.loads(second["body"])
    assert event["event"] == "job.succeeded" and event["job"]["id"] == job["id"]
    assert event["job"]["summary"]["tumour_area_mm2"] == job["summary"]["tumour_area_mm2"]
    assert event["job"]["links"]["job"] == f"/v1/jobs/{job['id']}"
    assert second["headers"]["x-uga-signature"] == sign(SECRET, second["headers"]["x-uga-timestamp"], second["body"])


def test_an_unknown_callback_is_refused_and_nothing_is_queued(tmp_path, slides, receiver):
    svc = service(tmp_path, slides, receiver.url, start_worker=False)
    try:
        before = svc.runtime.store.jobs.counts()
        with svc.client("annotator") as c:
            for name in ("ris", "http://evil.example/x", "LIS"):
                r = c.post("/v1/jobs", json={"slide": "cases/a.tif", "callback": name})
                assert r.status_code == 400 and r.json()["error"]["code"] == "unknown_callback", r.text
                assert "lis" in r.json()["error"]["message"]
        assert svc.runtime.store.jobs.counts() == before
    finally:
        svc.close()


def cancelled_job(svc: InProcessService, callback: str | None = "lis") -> str:
    """A job that ends at once: submitted and cancelled while queued (this service runs no worker)."""
    with svc.client("annotator") as c:
        r = c.post("/v1/jobs", json={"slide": "cases/a.tif", "callback": callback})
        assert r.status_code == 202, r.text
        assert c.post(f"/v1/jobs/{r.json()['id']}/cancel").json()["state"] == "cancelled"
        return r.json()["id"]


def idle(root, slides, url: str, **settings) -> InProcessService:
    """The service without its job worker and sender threads: the test sends by hand (deterministic)."""
    return service(root, slides, url, start_worker=False, **settings)


def test_an_event_for_a_receiver_that_was_down_is_delivered_after_a_restart(tmp_path, slides):
    port = free_port()  # nothing listens yet
    url = f"http://127.0.0.1:{port}/uga-events"
    svc = idle(tmp_path, slides, url, callback_backoff_s=0.05)
    try:
        job_id = cancelled_job(svc)
        assert svc.runtime.callbacks.send_one()  # connection refused: stays pending
        [d] = deliveries(svc, job_id)
        assert d["state"] == "pending" and d["attempts"] == 1 and d["last_status"] is None
        assert "ConnectError" in d["last_error"]
    finally:
        svc.close()  # the service stops with the event undelivered
    receiver = Receiver(port)
    svc = idle(tmp_path, slides, url, callback_backoff_s=0.05)
    try:
        time.sleep(0.1)
        assert svc.runtime.callbacks.send_one()
        [d] = deliveries(svc, job_id)
        assert d["state"] == "delivered" and d["attempts"] == 2
    finally:
        svc.close()
        receiver.close()
    [got] = receiver.received
    assert json.loads(got["body"])["event"] == "job.cancelled" and verify(SECRET, got["headers"], got["body"])


def test_a_callback_that_keeps_failing_ends_failed_and_an_admin_retries_it(tmp_path, slides, receiver):
    receiver.plan = [503, 503, 503]
    receiver.reply = b"busy\x00\x1b[2J"  # bytes no database text column should take (PostgreSQL refuses NUL)
    svc = idle(tmp_path, slides, receiver.url, callback_max_attempts=2, callback_backoff_s=0.05)
    sender = svc.runtime.callbacks
    try:
        job_id = cancelled_job(svc)
        assert sender.send_one()
        assert not sender.send_one()  # not due yet: the backoff holds it back
        time.sleep(0.1)
        assert sender.send_one()
        [d] = deliveries(svc, job_id)
        assert d["state"] == "failed" and d["attempts"] == 2 and d["last_status"] == 503
        assert "HTTP 503" in d["last_error"] and "busy" in d["last_error"]
        assert all(ch.isprintable() for ch in d["last_error"])
        with svc.client("admin") as c:
            failed = c.get("/v1/deliveries", params={"state": "failed"}).json()["deliveries"]
            assert [x["id"] for x in failed] == [d["id"]]
            again = c.post(f"/v1/deliveries/{d['id']}/retry")
            assert again.status_code == 200 and again.json()["state"] == "pending"
            assert c.post(f"/v1/deliveries/{d['id']}/retry").status_code == 409  # only failed ones
        with svc.client("annotator") as c:
            assert c.post(f"/v1/deliveries/{d['id']}/retry").status_code == 403
        assert sender.send_one() and sender.send_one() is False  # 503 (pending again), not yet due
        time.sleep(0.1)
        assert sender.send_one()
        assert deliveries(svc, job_id)[0]["state"] == "delivered"
    finally:
        svc.close()
    assert len(receiver.received) == 4  # 503, 503, then the admin's retry: 503, 200


def test_a_job_without_a_callback_sends_nothing(tmp_path, slides, receiver):
    svc = idle(tmp_path, slides, receiver.url)
    try:
        job_id = cancelled_job(svc, callback=None)
        assert deliveries(svc, job_id) == [] and svc.runtime.callbacks.send_one() is False
    finally:
        svc.close()
    assert receiver.received == []


def test_asking_for_a_callback_is_a_new_job_not_the_earlier_one_without(tmp_path, slides, receiver):
    svc = idle(tmp_path, slides, receiver.url)
    try:
        with svc.client("annotator") as c:
            body = {"slide": "cases/a.tif", "options": {"patch_um": 512}}
            first = c.post("/v1/jobs", json=body).json()
            again = c.post("/v1/jobs", json=body)
            told = c.post("/v1/jobs", json={**body, "callback": "lis"})
            told_again = c.post("/v1/jobs", json={**body, "callback": "lis"})
        assert again.status_code == 200 and again.json()["id"] == first["id"]  # identical: deduplicated
        assert told.status_code == 202 and told.json()["id"] != first["id"] and told.json()["callback"] == "lis"
        assert told_again.json()["id"] == told.json()["id"]
    finally:
        svc.close()
