"""Where a slide's pixels are: a path under the slide root, or a DICOMweb series in the local cache.

A slide is named ``rel/path`` (a file, or a DICOM series' folder) or ``dicomweb/<pacs>/<study>/<series>``
(fetched from a configured PACS on first use, then read like a local series).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from service.config import Settings
from service.errors import DomainError, InvalidInput, NotFound
from service.integrations.dicomweb import COMPLETE, Pacs, cached_series, check_uid, evict, touch
from service.wsi.slide import canonical_slide, resolve_slide_path

DICOMWEB = "dicomweb"


def dicomweb_name(pacs: str, study: str, series: str) -> str:
    return f"{DICOMWEB}/{pacs}/{study}/{series}"


def parse_dicomweb(name: str) -> tuple[str, str, str] | None:
    """(pacs, study, series) of a DICOMweb slide name, None for a path under the slide root."""
    parts = name.split("/")
    if len(parts) != 4 or parts[0] != DICOMWEB:
        return None
    return parts[1], parts[2], parts[3]


def endpoint(settings: Settings, name: str):
    """The configured PACS called ``name`` (never a URL from a request)."""
    found = settings.pacs_endpoints.get(name)
    if found is None:
        configured = ", ".join(settings.pacs_endpoints) or "none configured (UGA_PACS)"
        raise InvalidInput("unknown_pacs", f"unknown PACS {name[:40]!r}: use one of {configured}")
    return found


def pacs_client(settings: Settings, name: str) -> Pacs:
    """A client of the configured PACS ``name`` (close it: ``with pacs_client(...) as pacs``)."""
    return Pacs(endpoint(settings, name), timeout_s=settings.dicomweb_timeout_s, retries=settings.dicomweb_retries)


def check_dicomweb_source(settings: Settings, pacs: str, study: str, series: str) -> str:
    """The slide name of a DICOMweb series, after checking the PACS is configured and the UIDs are UIDs."""
    endpoint(settings, pacs)
    return dicomweb_name(pacs, check_uid("study", study), check_uid("series", series))


def locate_slide(settings: Settings, name: str, check: Callable[[], None] = lambda: None) -> Path:
    """The local path of slide ``name``; a DICOMweb series is fetched into the cache first (at most the
    cache's size; ``check`` runs before every request to the PACS and may stop the fetch)."""
    source = parse_dicomweb(name)
    if source is None:
        return canonical_slide(resolve_slide_path(settings.slide_root, name))
    check_dicomweb_source(settings, *source)  # a configured PACS and real UIDs before any path is built
    pacs, study, series = source
    cache = settings.data_dir / DICOMWEB
    folder = cached_series(cache, pacs, study, series)
    if (folder / COMPLETE).exists():
        touch(folder)
        return folder
    max_bytes = int(settings.dicomweb_cache_mb * 2**20)
    evict(cache, max_bytes, settings.dicomweb_cache_idle_s)
    with pacs_client(settings, pacs) as client:
        return client.fetch_series(study, series, folder, max_bytes=max_bytes, check=check)


def cached_slide(settings: Settings, name: str) -> Path:
    """The local path of slide ``name`` as ``locate_slide`` finds it, without fetching: a DICOMweb series
    is read from the cache only (a job fetches it), so viewing never makes the service call a PACS."""
    source = parse_dicomweb(name)
    if source is None:
        return locate_slide(settings, name)
    check_dicomweb_source(settings, *source)
    folder = cached_series(settings.data_dir / DICOMWEB, *source)
    if not (folder / COMPLETE).exists():
        raise NotFound("slide_not_cached", f"{name} is not in the local cache; a job on it fetches it")
    touch(folder)
    return folder


def local_name(settings: Settings, path: Path) -> str:
    """The name of a slide under the slide root: its path relative to the root (a DICOM series: its folder)."""
    return path.relative_to(settings.slide_root.resolve()).as_posix()


def slide_name(settings: Settings, slide: str) -> str:
    """The name a slide's jobs and queue use: a DICOM series is named by its folder, whichever of its
    instances is given. A name that no longer resolves (the slide moved) is kept as given."""
    if parse_dicomweb(slide):
        return slide
    try:
        return local_name(settings, canonical_slide(resolve_slide_path(settings.slide_root, slide)))
    except DomainError:
        return slide
