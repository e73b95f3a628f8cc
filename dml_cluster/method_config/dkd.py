"""Settings of decoupled knowledge distillation from teacher peers (methods/dkd.py)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from dml_cluster.method_config.base import MethodSettings


class DKDConfig(MethodSettings):
    """`dkd`: CE + warm-up * (alpha TCKD + beta NCKD) from the teachers, optionally plus DML."""

    name: Literal["dkd"] = "dkd"
    teachers: ClassVar[Literal["none", "required"]] = "required"
    alpha: float = Field(1.0, ge=0.0, description="weight of TCKD")
    beta: float = Field(8.0, ge=0.0, description="weight of NCKD")
    temperature: float = Field(4.0, gt=0.0, description="T of TCKD and NCKD")
    warmup_epochs: int = Field(20, ge=0, description="epochs of linear warm-up of DKD")
    peer_weight: float = Field(
        0.0, ge=0.0, description="weight of DML links to fellow students (teacher + DML)"
    )

    def read_temperatures(self) -> dict[str, set[float]]:
        """Teachers at `temperature`; fellow students at T = 1 when `peer_weight` > 0."""
        read = {"teacher": {self.temperature}}
        if self.peer_weight > 0:
            read["student"] = {1.0}
        return read
