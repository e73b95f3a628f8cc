"""Attention Transfer (Zagoruyko & Komodakis, ICLR 2017), the teacher in the student's process.

L = CE + beta/2 * sum over layer pairs (s, t) of mean((Q_s - Q_t)^2), where for a feature map
A [B, C, H, W], Q = L2-normalise(flatten(mean over channels of |A|^p)), per sample (p = 2 and
beta = 1000 by default, as in the authors' code). When a pair's maps differ in size, the larger
feature map is mean-pooled to the smaller by an integer factor per side (a kernel = stride
average pool, deterministic); any other ratio is a config error at build time. Computed in
float32 whatever the run's precision. The teacher is declared (`needs`) like FitNets' and run by
the trainer (dml_cluster.method_inputs); fellow students are not mimicked.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dml_cluster import losses
from dml_cluster.errors import ConfigError
from dml_cluster.method_config.at import ATConfig
from dml_cluster.methods.base import LossParts, Method, Needs, Shapes, StepView


def attention_map(features: Tensor, p: float) -> Tensor:
    """Q [B, H*W]: each sample's L2-normalised, flattened channel mean of |A|^p, in float32."""
    return F.normalize(features.float().abs().pow(p).mean(dim=1).flatten(1), dim=1)


def pooling(student: torch.Size, teacher: torch.Size) -> tuple[bool, tuple[int, int]] | None:
    """How a pair of maps [B, C, H, W] meets: (whether the student's is the one pooled, the
    kernel = stride factor per side) bringing the larger to the smaller's H x W; None when
    neither is a whole multiple of the other on both sides."""
    (h_s, w_s), (h_t, w_t) = student[-2:], teacher[-2:]
    if h_s >= h_t and w_s >= w_t and h_s % h_t == 0 and w_s % w_t == 0:
        return True, (h_s // h_t, w_s // w_t)
    if h_t >= h_s and w_t >= w_s and h_t % h_s == 0 and w_t % w_s == 0:
        return False, (h_t // h_s, w_t // w_s)
    return None


def at_term(student: Tensor, teacher: Tensor, p: float) -> Tensor:
    """mean((Q_s - Q_t)^2) of one layer pair, the larger map pooled to the smaller."""
    how = pooling(student.shape, teacher.shape)
    assert how is not None, "extra_modules checked the pair's sizes"
    pool_student, factor = how
    with torch.autocast(student.device.type, enabled=False):
        student, teacher = student.float(), teacher.float()
        if factor != (1, 1):
            if pool_student:
                student = F.avg_pool2d(student, factor)
            else:
                teacher = F.avg_pool2d(teacher, factor)
        return (attention_map(student, p) - attention_map(teacher, p)).pow(2).mean()


class AttentionTransfer(Method):
    def __init__(self, cfg: ATConfig) -> None:
        super().__init__(cfg)
        self.layers, self.beta, self.p = list(cfg.layers), cfg.beta, cfg.p
        self._needs = Needs(
            features={s: "layers" for s, _ in self.layers},
            teacher=cfg.teacher,
            teacher_features={t: "layers" for _, t in self.layers},
        )

    @property
    def needs(self) -> Needs:
        """The student's and the teacher's layers of every pair, and the teacher."""
        return self._needs

    def extra_modules(self, peer: int, shapes: Shapes) -> dict[str, nn.Module]:
        """None; checks that every pair's maps are 4-D and their sizes pool into each other."""
        for s, t in self.layers:
            a, b = shapes.features[s], shapes.teacher_features[t]
            if len(a) != 4 or len(b) != 4:
                raise ConfigError(
                    f"config error: method.layers: ({s}, {t}) gives {tuple(a[1:])} and "
                    f"{tuple(b[1:])} outputs; attention maps need feature maps [C, H, W]"
                )
            if pooling(a, b) is None:
                raise ConfigError(
                    f"config error: method.layers: ({s}, {t}) maps are {a[2]}x{a[3]} and "
                    f"{b[2]}x{b[3]}; the larger must be an integer multiple of the smaller per side"
                )
        return {}

    def __call__(self, logits: Tensor, target: Tensor, view: StepView) -> LossParts:
        assert view.teacher is not None, "AT declares a teacher"
        ce = losses.cross_entropy(logits, target, view.labelled)
        terms = [
            at_term(view.features[s], view.teacher.features[t], self.p) for s, t in self.layers
        ]
        at = self.beta / 2 * torch.stack(terms).sum()
        return LossParts(ce + at, ce, at)
