"""Settings of FitNets, hints then KD from a teacher inside each student's process
(methods/fitnets.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from dml_cluster.method_config.base import MethodSettings
from dml_cluster.schema import PeerConfig


class FitNetsConfig(MethodSettings):
    """`fitnets`: stage 1 regresses the student's guided layer onto the teacher's hint layer;
    stage 2 is KD. Teacher peers on the bus are refused (they would be unused)."""

    name: Literal["fitnets"] = "fitnets"
    teacher: PeerConfig = Field(description="the teacher run inside each student's process")
    guided_layer: str = Field(description="student module, e.g. blocks.1")
    hint_layer: str = Field(description="teacher module, e.g. blocks.1")
    hint_epochs: int = Field(1, ge=0, description="epochs of stage 1 (hints only)")
    kd_weight: float = Field(0.9, ge=0.0, le=1.0, description="stage 2: a in (1 - a) CE + a KD")
    temperature: float = Field(4.0, gt=0.0, description="stage 2: T of the KD term")

    @field_validator("teacher")
    @classmethod
    def _is_teacher(cls, teacher: PeerConfig) -> PeerConfig:
        if teacher.role != "teacher":
            raise ValueError("the fitnets teacher needs role: teacher")
        return teacher
