"""Settings of Attention Transfer from a teacher inside each student's process (methods/at.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from dml_cluster.method_config.base import MethodSettings
from dml_cluster.schema import PeerConfig


class ATConfig(MethodSettings):
    """`at`: CE + beta/2 * sum over (student, teacher) layer pairs of the mean squared distance
    of their attention maps. Teacher peers on the bus are refused (they would be unused)."""

    name: Literal["at"] = "at"
    teacher: PeerConfig = Field(description="the teacher run inside each student's process")
    layers: list[tuple[str, str]] = Field(
        min_length=1,
        description="(student module, teacher module) pairs, e.g. [[blocks.1, blocks.1]]",
    )
    beta: float = Field(
        1000.0, ge=0.0, description="weight of the AT term (halved, as in the paper's code)"
    )
    p: float = Field(2.0, gt=0.0, description="attention map: channel mean of |A|^p")

    @field_validator("teacher")
    @classmethod
    def _is_teacher(cls, teacher: PeerConfig) -> PeerConfig:
        if teacher.role != "teacher":
            raise ValueError("the at teacher needs role: teacher")
        return teacher
