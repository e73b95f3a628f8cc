"""The config's building blocks shared by `config` and the method settings (`method_config`):
the strict base every section derives from, and a peer's section. Torch-free, like them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Strict(BaseModel):
    """Unknown keys are errors; a validated config never changes."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class PeerConfig(Strict):
    """One network of the cohort."""

    name: str | None = None
    model: str
    args: dict[str, Any] = Field(default_factory=dict)
    weights: str | None = Field(
        None,
        description="students: initial weights, a local state_dict file (a plain state_dict, or "
        "one under 'model'/'state_dict') that fits the model as built for this data; loaded "
        "strictly after the seeded initialisation; nothing is ever downloaded",
    )
    lr: float | None = Field(None, gt=0.0, description="overrides optim.lr for this peer")
    role: Literal["student", "teacher"] = Field(
        "student", description="a teacher is frozen: it publishes its predictions and never learns"
    )
    checkpoint: str | None = Field(
        None,
        description="teachers: the weights to load (a final/<peer>.pt, a checkpoint's "
        "step-N/<peer>.pt, or a checkpoint's step-N folder); none for a model that comes with "
        "its trained weights (an hf: folder with weights)",
    )

    @model_validator(mode="after")
    def _teacher_weights(self) -> PeerConfig:
        if self.role == "student" and self.checkpoint:
            raise ValueError(
                "checkpoint is for teachers (role: teacher); a student's initial weights are "
                "`weights`"
            )
        if self.role == "teacher" and self.weights:
            raise ValueError("weights is for students; a teacher loads its `checkpoint`")
        return self


class NamedPeerConfig(PeerConfig):
    """A peer of a resolved cohort (`Config.peers`): its name is always set."""

    name: str
