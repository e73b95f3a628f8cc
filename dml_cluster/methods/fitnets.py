"""FitNets (Romero et al. 2015): hints, then KD, with the teacher inside the student's process.

Stage 1 (the first `hint_epochs` epochs): L = MSE(r(guided(x)), hint(x)), where `guided` is the
student's `guided_layer`, `hint` the teacher's `hint_layer` and r a regressor (a convolution for
feature maps, a linear layer for flat features). Only the student's layers up to the guided one
and r receive gradients (the loss does not depend on the others; with `zero_grad(set_to_none)`
the optimizer skips them, weight decay included). Stage 2: Hinton KD,
(1 - a) CE + a T^2 KL(p_t^T || p_s^T), on the whole student; r is no longer used. r is the
student's extra module (`extra_modules`): the peer builder puts it in the student's optimizer,
checkpoints save it. The guided layer, the teacher and its hint layer are declared (`needs`); the
trainer hooks, builds and runs them (dml_cluster.method_inputs) and hands the outputs over in the
step's view.

Why the teacher runs here and not as a peer on the bus: a hint is a feature map per sample
(e.g. 128 x 7 x 7 floats = 25 KB, against 40 bytes of 10 class probabilities), 600 times what DML
ships per batch, and stage 2 needs the teacher's logits on the very same batch anyway. The
teacher (`method.teacher`: model, args, checkpoint) is loaded, frozen and run in eval mode under
no_grad in every student's process, in the run's precision and compile settings like every peer,
once per batch for all students the process hosts on one device.
Fellow students are not mimicked, and teacher peers on the bus are refused (they would be unused).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dml_cluster import losses
from dml_cluster.errors import ConfigError
from dml_cluster.method_config.fitnets import FitNetsConfig
from dml_cluster.methods.base import LossParts, Method, Needs, Shapes, StepView
from dml_cluster.methods.kd import distill_from


def build_regressor(student: torch.Size, teacher: torch.Size) -> nn.Module:
    """Maps the guided layer's output [B, ...] to the hint's shape (Romero et al.'s regressor).

    Feature maps: a 3x3 convolution (padding 1) when the sizes agree, else a convolution whose
    kernel is (student size - teacher size + 1), no padding, as in the paper. Flat: linear.
    """
    if len(student) == 2 and len(teacher) == 2:
        return nn.Linear(student[1], teacher[1])
    if len(student) != 4 or len(teacher) != 4:
        raise ConfigError(
            f"config error: method.guided_layer: cannot regress a {tuple(student[1:])} output "
            f"onto a {tuple(teacher[1:])} hint (both flat or both feature maps)"
        )
    (_, c_s, h_s, w_s), (_, c_t, h_t, w_t) = student, teacher
    if (h_s, w_s) == (h_t, w_t):
        return nn.Conv2d(c_s, c_t, 3, padding=1)
    if h_s < h_t or w_s < w_t:
        raise ConfigError(
            f"config error: method.guided_layer: its {h_s}x{w_s} maps are smaller than the "
            f"hint's {h_t}x{w_t}; choose an earlier guided layer or a later hint layer"
        )
    return nn.Conv2d(c_s, c_t, (h_s - h_t + 1, w_s - w_t + 1))


class FitNets(Method):
    def __init__(self, cfg: FitNetsConfig) -> None:
        super().__init__(cfg)
        self.a, self.temperature, self.hint_epochs = cfg.kd_weight, cfg.temperature, cfg.hint_epochs
        self.hint_layer, self.guided_layer = cfg.hint_layer, cfg.guided_layer
        self._needs = Needs(
            features={cfg.guided_layer: "guided_layer"},
            teacher=cfg.teacher,
            teacher_features={cfg.hint_layer: "hint_layer"},
        )

    @property
    def needs(self) -> Needs:
        """The student's guided layer, the teacher, its hint layer."""
        return self._needs

    def extra_modules(self, peer: int, shapes: Shapes) -> dict[str, nn.Module]:
        """The regressor from the guided layer's output to the hint: trains with the student."""
        guided, hint = shapes.features[self.guided_layer], shapes.teacher_features[self.hint_layer]
        return {"regressor": build_regressor(guided, hint)}

    def __call__(self, logits: Tensor, target: Tensor, view: StepView) -> LossParts:
        assert view.teacher is not None, "FitNets declares a teacher"
        ce = losses.cross_entropy(logits, target, view.labelled)
        if view.progress.epoch < self.hint_epochs:
            guided = view.features[self.guided_layer]
            hint = view.teacher.features[self.hint_layer]
            hint_l = losses.hint_loss(view.modules["regressor"](guided), hint)
            return LossParts(hint_l, ce.detach(), hint_l)
        teacher = F.log_softmax(view.teacher.logits.float(), dim=1)
        kd = distill_from(logits, [teacher], self.temperature)
        return LossParts((1 - self.a) * ce + self.a * kd, ce, kd)
