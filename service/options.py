"""One options vocabulary for segmenting a slide.

``SegmentationDefaults`` holds every option a deployment can set (Settings inherits it, so each is
``UGA_<NAME>`` in the environment); ``SegmentationOptions`` adds the per-slide ``slide_mpp`` and is
what the engine, the pipeline, the job worker and the CLI receive: resolved once, from the settings
plus a request's or the command line's overrides. A job's identity is derived from it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from service.errors import InvalidInput
from service.vocabulary import Measure, Scoring, Selection

# Options a client may choose per job (HTTP and CLI); the rest are deployment settings only.
REQUEST_FIELDS = ("mpp", "slide_mpp", "uncertainty", "scoring", "selection", "queue_size", "patch_um")
# A client's per-job choice is bounded tighter than what a deployment may set (ge, le).
REQUEST_BOUNDS = {"mpp": (0.25, 16), "queue_size": (1, 200), "patch_um": (64, 8192)}


class SegmentationDefaults(BaseModel):
    """Options with a deployment-wide default."""

    mpp: float = Field(1.0, ge=0.05, le=100, description="analysis resolution in µm/px (the paper: 1.0)")
    tile: int = Field(256, ge=64, le=4096, description="tile side in analysis pixels (multiple of 8)")
    overlap: int = Field(32, ge=0, le=512, description="tile overlap in pixels, blended (at most half the tile)")
    batch: int = Field(2, ge=1, le=64, description="tiles per ONNX Runtime call")
    threshold: float = Field(0.5, gt=0, lt=1, description="tumour threshold on the mean probability")
    uncertainty: Measure = Field("uga", description="uncertainty measure that ranks the review queue")
    scoring: Scoring = Field(
        "mean", description="patch score: mean over tissue, the paper's, or mean over predicted-normal tissue"
    )
    selection: Selection = Field(
        "uncertainty", description="how the queue picks patches: uncertainty (top-k), class_balanced, random"
    )
    queue_size: int = Field(10, ge=1, le=1000, description="patches in the ranked review queue per slide")
    patch_um: float = Field(256.0, gt=0, le=100_000, description="review patch side in µm (the paper used 1024)")
    min_tissue: float = Field(0.5, ge=0, le=1, description="minimum tissue fraction of a review patch")

    @model_validator(mode="after")
    def _tile_geometry(self):
        if self.tile % 8 or self.overlap * 2 > self.tile:
            raise ValueError("tile must be a multiple of 8 and overlap at most half the tile")
        return self


class SegmentationOptions(SegmentationDefaults):
    """Everything that decides a segmentation's result, resolved."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    slide_mpp: float | None = Field(
        None, ge=0.05, le=100, description="level-0 µm/px, for a slide without it in its metadata"
    )

    @classmethod
    def resolve(cls, defaults: SegmentationDefaults, overrides: Mapping[str, Any] | None = None) -> SegmentationOptions:
        """``defaults`` (e.g. the settings) with every override that is not None applied on top.

        Raises InvalidInput (one line naming the option) when the result is not a valid option set.
        """
        values = {name: getattr(defaults, name) for name in SegmentationDefaults.model_fields}
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        try:
            return cls(**values)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ())) or "options"
            raise InvalidInput("invalid_options", f"{where}: {first['msg']}", {"option": where}) from None

    def key(self) -> str:
        """Canonical hash of every option: two option sets give the same key only when all are equal."""
        return hashlib.sha256(json.dumps(self.model_dump(), sort_keys=True).encode()).hexdigest()

    @property
    def patch_px(self) -> int:
        """Review patch side in analysis pixels."""
        return max(1, round(self.patch_um / self.mpp))


def _optional(name: str) -> tuple[Any, Any]:
    """The option as a request field: None by default, with the request's bounds where tighter."""
    info = SegmentationOptions.model_fields[name]
    if name in REQUEST_BOUNDS:
        low, high = REQUEST_BOUNDS[name]
        return info.annotation | None, Field(None, ge=low, le=high, description=info.description)
    field = Field(None, description=info.description)
    field.metadata = list(info.metadata)  # the same bounds as the resolved option
    return info.annotation | None, field


# The per-job request: the client-settable options, each optional (None = the server's default).
SegmentationRequest = create_model(
    "JobOptions",
    __config__=ConfigDict(extra="forbid"),
    __doc__="Segmentation options; omitted ones take the server's defaults.",
    **{name: _optional(name) for name in REQUEST_FIELDS},
)
