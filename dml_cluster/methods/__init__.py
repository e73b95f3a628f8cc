"""Learning methods: what a student minimises given its logits, labels and the cohort's predictions.

One small file per family, with its settings in `dml_cluster.method_config` under the same file
name. A method is a callable `(logits, target, view) -> LossParts` that declares what it reads
beyond logits (`needs`: features at named layers, an in-process teacher, sample indices); the
`StepView` brings all of it, keeps fellow students' predictions (`peers`) apart from teachers'
(`teachers`) and says where training is (`progress`, for warm-ups and stages). Teachers never
call a method: they are frozen. The interface is described in `methods/base.py`.

- `dml`, `dml_js`, `dml_e`, `independent` (dml.py): students learn from each other only.
- `kd` (kd.py): Hinton KD from the teachers; with `peer_weight` > 0 also DML among students.
- `dkd` (dkd.py): decoupled KD (TCKD + NCKD) from the teachers, linear warm-up.
- `fitnets` (fitnets.py): hints then KD, the teacher inside the student's process.
- `at` (at.py): attention transfer, the teacher inside the student's process.
"""

from __future__ import annotations

from dml_cluster.method_config.base import MethodSettings
from dml_cluster.methods import at, dkd, dml, fitnets, kd
from dml_cluster.methods.base import (
    LossParts,
    Method,
    Needs,
    Predictions,
    Progress,
    Shapes,
    StepView,
    TeacherOutputs,
)

__all__ = [
    "METHODS",
    "LossParts",
    "Method",
    "Needs",
    "Predictions",
    "Progress",
    "Shapes",
    "StepView",
    "TeacherOutputs",
    "build_method",
]

METHODS: dict[str, type[Method]] = {
    "dml": dml.MutualLearning,
    "dml_js": dml.SymmetricMutualLearning,
    "dml_e": dml.EnsembleTeacher,
    "independent": dml.Independent,
    "kd": kd.KnowledgeDistillation,
    "dkd": dkd.DecoupledKD,
    "fitnets": fitnets.FitNets,
    "at": at.AttentionTransfer,
}
"""The registry: `method.name` -> the method (its settings: `dml_cluster.method_config`)."""


def build_method(cfg: MethodSettings) -> Method:
    """The method a validated `method` section names."""
    return METHODS[cfg.name](cfg)
