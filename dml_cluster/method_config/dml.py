"""Settings of Deep Mutual Learning and its variants (methods/dml.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from dml_cluster.method_config.base import MethodSettings


class DMLConfig(MethodSettings):
    """`dml`, `dml_js`, `dml_e`, `independent`: students learn from each other only."""

    name: Literal["dml", "dml_js", "dml_e", "independent"] = "dml"
    weight: float = Field(1.0, ge=0.0, description="weight of the mimicry term")
    temperature: float = Field(1.0, gt=0.0, description="of the mimicry term")
    unlabelled_mimicry: bool = Field(
        True, description="semi-supervised: mimicry on unlabelled samples too"
    )
    ensemble: Literal["probs", "logits"] = Field(
        "probs",
        description="dml_e's target: the mean of the other students' probabilities, or "
        "softmax of the mean of their log-probabilities (a normalised geometric mean: sharper)",
    )

    def read_temperatures(self) -> dict[str, set[float]]:
        """Fellow students at `temperature` (independent: nothing)."""
        return {} if self.name == "independent" else {"student": {self.temperature}}

    @model_validator(mode="after")
    def _ensemble_of_dml_e(self) -> DMLConfig:
        if self.ensemble != "probs" and self.name != "dml_e":
            raise ValueError(f"ensemble is a setting of dml_e only, not of {self.name}")
        return self
