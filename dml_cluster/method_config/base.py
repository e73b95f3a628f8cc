"""What every method's settings have in common."""

from __future__ import annotations

from typing import ClassVar, Literal, get_args

from dml_cluster.schema import Strict


class MethodSettings(Strict):
    """The base of a method family's settings (the `method` section of a config).

    A family narrows `name` to a Literal of its method names (the union in `method_config` is
    discriminated on it) and declares what it needs from the cohort's teacher peers: "none"
    (they would be ignored, so a cohort with teachers is refused) or "required" (at least one).
    """

    name: str
    teachers: ClassVar[Literal["none", "required"]] = "none"

    def read_temperatures(self) -> dict[str, set[float]]:
        """By sender role ("student", "teacher"): the temperatures at which a student's loss
        reads that role's predictions from the bus (none: it does not learn from them). A
        sampled encoding draws each sender's ids at its receivers' one temperature."""
        return {}

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The method names this family answers to."""
        return get_args(cls.model_fields["name"].annotation)
