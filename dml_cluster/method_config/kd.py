"""Settings of Hinton knowledge distillation from teacher peers (methods/kd.py)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from dml_cluster.method_config.base import MethodSettings


class KDConfig(MethodSettings):
    """`kd`: (1 - a) CE + a T^2 KL from the cohort's teachers, optionally plus DML."""

    name: Literal["kd"] = "kd"
    teachers: ClassVar[Literal["none", "required"]] = "required"
    kd_weight: float = Field(0.9, ge=0.0, le=1.0, description="a in (1 - a) CE + a T^2 KL")
    temperature: float = Field(4.0, gt=0.0, description="T of the KD term")
    peer_weight: float = Field(
        0.0, ge=0.0, description="weight of DML links to fellow students (teacher + DML)"
    )

    def read_temperatures(self) -> dict[str, set[float]]:
        """Teachers at `temperature`; fellow students at T = 1 when `peer_weight` > 0."""
        read = {"teacher": {self.temperature}}
        if self.peer_weight > 0:
            read["student"] = {1.0}
        return read
