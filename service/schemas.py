"""The API's request and response models (pydantic v2); the job payload is GenerationCreate.

Bounds that depend on the deployment (prompt length, steps, size, n_images) are checked
against Settings in :mod:`service.validation`, so the models stay importable without settings
and the OpenAPI schema documents the shape.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, HttpUrl

from service.policy import DetectRule
from steering.edits import ConceptEdit, Direction

SEED_LIMIT = 2**63  # seeds are below this (torch generators take a signed 64-bit seed)

Status = Literal["queued", "running", "succeeded", "failed", "canceled"]


class ConceptEditIn(BaseModel):
    """One concept to suppress or amplify; gamma/percentile default to the bundle's values."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., min_length=1, max_length=100, examples=["red"])
    direction: Direction = Direction.SUPPRESS
    gamma: float | None = Field(None, allow_inf_nan=False,
                                description="Strength; 0 turns the edit off; the "
                                "concept's gamma_range bounds it (GET /v1/concepts)")
    percentile: float | None = Field(None, ge=0.0, lt=100.0, allow_inf_nan=False,
                                     description="Features above this importance percentile")

    def to_edit(self) -> ConceptEdit:
        """The core's edit (defaults still unfilled: resolve_edits fills them)."""
        return ConceptEdit(self.name, self.gamma, self.percentile, self.direction)


class GenerationCreate(BaseModel):
    """A generation request: one UNet batch of n_images images, image i with seed + i."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(..., min_length=1, examples=["a red circle on a striped background"])
    negative_prompt: str | None = None
    concepts: list[ConceptEditIn] = Field(default_factory=list, max_length=32)
    # strict: true, 2.5 or "2" are not a step count (lax pydantic would take true as 1)
    seed: int | None = Field(None, ge=0, lt=SEED_LIMIT, strict=True,
                             description="Default: random (returned)")
    steps: int = Field(50, ge=1, strict=True)
    guidance: float = Field(7.5, ge=0.0, le=30.0, allow_inf_nan=False)
    width: int | None = Field(None, strict=True,
                              description="Multiple of 8; default: the model's size")
    height: int | None = Field(None, strict=True,
                               description="Multiple of 8; default: the model's size")
    n_images: int = Field(1, ge=1, strict=True)
    scheduler: Literal["ddim"] = Field("ddim", description="Only DDIM (bundles are made for it)")
    webhook: HttpUrl | None = Field(None, description="POSTed the finished job, signed "
                                    "(X-Steer-Signature: sha256=HMAC(secret, body))")


class BatchCreate(BaseModel):
    """Several generation requests submitted together; each becomes its own job."""

    model_config = ConfigDict(extra="forbid")

    requests: list[GenerationCreate] = Field(..., min_length=1)
    webhook: HttpUrl | None = None


class Progress(BaseModel):
    step: int
    total: int


class Timings(BaseModel):
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    queued_s: float | None = None
    run_s: float | None = None
    generate_s: float | None = None


class ImageOut(BaseModel):
    id: str
    seed: int
    url: str = Field(..., description="Signed, expiring link; works in an <img> tag")


class Links(BaseModel):
    self: str
    cancel: str


class PolicyEdit(BaseModel):
    """A suppression a content policy applied (or a request edit it replaced)."""

    concept: str
    direction: Direction
    gamma: float
    percentile: float


class PolicyCheck(BaseModel):
    """One detection rule of the content policy applied to one image."""

    concept: str
    score: float = Field(..., description="Detection score before any edit (≈ 1: a typical "
                         "prompt of the concept, ≈ 0: absent)")
    threshold: float
    rule: Literal["mark", "steer", "refuse"] = Field(..., description="The rule's action")
    action: Literal["none", "mark", "steer", "refuse"] = Field(
        ..., description="The action taken: none below the threshold, else the rule's")
    reason: str
    steered_score: float | None = Field(None, description="Score of the image generated "
                                        "again with the concept suppressed (action steer)")


class PolicyImage(BaseModel):
    seed: int
    flagged: bool = Field(..., description="A `mark` rule fired: the image is returned, flagged")
    steered: bool = Field(..., description="A `steer` rule fired: the image returned was "
                          "generated again (same seed) with the concept suppressed")
    checks: list[PolicyCheck]


class PolicyReport(BaseModel):
    """What the content policy did to this generation."""

    name: str
    suppressed: list[PolicyEdit] = Field(..., description="Always-on suppressions applied "
                                         "(also listed first in `parameters.concepts`)")
    replaced: list[PolicyEdit] = Field(..., description="Edits of the request that the "
                                       "policy's suppressions replaced")
    images: list[PolicyImage] = Field(..., description="Per image (also when refused: "
                                      "then no image is returned)")
    refused: bool


class Generation(BaseModel):
    """A generation job as the API shows it."""

    id: str
    status: Status
    queue_position: int | None = Field(None, description="0 = next; only while queued")
    progress: Progress | None = None
    timings: Timings
    seeds: list[int] = Field(default_factory=list)
    parameters: dict = Field(default_factory=dict,
                             description="The parameters actually used (defaults filled)")
    provenance: dict = Field(default_factory=dict, description="Pipeline fingerprint, bundle "
                             "sha256, steering recipe and learned swaps (concept → the anchor "
                             "concept it is replaced with), scheduler, worker (once the job "
                             "ran)")
    detection: list[dict[str, float]] = Field(
        default_factory=list, description="Per image: concept -> detection score, read before "
        "the edits (bundles with detectors: 0.5 is the detector's calibrated threshold, set "
        "for a stated false-positive rate)")
    detection_after: list[dict[str, float]] = Field(
        default_factory=list, description="Per image: concept -> detection score read on the "
        "final, edited activations (bundles with detectors; empty otherwise). Policy rules "
        "judge these")
    images: list[ImageOut] = Field(default_factory=list)
    error: str | None = None
    error_code: Literal["content_policy_violation"] | None = Field(
        None, description="Set when the content policy refused the request (status failed)")
    policy: PolicyReport | None = Field(None, description="The content policy's checks and "
                                        "actions, once the job ran (null: no policy)")
    batch_id: str | None = None
    links: Links


class Batch(BaseModel):
    id: str
    status: Status | Literal["partial"]
    counts: dict[str, int]
    generations: list[Generation]


class ConceptOut(BaseModel):
    name: str
    kind: str
    default_gamma: float
    gamma_range: tuple[float, float]
    default_percentile: float


class ConceptList(BaseModel):
    bundle_sha256: str | None
    concepts: list[ConceptOut]


class PolicyOut(BaseModel):
    """The content policy applied to the caller's requests."""

    name: str | None = Field(..., description="null: this deployment has no policy")
    source: Literal["api_key", "default", "none"] = Field(
        ..., description="api_key: the caller's key names it; default: the policy file's")
    description: str = ""
    suppress: list[PolicyEdit] = Field(..., description="Always suppressed, whatever the "
                                       "request asks (defaults filled from the bundle)")
    detect: list[DetectRule] = Field(..., description="Detection rules: at score ≥ threshold, "
                                     "mark, steer (generate again suppressed) or refuse")


class ErrorDetail(BaseModel):
    """Every error response: a message saying what to do, and the field when one is at fault."""

    detail: str | list[dict]
    field: str | None = None
