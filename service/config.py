"""All settings, from environment variables prefixed ``UGA_`` (documented in README.md)."""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.options import SegmentationDefaults

SITE_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,31}")
MAX_SITES = 64  # each site is a label value on a few histograms: keep the series count bounded
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _check_postgres_url(url: str) -> None:
    """A ValueError naming what is wrong with a postgresql:// URL (never echoing its password)."""
    try:
        from psycopg.conninfo import conninfo_to_dict
    except ImportError:  # a serving install without PostgreSQL support: the store says so when it opens
        return
    try:
        parts = conninfo_to_dict(url)
    except Exception as exc:  # noqa: BLE001 - psycopg's ProgrammingError; its text may quote the URL
        reason = str(exc).split(" in URI")[0].splitlines()[0]
        raise ValueError(f"is not a valid postgresql:// URL ({reason})") from None
    if not all(p.isdigit() for p in str(parts.get("port", "0")).split(",")):
        raise ValueError(f"port {parts['port']!r} is not a number")


def bind_address(value: str) -> str:
    """``value`` as the IP address `uga serve` binds to (bentoml takes no host name), or a ValueError."""
    import ipaddress

    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address to bind to (127.0.0.1, 0.0.0.0, ::)") from None


def is_tls_or_loopback(value: str) -> bool:
    """An https:// URL, or http:// to this host only: what credentials and signing keys may cross."""
    url = urlsplit(value)
    return bool(url.hostname) and (url.scheme == "https" or (url.scheme == "http" and url.hostname in LOOPBACK))


PACKAGE_MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "baseline"


class Settings(BaseSettings, SegmentationDefaults):
    """Service configuration. Every field is ``UGA_<NAME>`` in the environment, including the
    segmentation defaults inherited from ``SegmentationDefaults`` (mpp, tile, ..., min_tissue)."""

    model_config = SettingsConfigDict(env_prefix="UGA_", extra="ignore", allow_inf_nan=False)

    # storage
    data_dir: Path = Field(Path("data"), description="data directory: SQLite store, jobs, artifacts")
    job_retention_days: float = Field(
        30.0, ge=0, le=36500, description="days a superseded job's files are kept (0: forever)"
    )
    slide_root: Path = Field(
        None, validate_default=False, description="slides are addressed relative to this root (default DATA_DIR/slides)"
    )
    baseline_dir: Path = Field(PACKAGE_MODEL_DIR, description="shipped baseline ensemble (ONNX + card)")
    # inference
    ort_threads: int = Field(0, ge=0, description="ONNX Runtime intra-op threads per worker (0 = all cores)")
    providers: Literal["auto", "cpu", "cuda"] = Field("auto", description="ONNX Runtime execution provider")
    # service
    host: str = Field("127.0.0.1", description="`uga serve` bind address")
    port: int = Field(3000, ge=1, le=65535, description="`uga serve` port")
    workers: int = Field(1, ge=1, le=64, description="BentoML worker processes (each runs one job at a time)")
    auth_tokens_file: Path | None = Field(None, description="file with lines 'ROLE TOKEN' (a Kubernetes Secret)")
    auth_tokens: str | None = Field(None, description="'ROLE:TOKEN,ROLE:TOKEN' (alternative to the file)")
    auth_disabled: bool = Field(False, description="serve without authentication (logged as a warning)")
    # OpenID Connect: bearer JWTs from the hospital's identity provider (on when oidc_issuer is set)
    oidc_issuer: str | None = Field(None, description="expected 'iss' of ID provider JWTs; setting it turns OIDC on")
    oidc_audience: str | None = Field(None, description="expected 'aud' (this service's client id at the IdP)")
    oidc_jwks_url: str | None = Field(None, description="the IdP's JWKS endpoint (its public signing keys)")
    oidc_roles_claim: str = Field("roles", description="claim with the IdP roles; dots walk into objects")
    oidc_role_map: str | None = Field(None, description="'IDP_ROLE=ROLE,...' onto viewer/annotator/admin")
    oidc_name_claim: str = Field("preferred_username", description="claim naming the person ('sub' if absent)")
    oidc_algorithms: str = Field("RS256,ES256", description="accepted signature algorithms (asymmetric only)")
    oidc_leeway_s: float = Field(30.0, ge=0, le=600, description="clock skew allowed on exp/nbf/iat, seconds")
    oidc_jwks_cache_s: float = Field(300.0, gt=0, le=86400, description="how long fetched JWKS keys are used")
    oidc_jwks_timeout_s: float = Field(5.0, gt=0, le=60, description="timeout of one JWKS fetch")
    oidc_clients: str = Field(
        "", max_length=2048, description="client ids allowed to call ('azp' or 'client_id'); empty: any"
    )
    # the review page's sign-in with the hospital account: authorization code + PKCE, a public client
    oidc_client_id: str | None = Field(None, description="the review page's public client id at the IdP")
    oidc_authorize_url: str | None = Field(None, description="the IdP's authorization endpoint (page sign-in)")
    oidc_token_url: str | None = Field(None, description="the IdP's token endpoint (page sign-in; CORS for the page)")
    oidc_scope: str = Field("openid profile", max_length=512, description="scopes the review page asks for")
    oidc_page_token: Literal["id_token", "access_token"] = Field(
        "id_token", description="which token of the IdP's answer the page sends as its bearer token"
    )
    max_body_mb: float = Field(64.0, gt=0, description="largest correction mask (PNG) body, MiB")
    max_geojson_mb: float = Field(
        8.0, gt=0, description="largest GeoJSON correction body, MiB (parsing it takes about 25x that in memory)"
    )
    max_json_kb: int = Field(64, ge=1, description="largest body of any other request (JSON), KiB")
    max_correction_px: int = Field(
        4096, ge=64, le=16384, description="largest side of a correction's mask, pixels at its µm/px"
    )
    max_geojson_vertices: int = Field(100_000, ge=3, description="most polygon vertices in one GeoJSON correction")
    max_job_tiles: int = Field(50_000, ge=1, description="most tiles one segmentation job may have (checked at submit)")
    max_job_s: float = Field(7200.0, gt=0, description="wall time after which a running job is stopped and failed")
    max_active_jobs: int = Field(200, ge=1, description="jobs waiting or running in all; more: 429 with Retry-After")
    max_active_jobs_per_caller: int = Field(20, ge=1, description="jobs one caller may have waiting or running")
    header_timeout_s: float = Field(10.0, gt=0, le=300, description="a request's headers must arrive within this")
    body_timeout_s: float = Field(30.0, gt=0, le=600, description="longest wait for the next chunk of a body (408)")
    body_total_s: float = Field(120.0, gt=0, le=3600, description="longest time to receive a whole request body")
    max_connections: int = Field(256, ge=1, description="open connections per worker process; more are closed")
    min_free_mb: float = Field(256.0, ge=0, description="/readyz fails when the data volume has less free space, MiB")
    job_stale_s: float = Field(60.0, gt=0, description="a running job without heartbeat this long is requeued")
    model_poll_s: float = Field(1.0, gt=0, le=10, description="how often each worker checks the current-model pointer")
    model_load_retry_s: float = Field(
        30.0, ge=0, le=3600, description="how long a worker retries a new version that fails to load before failing it"
    )
    # human-in-the-loop
    finetune_min_corrections: int = Field(5, ge=1, description="new corrections that start a fine-tune run")
    finetune_steps: int = Field(40, ge=1, description="optimiser steps per ensemble member per run")
    finetune_batch: int = Field(8, ge=1, le=64, description="fine-tune batch size")
    finetune_patch: int = Field(
        128, ge=64, le=512, multiple_of=8, description="fine-tune crop side, pixels (multiple of 8)"
    )
    finetune_lr: float = Field(3e-4, gt=0, description="fine-tune learning rate")
    finetune_replay_share: float = Field(0.5, ge=0, lt=1, description="share of each batch replayed from source")
    finetune_steps_per_mm2: float = Field(
        0.0, ge=0, description="steps per member per mm² of corrected area (0: always UGA_FINETUNE_STEPS)"
    )
    finetune_max_steps: int = Field(400, ge=1, description="cap on the area-scaled steps per member")
    finetune_holdout_every: int = Field(
        0, ge=0, description="hold every n-th correction out for early stopping (0: none)"
    )
    finetune_symmetric: bool = Field(False, description="augment the source replay as the corrections are")
    finetune_source_bank: Path | None = Field(
        None,
        description="the baseline's source training bank (npz: images, masks, slides; `python -m models.train` "
        "writes it): the runner then retrains each member on its part of it plus the corrections",
    )
    finetune_device: Literal["auto", "cpu", "cuda"] = Field("auto", description="runner's torch device")
    finetune_threads: int = Field(1, ge=1, description="torch threads of the runner (leave cores to serving)")
    holdout_every: int = Field(
        5, ge=0, description="every n-th corrected region (by hash of slide and region) is held out for the gate"
    )
    gate_margin: float = Field(0.03, ge=0, le=1, description="allowed drop of Dice on the frozen source holdout")
    gate_min_heldout: int = Field(2, ge=1, description="held-out corrections needed before they gate promotion")
    runner_poll_s: float = Field(5.0, gt=0, description="runner: seconds between checks for work")
    store_metrics: Literal["serve", "runner"] = Field(
        "serve",
        description="who exports the store-derived metrics: `serve` (one pod) or `runner` (replicas; the "
        "default with UGA_DATABASE_URL)",
    )
    runner_metrics_host: str = Field("127.0.0.1", description="runner: bind address of its /metrics")
    runner_metrics_port: int = Field(9464, ge=0, le=65535, description="runner: port of its /metrics (0 = none)")
    database_url: str | None = Field(
        None, description="postgresql://... : the store shared by several replicas (unset: SQLite in UGA_DATA_DIR)"
    )
    database_pool_size: int = Field(8, ge=1, le=100, description="PostgreSQL connections per process (a pool)")
    database_timeout_s: float = Field(
        10.0, gt=0, le=300, description="longest wait for a database connection; then requests get 503"
    )
    callbacks: str = Field("", description="'NAME=URL,...' a job may name in `callback` (told when it ends); '' = none")
    callback_secret: str | None = Field(
        None, description="HMAC-SHA256 key signing callback bodies (>= 32 characters); needed with UGA_CALLBACKS"
    )
    callback_max_attempts: int = Field(8, ge=1, le=100, description="sends of one callback before it is failed")
    callback_timeout_s: float = Field(10.0, gt=0, le=120, description="timeout of one callback POST")
    callback_backoff_s: float = Field(
        5.0, gt=0, le=3600, description="wait before a callback's first retry; doubles each time, at most 1 h"
    )
    pacs: str = Field(
        "", description="'NAME=URL,...' DICOMweb PACS a job may read from (credentials as URL userinfo); '' = none"
    )
    allow_plain_http: bool = Field(
        False, description="allow http:// (no TLS) PACS and callback URLs off this host, on a network you trust"
    )
    dicomweb_cache_mb: float = Field(20000.0, gt=0, description="local cache of series fetched from a PACS, MiB")
    dicomweb_cache_idle_s: float = Field(
        3600.0, ge=0, description="a cached series used more recently than this is never evicted"
    )
    dicomweb_timeout_s: float = Field(60.0, gt=0, le=3600, description="timeout of one DICOMweb request")
    dicomweb_retries: int = Field(2, ge=0, le=10, description="retries of a DICOMweb request (connection, 5xx)")
    sites: str = Field("", description="'SITE,SITE,...' a job may name (hospital, scanner, stain batch); '' = none")
    # the review page: deep-zoom tiles and overlay images, per serving process
    review_claim_s: float = Field(
        900.0, ge=30, le=86400, description="a patch opened for review is held for that reviewer this long (renewed)"
    )
    tile_cache_mb: float = Field(128.0, ge=0, le=65536, description="encoded deep-zoom tiles kept in memory, MiB")
    tile_open_slides: int = Field(16, ge=1, le=1024, description="slides kept open for deep-zoom tiles")
    overlay_max_px: int = Field(
        2048, ge=256, le=8192, description="longest side of a job's overlay images (outline, heat maps), pixels"
    )

    @field_validator("data_dir", "slide_root", "baseline_dir", mode="before")
    @classmethod
    def _path_given(cls, value: object) -> object:
        if isinstance(value, str) and not value.strip():  # '' would be the working directory
            raise ValueError("is empty: give a directory (unset it for the default)")
        return value

    @field_validator("host")
    @classmethod
    def _bind_address(cls, value: str) -> str:
        return bind_address(value)

    @field_validator("data_dir", "slide_root")
    @classmethod
    def _not_a_file(cls, value: Path | None) -> Path | None:
        if value is not None and value.exists() and not value.is_dir():
            raise ValueError(f"{value} is a file, not a directory")
        return value

    @model_validator(mode="after")
    def _slide_root_in_data_dir(self) -> Settings:
        if self.slide_root is None:  # follows UGA_DATA_DIR unless set on its own
            self.slide_root = self.data_dir / "slides"
        return self

    @model_validator(mode="after")
    def _page_sign_in_is_complete(self) -> Settings:
        if self.oidc_client_id and not (self.oidc_authorize_url and self.oidc_token_url and self.oidc_issuer):
            raise ValueError(
                "UGA_OIDC_CLIENT_ID (the review page's sign-in) needs UGA_OIDC_AUTHORIZE_URL, UGA_OIDC_TOKEN_URL "
                "and UGA_OIDC_ISSUER"
            )
        clients = {c.strip() for c in self.oidc_clients.split(",") if c.strip()}
        if self.oidc_client_id and clients and self.oidc_client_id not in clients:
            raise ValueError(
                f"UGA_OIDC_CLIENTS leaves out the review page's own UGA_OIDC_CLIENT_ID {self.oidc_client_id!r}: "
                "add it, or no one could sign in on the page"
            )
        return self

    @field_validator("oidc_authorize_url", "oidc_token_url", "oidc_jwks_url")
    @classmethod
    def _check_idp_url(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if not is_tls_or_loopback(value):
            raise ValueError("must be an https:// URL (http:// only on loopback)")
        return value

    @field_validator("database_url")
    @classmethod
    def _check_database(cls, value: str | None) -> str | None:
        if value and not value.startswith(("postgresql://", "postgres://")):
            raise ValueError("must be a postgresql:// URL (leave it unset for SQLite in UGA_DATA_DIR)")
        if value:
            _check_postgres_url(value)
        return value or None

    @field_validator("sites")
    @classmethod
    def _check_sites(cls, value: str) -> str:
        names = [n.strip() for n in value.split(",") if n.strip()]
        bad = [n for n in names if not SITE_NAME.fullmatch(n)]
        if bad:
            raise ValueError(f"site names are 1-32 of a-z 0-9 . _ - (starting alphanumeric), not {bad[0]!r}")
        if len(names) > MAX_SITES:
            raise ValueError(f"at most {MAX_SITES} sites, got {len(names)}")
        return ",".join(dict.fromkeys(names))

    @field_validator("callbacks")
    @classmethod
    def _check_callbacks(cls, value: str) -> str:
        for entry in (e.strip() for e in value.split(",") if e.strip()):
            name, _, url = entry.partition("=")
            if not SITE_NAME.fullmatch(name.strip()):
                raise ValueError(f"callback names are 1-32 of a-z 0-9 . _ - (NAME=URL), not {name.strip()!r}")
            parts = urlsplit(url.strip())
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"callback {name.strip()}: {url.strip()!r} is not an http(s) URL")
        return value

    @model_validator(mode="after")
    def _no_plain_http_off_this_host(self) -> Settings:
        """PACS passwords and callback bodies (accession numbers, UIDs) cross the network only in TLS,
        unless the operator says the network is trusted (UGA_ALLOW_PLAIN_HTTP)."""
        if self.allow_plain_http:
            return self
        for setting, targets in (("UGA_PACS", self.pacs), ("UGA_CALLBACKS", self.callbacks)):
            for entry in (e.strip() for e in targets.split(",") if e.strip()):
                url = urlsplit(entry.partition("=")[2].strip())
                if url.scheme == "http" and url.hostname not in LOOPBACK:
                    raise ValueError(
                        f"{setting}: {entry.partition('=')[0].strip()} is plain http:// to {url.hostname}; use "
                        "https://, or set UGA_ALLOW_PLAIN_HTTP=true on a network you trust"
                    )
        return self

    @model_validator(mode="after")
    def _one_store_metrics_exporter(self) -> Settings:
        """Replicas sharing PostgreSQL would each export the store's metrics (every sum N times, and
        KEDA's query would grow with the replicas it adds): the one runner exports them unless told."""
        if self.database_url and "store_metrics" not in self.model_fields_set:
            self.store_metrics = "runner"
        return self

    @model_validator(mode="after")
    def _callbacks_are_signed(self) -> Settings:
        if self.callbacks.strip() and len(self.callback_secret or "") < 32:
            raise ValueError("UGA_CALLBACKS needs UGA_CALLBACK_SECRET (at least 32 characters) to sign the events")
        return self

    @field_validator("pacs")
    @classmethod
    def _check_pacs(cls, value: str) -> str:
        for entry in (e.strip() for e in value.split(",") if e.strip()):
            name, _, url = entry.partition("=")
            parts = urlsplit(url.strip())
            if not SITE_NAME.fullmatch(name.strip()) or parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"PACS entries are NAME=http(s)://host/dicomweb-root, not {entry.split('@')[-1]!r}")
        return value

    @property
    def pacs_endpoints(self):
        """Configured DICOMweb PACS by name (never a URL from a request)."""
        from service.integrations.dicomweb import parse_endpoints

        return parse_endpoints(self.pacs)

    @property
    def callback_targets(self) -> dict[str, str]:
        """Configured callbacks by name (never a URL from a request: no server-side request forgery)."""
        pairs = (e.partition("=") for e in self.callbacks.split(",") if e.strip())
        return {name.strip(): url.strip() for name, _, url in pairs}

    @property
    def site_names(self) -> tuple[str, ...]:
        """The configured sites a job may name (empty: none, the ``site`` field is refused)."""
        return tuple(n for n in self.sites.split(",") if n)


def settings_error(exc: ValidationError) -> str:
    """One line naming the environment variable at fault: ``UGA_PORT: Input should be ...``."""
    first = exc.errors()[0]
    where = "_".join(str(p) for p in first["loc"]).upper()
    message = first["msg"].removeprefix("Value error, ")  # pydantic's wording of our own ValueErrors
    return f"{'UGA_' + where if where else 'settings'}: {message}"


@lru_cache
def get_settings() -> Settings:
    return Settings()
