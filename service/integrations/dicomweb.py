"""DICOMweb: a series from a configured PACS into a bounded local cache (QIDO-RS, WADO-RS), and a
result back to it (STOW-RS). Through dicomweb-client; only PACS named in the settings are called.

Cache: ``<data_dir>/dicomweb/<pacs>/<study>/<series>/``, written as ``.part`` and renamed when
complete. Before a fetch, series not used for UGA_DICOMWEB_CACHE_IDLE_S are evicted, oldest first,
until the cache is under UGA_DICOMWEB_CACHE_MB. Errors carry a reason code a job fails with:
pacs_unreachable, pacs_unauthorized, pacs_not_found, pacs_timeout, pacs_error (an answer that is
not DICOMweb), series_too_large. Each request is retried at most UGA_DICOMWEB_RETRIES times
(connection errors and 5xx only), with backoff. A fetch is bounded: at most MAX_SERIES_FILES
instances (paged; a PACS that repeats a page ends the listing), at most ``max_bytes`` written, and a
``check`` between requests that may stop it (a job's cancel and time limit).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

from service.errors import InvalidInput, Unprocessable
from service.wsi.dicom import MAX_SERIES_FILES

UID = re.compile(r"[0-9]+(\.[0-9]+)*")
COMPLETE = ".complete"
PAGE = 1000  # QIDO-RS results asked for at a time
CHUNK = 1 << 20  # WADO-RS answers are streamed to disk in pieces this large
T = TypeVar("T")


class PacsError(Unprocessable):
    """The PACS could not give (or take) what a job needs; ``code`` is the reason."""


@dataclass(frozen=True)
class PacsEndpoint:
    name: str
    url: str  # without credentials
    auth: tuple[str, str] | None = None


def parse_endpoints(setting: str) -> dict[str, PacsEndpoint]:
    """``NAME=URL,...`` (credentials as URL userinfo: https://user:password@host/dicom-web)."""
    endpoints = {}
    for entry in (e.strip() for e in setting.split(",") if e.strip()):
        name, _, url = entry.partition("=")
        parts = urlsplit(url.strip())
        auth = (unquote(parts.username or ""), unquote(parts.password or "")) if parts.username else None
        host = f"[{parts.hostname}]" if parts.hostname and ":" in parts.hostname else parts.hostname  # IPv6
        netloc = host + (f":{parts.port}" if parts.port else "") if host else ""
        endpoints[name.strip()] = PacsEndpoint(name.strip(), urlunsplit(parts._replace(netloc=netloc)), auth)
    return endpoints


def is_uid(value: str) -> bool:
    """A DICOM UID: digits and dots, at most 64 characters (so also a safe file and URL part)."""
    return 0 < len(value) <= 64 and UID.fullmatch(value) is not None


def check_uid(kind: str, value: str) -> str:
    if not is_uid(value):
        raise InvalidInput(
            "invalid_uid", f"{kind} must be a DICOM UID (digits and dots, at most 64), not {value[:70]!r}"
        )
    return value


class Pacs:
    """One configured PACS over DICOMweb."""

    def __init__(self, endpoint: PacsEndpoint, *, timeout_s: float, retries: int):
        import requests
        from dicomweb_client import DICOMwebClient

        session = requests.Session()
        if endpoint.auth:
            session.auth = endpoint.auth
        self.endpoint, self.timeout_s, self.retries = endpoint, timeout_s, retries
        self.session = session
        self.client = DICOMwebClient(url=endpoint.url, session=session)
        self.client.set_http_retry_params(retry=False)
        session.request = _with_timeout(session.request, timeout_s)

    def __enter__(self) -> Pacs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.session.close()

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        import requests

        delay = 0.5
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except requests.HTTPError as exc:
                status = exc.response.status_code if exc.response is not None else 0
                if status in (401, 403):
                    raise PacsError("pacs_unauthorized", f"{self.endpoint.name} refused {what} ({status})") from None
                if status == 404:
                    raise PacsError("pacs_not_found", f"{self.endpoint.name} has no {what}") from None
                if status < 500 or attempt == self.retries:
                    raise PacsError("pacs_error", f"{self.endpoint.name}: {what} failed ({status})") from None
            except requests.Timeout:
                if attempt == self.retries:
                    raise PacsError("pacs_timeout", f"{self.endpoint.name}: {what} timed out") from None
            except requests.ConnectionError:
                if attempt == self.retries:
                    raise PacsError("pacs_unreachable", f"{self.endpoint.name} is unreachable ({what})") from None
            except PacsError:
                raise
            except Exception as exc:  # noqa: BLE001 - not JSON, not DICOM, fields missing: not retried
                raise PacsError(
                    "pacs_error",
                    f"{self.endpoint.name}: {what}: the answer is not usable DICOMweb ({type(exc).__name__})",
                ) from None
            time.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")

    def instances(self, study: str, series: str, check: Callable[[], None] = lambda: None) -> list[str]:
        """SOP Instance UIDs of the series (QIDO-RS, a page at a time): at most MAX_SERIES_FILES."""
        uids: dict[str, None] = {}
        while True:
            check()
            offset = len(uids)
            page = self._call(
                f"series {series}",
                lambda offset=offset: self.client.search_for_instances(
                    study_instance_uid=study, series_instance_uid=series, limit=PAGE, offset=offset
                ),
            )
            listed = [u for u in map(_sop_uid, page) if u]
            if bad := next((u for u in listed if not is_uid(u)), None):  # it names a file and a URL path here
                raise PacsError(
                    "pacs_error", f"{self.endpoint.name} listed an instance UID that is not a DICOM UID: {bad[:70]!r}"
                )
            new = [u for u in listed if u not in uids]
            uids.update(dict.fromkeys(new))
            if len(uids) > MAX_SERIES_FILES:
                raise PacsError(
                    "series_too_large",
                    f"series {series} has more than {MAX_SERIES_FILES} instances; a slide's series has fewer",
                )
            if not new:  # the end, or a PACS that ignores the offset and repeats itself
                break
        if not uids:
            raise PacsError("pacs_not_found", f"{self.endpoint.name} has no instances of series {series}")
        return list(uids)

    def fetch_series(
        self, study: str, series: str, folder: Path, *, max_bytes: int, check: Callable[[], None] = lambda: None
    ) -> Path:
        """Every instance of the series into ``folder`` (written whole, fsynced, then renamed); refused
        beyond ``max_bytes`` in all, and ``check`` (which may raise) is called before every request."""
        part = folder.with_name(f"{folder.name}.part-{uuid.uuid4().hex[:8]}")
        part.mkdir(parents=True)
        written = 0
        try:
            for sop in self.instances(study, series, check):
                check()
                path = part / f"{sop}.dcm"
                left = max_bytes - written
                self._call(
                    f"instance {sop}",
                    lambda sop=sop, path=path, left=left: self._download(study, series, sop, path, left, check),
                )
                _check_identity(path, (study, series, sop), self.endpoint.name)
                with open(path, "rb+") as f:
                    os.fsync(f.fileno())
                written += path.stat().st_size
            (part / COMPLETE).write_text(f"{study}/{series}\n")
            try:
                part.rename(folder)
            except OSError:  # another process fetched it meanwhile: keep theirs
                if not (folder / COMPLETE).exists():
                    raise
                shutil.rmtree(part, ignore_errors=True)
        except BaseException:
            shutil.rmtree(part, ignore_errors=True)
            raise
        return folder

    def _download(self, study: str, series: str, sop: str, path: Path, limit: int, check: Callable[[], None]) -> None:
        """One instance (WADO-RS) to ``path``, streamed to disk as it arrives (a whole-slide level can be
        gigabytes: never held in memory), refused past ``limit`` bytes; ``check`` runs between chunks."""
        url = f"{self.endpoint.url.rstrip('/')}/studies/{study}/series/{series}/instances/{sop}"
        accept = 'multipart/related; type="application/dicom"; transfer-syntax=*'
        raw = path.with_name(path.name + ".multipart")
        try:
            with self.session.get(url, headers={"Accept": accept}, stream=True, allow_redirects=False) as response:
                if response.is_redirect:  # instances come from the configured PACS address only
                    raise PacsError(
                        "pacs_error",
                        f"{self.endpoint.name} redirected an instance download ({response.status_code}); set UGA_PACS "
                        "to the DICOMweb root it redirects to",
                    )
                response.raise_for_status()
                boundary = _boundary(response.headers.get("Content-Type", ""), self.endpoint.name)
                size = 0
                with open(raw, "wb") as f:
                    for chunk in response.iter_content(CHUNK):
                        size += len(chunk)
                        if size > limit:
                            cache = "UGA_DICOMWEB_CACHE_MB"
                            too_large = f"{self.endpoint.name}: series {series} is larger than the cache ({cache})"
                            raise PacsError("series_too_large", too_large)
                        f.write(chunk)
                        check()
            _first_part(raw, boundary, path, self.endpoint.name)
        finally:
            raw.unlink(missing_ok=True)

    def store(self, dataset) -> None:
        """STOW-RS one instance (a result) to this PACS."""
        self._call("storing the result", lambda: self.client.store_instances([dataset]))


def _boundary(content_type: str, pacs: str) -> bytes:
    """The multipart boundary of a WADO-RS answer's Content-Type."""
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    if not content_type.lower().startswith("multipart/related") or match is None:
        raise PacsError("pacs_error", f"{pacs} answered {content_type[:80]!r}, not multipart/related DICOM")
    return match.group(1).encode()


def _first_part(raw: Path, boundary: bytes, out: Path, pacs: str) -> None:
    """The one body part of a WADO-RS instance answer (``raw``, on disk) into ``out``, as a DICOM file
    (a part without the Part 10 preamble is rewritten with one)."""
    delimiter = b"--" + boundary
    size = raw.stat().st_size
    with open(raw, "rb") as f:
        head = f.read(64 * 1024)
        first = head.find(delimiter)
        start = head.find(b"\r\n\r\n", first) + 4 if first >= 0 else -1
        f.seek(max(0, size - 4096))
        tail_at = f.tell()
        end = f.read().rfind(b"\r\n" + delimiter)
        end = tail_at + end if end >= 0 else -1
        if start < 4 or end < start:
            raise PacsError("pacs_error", f"{pacs}: the answer is not a multipart DICOM instance")
        f.seek(start)
        with open(out, "wb") as dst:
            left = end - start
            while left:
                chunk = f.read(min(CHUNK, left))
                if not chunk:
                    raise PacsError("pacs_error", f"{pacs}: the answer ended early")
                dst.write(chunk)
                left -= len(chunk)
    with open(out, "rb") as f:
        f.seek(128)
        part10 = f.read(4) == b"DICM"
    if not part10:  # a bare data set (some PACS): pydicom adds the preamble and file meta, in memory
        import pydicom

        try:
            dataset = pydicom.dcmread(out, force=True)
            dataset.save_as(out, enforce_file_format=True)
        except Exception as exc:  # noqa: BLE001 - whatever the bytes were, they are not a DICOM instance
            raise PacsError("pacs_error", f"{pacs}: the answer is not DICOM ({type(exc).__name__})") from None


def _check_identity(path: Path, asked: tuple[str, str, str], pacs: str) -> None:
    """The downloaded instance is the one asked for: its study, series and SOP Instance UIDs (a PACS that
    ignored the request must not have another patient's slide segmented and filed under this one)."""
    import pydicom
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    tags = ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"]
    try:
        syntax = pydicom.filereader.read_file_meta_info(path).get("TransferSyntaxUID")
        if syntax == DeflatedExplicitVRLittleEndian:  # reading any of it would inflate all of it in memory
            raise PacsError("pacs_error", f"{pacs} sent a deflated instance; whole-slide images are never deflated")
        dataset = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=tags)
        got = tuple(str(dataset.get(tag, "")) for tag in tags)
    except PacsError:
        raise
    except Exception as exc:  # noqa: BLE001 - unreadable header: not the instance asked for either
        raise PacsError("pacs_error", f"{pacs}: an instance's header does not read ({type(exc).__name__})") from None
    if got != asked:
        raise PacsError(
            "pacs_error",
            f"{pacs} answered instance {got[2][:64]} of series {got[1][:64]} (study {got[0][:64]}) when asked for "
            f"instance {asked[2]} of series {asked[1]} (study {asked[0]}): not the series asked for",
        )


def _sop_uid(found: object) -> str | None:
    """The SOP Instance UID of one QIDO-RS result, None when it holds none."""
    try:
        value = found["00080018"]["Value"][0]
    except (KeyError, IndexError, TypeError):
        return None
    return value if isinstance(value, str) else None


def _with_timeout(request, timeout_s: float):
    def call(method, url, **kwargs):
        kwargs.setdefault("timeout", timeout_s)
        return request(method, url, **kwargs)

    return call


def cached_series(cache: Path, pacs: str, study: str, series: str) -> Path:
    return cache / pacs / study / series


def evict(cache: Path, max_bytes: int, idle_s: float) -> list[Path]:
    """Remove complete series not used for ``idle_s``, least recently used first, while over ``max_bytes``;
    and fetches abandoned by a killed process (``.part-*`` untouched for ``idle_s``). A series is renamed
    away before it is deleted, so no reader ever sees half of one; a race with another evicting process
    is harmless."""
    now = time.time()
    for part in cache.glob("*/*/*.part-*"):
        with contextlib.suppress(OSError):
            if now - part.stat().st_mtime > idle_s:
                shutil.rmtree(part, ignore_errors=True)
    used: dict[Path, tuple[float, int]] = {}
    for marker in cache.glob(f"*/*/*/{COMPLETE}"):
        with contextlib.suppress(OSError):
            series = marker.parent
            used[series] = (marker.stat().st_mtime, sum(f.stat().st_size for f in series.iterdir()))
    total, removed = sum(size for _, size in used.values()), []
    for series, (mtime, size) in sorted(used.items(), key=lambda item: item[1][0]):
        if total <= max_bytes:
            break
        if now - mtime < idle_s:
            continue  # in use: a job or a review read it recently
        doomed = series.with_name(f"{series.name}.evict-{uuid.uuid4().hex[:8]}")
        try:
            series.rename(doomed)
        except OSError:
            continue  # another process evicted it first
        shutil.rmtree(doomed, ignore_errors=True)
        total -= size
        removed.append(series)
    return removed


def touch(series_folder: Path) -> None:
    """Mark a cached series as used now (eviction spares it for UGA_DICOMWEB_CACHE_IDLE_S)."""
    os.utime(series_folder / COMPLETE)
