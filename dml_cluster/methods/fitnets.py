"""FitNets (Romero et al. 2015): hints, then KD, with the teacher inside the student's process.

Stage 1 (the first `hint_epochs` epochs): L = MSE(r(guided(x)), hint(x)), where `guided` is the
student's `guided_layer`, `hint` the teacher's `hint_layer` and r a regressor (a convolution for
feature maps, a linear layer for flat features). Only the student's layers up to the guided one
and r receive gradients (the loss does not depend on the others; with `zero_grad(set_to_none)`
the optimizer skips them, weight decay included). Stage 2: Hinton KD,
(1 - a) CE + a T^2 KL(p_t^T || p_s^T), on the whole student; r is no longer used. r is the
student's extra module (`extra_modules`): the peer builder puts it in the student's optimizer,
checkpoints save it.

Why the teacher runs here and not as a peer on the bus: a hint is a feature map per sample
(e.g. 128 x 7 x 7 floats = 25 KB, against 40 bytes of 10 class probabilities), 600 times what DML
ships per batch, and stage 2 needs the teacher's logits on the very same batch anyway. The
teacher (`method.teacher`: model, args, checkpoint) is loaded, frozen and run in eval mode under
no_grad in every student's process, once per batch for all students the process hosts.
Fellow students are not mimicked, and teacher peers on the bus are refused (they would be unused).
"""

from __future__ import annotations

import difflib
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dml_cluster import losses
from dml_cluster.cohort import load_teacher
from dml_cluster.errors import ConfigError
from dml_cluster.method_config.fitnets import FitNetsConfig
from dml_cluster.methods.base import LossParts, Method, StepView
from dml_cluster.methods.kd import distill_from
from dml_cluster.models import build_model


def find_module(model: nn.Module, name: str, what: str, model_name: str) -> nn.Module:
    """The submodule of `model` called `name` (as in `model.named_modules()`: "layer2",
    "layer2.1.conv2", "features.3"), for any model: built-in, torchvision, timm or the user's."""
    modules = dict(model.named_modules())
    if name not in modules or name == "":
        names = [n for n in modules if n]
        close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
        top = [n for n in names if "." not in n]
        listed = f"close: {', '.join(close)}" if close else f"top-level: {', '.join(top)}"
        raise ConfigError(
            f"config error: method.{what}: {model_name} has no module {name!r} ({listed}; "
            "names as in model.named_modules())"
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


class FitNets(Method):
    def __init__(self, cfg: FitNetsConfig) -> None:
        super().__init__(cfg)
        self.a, self.temperature, self.hint_epochs = cfg.kd_weight, cfg.temperature, cfg.hint_epochs
        self.teacher_config = cfg.teacher
        self.hint_layer, self.guided_layer = cfg.hint_layer, cfg.guided_layer
        self.teacher: nn.Module | None = None
        self._hint: _Capture | None = None
        self._guided: dict[int, _Capture] = {}
        self.regressors: dict[int, nn.Module] = {}
        self._step_outputs: tuple[Tensor, Tensor] | None = None

    def _load_teacher(self, input_shape: tuple[int, int, int], classes: int, device: Any) -> None:
        t = self.teacher_config
        with torch.random.fork_rng(devices=[]):  # its initial weights are overwritten anyway
            teacher = build_model(t.model, input_shape, classes, **t.args).to(device)
        self.teacher = load_teacher(teacher, t)
        hint = find_module(teacher, self.hint_layer, "hint_layer", f"the teacher's {t.model}")
        self._hint = _Capture(hint, always=True)

    def extra_modules(
        self, peer: int, model: nn.Module, input_shape: tuple[int, int, int], classes: int
    ) -> dict[str, nn.Module]:
        """Hook the student's guided layer; its regressor trains with the student."""
        device = next(model.parameters()).device
        if self.teacher is None:
            self._load_teacher(input_shape, classes, device)
        assert self.teacher is not None and self._hint is not None
        guided = find_module(model, self.guided_layer, "guided_layer", f"peer {peer}'s model")
        capture = _Capture(guided, always=True)
        probe = torch.zeros(2, *input_shape, device=device)
        was_training = model.training
        model.eval()  # a probe must not touch BN running statistics
        with torch.no_grad():
            model(probe)
            self.teacher(probe)
        model.train(was_training)
        assert capture.output is not None and self._hint.output is not None
        capture.always = False
        regressor = build_regressor(capture.output.shape, self._hint.output.shape).to(device)
        self._guided[peer], self.regressors[peer] = capture, regressor
        return {"regressor": regressor}

    def begin_step(self, x: Tensor) -> None:
        """The teacher's logits and hint on this step's batch: once for every hosted student."""
        assert self.teacher is not None and self._hint is not None, "no student was built"
        with torch.no_grad():
            logits = self.teacher(x)
        assert self._hint.output is not None
        self._step_outputs = (logits, self._hint.output)

    def __call__(self, logits: Tensor, target: Tensor, view: StepView) -> LossParts:
        assert self._step_outputs is not None, "begin_step(x) comes before the students' losses"
        teacher_logits, hint = self._step_outputs
        ce = losses.cross_entropy(logits, target)
        if view.progress.epoch < self.hint_epochs:
            guided = self._guided[view.peer].output
            assert guided is not None, "the student's forward did not reach its guided layer"
            hint_l = losses.hint_loss(self.regressors[view.peer](guided), hint)
            return LossParts(hint_l, ce.detach(), hint_l, {"hint": hint_l})
        kd = distill_from(logits, [F.log_softmax(teacher_logits, dim=1)], self.temperature)
        return LossParts((1 - self.a) * ce + self.a * kd, ce, kd, {"kd": kd})
