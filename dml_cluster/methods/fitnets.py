"""FitNets (Romero et al. 2015): hints, then KD, with the teacher inside the student's process.

Stage 1 (the first `hint_epochs` epochs): L = MSE(r(guided(x)), hint(x)), where `guided` is the
student's `guided_layer`, `hint` the teacher's `hint_layer` and r a regressor (a convolution for
feature maps, a linear layer for flat features). Only the student's layers up to the guided one
and r receive gradients (the loss does not depend on the others; with `zero_grad(set_to_none)`
the optimizer skips them, weight decay included). Stage 2: Hinton KD,
(1 - a) CE + a T^2 KL(p_t^T || p_s^T), on the whole student; r is no longer used.

Why the teacher runs here and not as a peer on the bus: a hint is a feature map per sample
(e.g. 128 x 7 x 7 floats = 25 KB, against 40 bytes of 10 class probabilities), 600 times what DML
ships per batch, and stage 2 needs the teacher's logits on the very same batch anyway. The
teacher (`method.teacher`: model, args, checkpoint) is loaded, frozen and run in eval mode under
no_grad in every student's process, once per batch for all students the process hosts.
Fellow students are not mimicked, and teacher peers on the bus are refused (they would be unused).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dml_cluster import losses
from dml_cluster.cohort import Peer, build_optimizer, build_scheduler, load_teacher
from dml_cluster.config import Config, MethodConfig
from dml_cluster.errors import ConfigError
from dml_cluster.methods import LossParts, Method, StepView, register
from dml_cluster.methods.kd import distill_from
from dml_cluster.models import build_model


def find_module(model: nn.Module, name: str, what: str, model_name: str) -> nn.Module:
    modules = dict(model.named_modules())
    if name not in modules or name == "":
        known = ", ".join(n for n in modules if n and n.count(".") <= 1)
        raise ConfigError(
            f"config error: method.{what}: {model_name} has no module {name!r} (some: {known})"
        )
    return modules[name]


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


class _Capture:
    """A forward hook that keeps a module's output of the last forward with autograd on."""

    def __init__(self, module: nn.Module, always: bool = False) -> None:
        self.output: Tensor | None = None
        self.always = always
        module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: Any, output: Tensor) -> None:
        if self.always or (module.training and torch.is_grad_enabled()):
            self.output = output


@register("fitnets")
class FitNets(Method):
    default_temperature = 4.0

    def __init__(self, cfg: MethodConfig) -> None:
        super().__init__(cfg)
        self.a, self.hint_epochs = cfg.kd_weight, cfg.hint_epochs
        self.teacher: nn.Module | None = None
        self._hint: _Capture | None = None
        self._guided: dict[int, _Capture] = {}
        self.regressors: dict[int, nn.Module] = {}
        self._cached: tuple[int, int, Tensor, Tensor] | None = None

    def check(self, cfg: Config) -> None:
        m = cfg.method
        for key in ("teacher", "guided_layer", "hint_layer"):
            if getattr(m, key) is None:
                raise ConfigError(f"config error: method.{key}: fitnets needs it")
        if m.teacher is not None and m.teacher.role != "teacher":
            raise ConfigError("config error: method.teacher.role: must be teacher")

    def _load_teacher(self, cfg: Config, shape: tuple[int, int, int], classes: int, device: Any):
        t = cfg.method.teacher
        assert t is not None and cfg.method.hint_layer is not None
        teacher = build_model(t.model, shape, classes, **t.args).to(device)
        self.teacher = load_teacher(teacher, t)
        hint = find_module(teacher, cfg.method.hint_layer, "hint_layer", t.model)
        self._hint = _Capture(hint, always=True)

    def attach(
        self, peer: Peer, cfg: Config, input_shape: tuple[int, int, int], classes: int
    ) -> None:
        """Hook the student's guided layer, add its regressor, and optimise both together."""
        device = next(peer.model.parameters()).device
        if self.teacher is None:
            self._load_teacher(cfg, input_shape, classes, device)
        assert self.teacher is not None and self._hint is not None and cfg.method.guided_layer
        guided = find_module(peer.model, cfg.method.guided_layer, "guided_layer", peer.config.model)
        capture = _Capture(guided, always=True)
        probe = torch.zeros(2, *input_shape, device=device)
        was_training = peer.model.training
        peer.model.eval()  # a probe must not touch BN running statistics
        with torch.no_grad():
            peer.model(probe)
            self.teacher(probe)
        peer.model.train(was_training)
        assert capture.output is not None and self._hint.output is not None
        capture.always = False
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.run.seed * 1009 + peer.index + 7919)
            regressor = build_regressor(capture.output.shape, self._hint.output.shape).to(device)
        self._guided[peer.index], self.regressors[peer.index] = capture, regressor
        params = list(peer.model.parameters()) + list(regressor.parameters())
        peer.optimizer = build_optimizer(params, cfg.optim, peer.config.lr or cfg.optim.lr)
        peer.scheduler = build_scheduler(peer.optimizer, cfg.optim.schedule, cfg.train.epochs)

    def checkpoint_modules(self, index: int) -> dict[str, nn.Module]:
        """A student's regressor is saved and restored with its checkpoint."""
        return {"regressor": self.regressors[index]} if index in self.regressors else {}

    def _teacher_outputs(self, view: StepView) -> tuple[Tensor, Tensor]:
        """The teacher's logits and hint on this step's batch, computed once per step."""
        assert view.x is not None and self.teacher is not None and self._hint is not None
        key = (view.progress.step, view.x.data_ptr())
        if self._cached is None or self._cached[:2] != key:
            with torch.no_grad():
                logits = self.teacher(view.x)
            assert self._hint.output is not None
            self._cached = (*key, logits, self._hint.output)
        return self._cached[2], self._cached[3]

    def __call__(self, logits: Tensor, target: Tensor, view: StepView) -> LossParts:
        teacher_logits, hint = self._teacher_outputs(view)
        ce = losses.cross_entropy(logits, target)
        if view.progress.epoch < self.hint_epochs:
            guided = self._guided[view.peer].output
            assert guided is not None, "the student's forward did not reach its guided layer"
            hint_l = losses.hint_loss(self.regressors[view.peer](guided), hint)
            return LossParts(hint_l, ce.detach(), hint_l, {"hint": hint_l})
        kd = distill_from(logits, [F.log_softmax(teacher_logits, dim=1)], self.temperature)
        return LossParts((1 - self.a) * ce + self.a * kd, ce, kd, {"kd": kd})
