"""Sending the callback outbox: signed POSTs, retried with backoff, bounded, at most one sender per row.

The contract (README, "Connecting to a PACS/LIS"): the body is the JSON event; the headers are

    X-UGA-Event: job.succeeded          X-UGA-Delivery: <id, the same on every retry>
    X-UGA-Timestamp: <unix seconds>     X-UGA-Signature: sha256=<hex HMAC-SHA256(secret, f"{timestamp}.{body}")>

Any 2xx is delivered; anything else (or no answer) is retried after UGA_CALLBACK_BACKOFF_S, doubling,
until UGA_CALLBACK_MAX_ATTEMPTS, then the delivery is failed (visible over the API; an admin retries).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
import time

import httpx

from service.config import Settings
from service.store import Delivery, Store

log = logging.getLogger("uga.callbacks")
MAX_BACKOFF_S = 3600.0


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The X-UGA-Signature value for ``body`` sent at ``timestamp``."""
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def retry_delay(settings: Settings, attempts: int) -> float:
    return min(MAX_BACKOFF_S, settings.callback_backoff_s * 2 ** max(0, attempts - 1))


class CallbackSender:
    """A thread of a serving process that sends due deliveries (several processes share the outbox)."""

    def __init__(self, store: Store, settings: Settings, poll_s: float = 1.0):
        self.store, self.settings, self.poll_s = store, settings, poll_s
        self.client = httpx.Client(timeout=settings.callback_timeout_s, follow_redirects=False)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="uga-callbacks", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.settings.callback_timeout_s + 5)
        self.client.close()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                if not self.send_one():
                    self._stop.wait(self.poll_s)
            except Exception:  # noqa: BLE001 - the sender must outlive a store hiccup
                log.exception("callback sender")
                self._stop.wait(self.poll_s)

    def send_one(self) -> bool:
        """Send the most overdue delivery, if any. True when one was attempted."""
        lease_s = self.settings.callback_timeout_s * 3
        delivery = self.store.deliveries.claim(lease_s)
        if delivery is None:
            return False
        url = self.settings.callback_targets.get(delivery.target)
        if url is None:
            self._failed(delivery, None, f"callback {delivery.target!r} is no longer configured (UGA_CALLBACKS)")
            return True
        body = delivery.payload.encode()
        timestamp = str(int(time.time()))
        headers = {
            "content-type": "application/json",
            "user-agent": "uga-serve",
            "x-uga-event": delivery.event,
            "x-uga-delivery": delivery.id,
            "x-uga-timestamp": timestamp,
            "x-uga-signature": sign(self.settings.callback_secret or "", timestamp, body),
        }
        try:
            response = self.client.post(url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            self._failed(delivery, None, f"{type(exc).__name__}: {exc}")
            return True
        if 200 <= response.status_code < 300:
            self.store.deliveries.delivered(delivery, response.status_code)
            log.info("callback %s %s delivered to %s", delivery.event, delivery.id, delivery.target)
        else:
            self._failed(delivery, response.status_code, f"HTTP {response.status_code}: {response.text[:200]}")
        return True

    def _failed(self, delivery: Delivery, status: int | None, error: str) -> None:
        error = "".join(ch if ch.isprintable() else "?" for ch in error)  # a receiver's bytes: no NUL in the store
        state = self.store.deliveries.attempt_failed(
            delivery,
            status,
            error,
            max_attempts=self.settings.callback_max_attempts,
            retry_in_s=retry_delay(self.settings, delivery.attempts),
        )
        log.warning("callback %s to %s: %s (%s)", delivery.id, delivery.target, error, state)
