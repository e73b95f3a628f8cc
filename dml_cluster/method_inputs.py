"""What a method reads beyond logits, provided from what it declares (`Method.needs`).

The trainer's side of the method interface (dml_cluster.methods.base): at build time,
`MethodInputs.attach` hooks the declared modules of each hosted student, makes sure the frozen
in-process teacher runs on that student's device (one teacher per device that hosts a student:
a student's method inputs never cross devices), probes the features' shapes and builds the
method's extra modules. At every step `recording` keeps the declared features of a student's
training forward, and `gather` runs each teacher once on the batch and hands every learning
student its features, its device's teacher outputs and the batch's sample indices.

The teacher is built, loaded (strictly) and frozen like a teacher peer, and prepared like every
peer's model (`precision.prepare_model`: memory layout, autocast to `run.precision`,
`run.compile`); it runs in eval mode without a graph.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from dml_cluster.cohort import load_teacher
from dml_cluster.config import RunConfig
from dml_cluster.errors import ConfigError
from dml_cluster.methods.base import Method, Shapes, TeacherOutputs
from dml_cluster.models import as_rows, build_model
from dml_cluster.precision import prepare_model
from dml_cluster.schema import PeerConfig


def find_module(model: nn.Module, name: str, key: str, owner: str) -> nn.Module:
    """The submodule of `model` called `name` (as in `model.named_modules()`: "layer2",
    "layer2.1.conv2", "features.3"), for any model: built-in, torchvision, timm or the user's.
    A missing one is a config error naming `key` (the setting that named it) and `owner`."""
    modules = dict(model.named_modules())
    if name not in modules or name == "":
        names = [n for n in modules if n]
        close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
        top = [n for n in names if "." not in n]
        listed = f"close: {', '.join(close)}" if close else f"top-level: {', '.join(top)}"
        raise ConfigError(
            f"config error: method.{key}: {owner} has no module {name!r} ({listed}; "
            "names as in model.named_modules())"
        )
    return modules[name]


class Recorder:
    """Forward hooks on named modules of one model that keep their outputs, only inside
    `recording()` (a probe, an evaluation or a re-published forward records nothing)."""

    def __init__(self, model: nn.Module, names: Mapping[str, str], owner: str) -> None:
        """`names`: module name -> the setting that named it (for the error on a missing one)."""
        self._outputs: dict[str, Tensor] | None = None
        for name, key in names.items():
            module = find_module(model, name, key, owner)
            module.register_forward_hook(functools.partial(self._keep, name))

    def _keep(self, name: str, module: nn.Module, args: Any, output: Tensor) -> None:
        if self._outputs is not None:
            self._outputs[name] = output

    @contextlib.contextmanager
    def recording(self) -> Iterator[dict[str, Tensor]]:
        """The outputs of the hooked modules during the block's forward, by name."""
        outputs: dict[str, Tensor] = {}
        self._outputs = outputs
        try:
            yield outputs
        finally:
            self._outputs = None


@dataclass(frozen=True)
class Teacher:
    """A frozen network run in the students' process, and the recorder of its features."""

    model: nn.Module
    recorder: Recorder

    def __call__(self, x: Tensor) -> TeacherOutputs:
        with torch.no_grad(), self.recorder.recording() as features:
            logits = as_rows(self.model(x))  # a language model's: one row per position
        return TeacherOutputs(logits, dict(features))


def build_teacher(
    peer_cfg: PeerConfig,
    names: Mapping[str, str],
    input_shape: tuple[int, int, int],
    classes: int,
    run: RunConfig,
    device: torch.device,
) -> Teacher:
    """The teacher of `peer_cfg` on `device`: built, loaded strictly, frozen, its modules
    `names` hooked, prepared like a peer (layout, autocast, compile). Its construction draws
    nothing from torch's RNG (its initial weights are overwritten anyway)."""
    with torch.random.fork_rng(devices=[]):
        model = build_model(peer_cfg.model, input_shape, classes, **peer_cfg.args)
    model = load_teacher(model.to(device), peer_cfg)
    recorder = Recorder(model, names, f"the teacher's {peer_cfg.model}")
    prepare_model(model, run, device)
    return Teacher(model, recorder)


@dataclass(frozen=True)
class Given:
    """What one learning student's method reads at a step beyond logits (see `StepView`)."""

    features: Mapping[str, Tensor] = field(default_factory=dict)
    teacher: TeacherOutputs | None = None
    sample_ids: Tensor | None = None


class MethodInputs:
    """The declared inputs of `method` for the students this process hosts."""

    def __init__(
        self, method: Method, run: RunConfig, input_shape: tuple[int, int, int], classes: int
    ) -> None:
        self.method, self.needs, self.run = method, method.needs, run
        self.input_shape, self.classes = input_shape, classes
        self._recorders: dict[int, Recorder] = {}
        self._teachers: dict[torch.device, Teacher] = {}

    def teacher_on(self, device: torch.device) -> Teacher:
        """The in-process teacher on `device` (built on first use)."""
        if device not in self._teachers:
            assert self.needs.teacher is not None, "the method declares no teacher"
            names = dict(self.needs.teacher_features)
            self._teachers[device] = build_teacher(
                self.needs.teacher, names, self.input_shape, self.classes, self.run, device
            )
        return self._teachers[device]

    def attach(self, peer: int, model: nn.Module, device: torch.device) -> dict[str, nn.Module]:
        """For student `peer`'s `model` on `device`, before its `prepare_model`: hook the declared
        features, probe their shapes (a 2-sample batch of zeros, in eval mode so that BN running
        statistics stay as they are), and build the method's extra modules on `device`."""
        needs = self.needs
        recorder = Recorder(model, dict(needs.features), f"peer {peer}'s model")
        self._recorders[peer] = recorder
        shapes = Shapes(self.input_shape, self.classes)
        if needs.features or needs.teacher is not None:
            ids = len(self.input_shape) == 1  # a language model's input: token ids
            dtype = torch.int64 if ids else torch.float32
            probe = torch.zeros(2, *self.input_shape, dtype=dtype, device=device)
            was_training = model.training
            model.eval()
            with torch.no_grad(), recorder.recording() as features:
                model(probe)
            model.train(was_training)
            taught = self.teacher_on(device)(probe) if needs.teacher is not None else None
            shapes = Shapes(
                self.input_shape,
                self.classes,
                {k: v.shape for k, v in features.items()},
                {k: v.shape for k, v in taught.features.items()} if taught else {},
            )
        modules = self.method.extra_modules(peer, shapes)
        return {name: module.to(device) for name, module in modules.items()}

    def recording(self, peer: int) -> contextlib.AbstractContextManager[dict[str, Tensor]]:
        """Keep peer's declared features during its training forward (nothing for a peer with
        none: a teacher peer, a method that reads none)."""
        recorder = self._recorders.get(peer)
        if recorder is None or not self.needs.features:
            return contextlib.nullcontext({})
        return recorder.recording()

    def gather(
        self,
        learners: Sequence[int],
        device_of: Callable[[int], torch.device],
        input_of: Callable[[int], Tensor],
        features: Mapping[int, Mapping[str, Tensor]],
        sample_ids: Tensor | None,
    ) -> dict[int, Given]:
        """Each learner's inputs on its device: its recorded features, the teacher's outputs on
        the batch (`input_of(i)`: the batch as peer i's model takes it; the teacher runs once per
        device) and the batch's sample indices when declared."""
        taught: dict[torch.device, TeacherOutputs] = {}
        given = {}
        for i in learners:
            device = device_of(i)
            teacher = None
            if self.needs.teacher is not None:
                if device not in taught:
                    taught[device] = self.teacher_on(device)(input_of(i))
                teacher = taught[device]
            ids = None
            if self.needs.sample_ids:
                assert sample_ids is not None, "the trainer passes the batch's sample indices"
                ids = sample_ids.to(device)
            given[i] = Given(features.get(i, {}), teacher, ids)
        return given
