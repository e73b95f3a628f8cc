"""Mixed precision, memory layout and compilation of a peer's model (`run.precision`,
`run.channels_last`, `run.compile`).

A model's forward runs under `torch.autocast` (bf16 or fp16) when asked; everything computed from
its logits that leaves the peer (the exchanged log-probabilities, the losses) is float32. fp16
needs a CUDA device and a loss scaler (`GradScaler`, one per student peer, checkpointed with it);
bf16 works on the CPU and on GPUs without one. The model's parameters and state_dict stay
float32 and keep their names whatever is chosen (`nn.Module.compile` compiles in place).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from dml_cluster.config import Config, RunConfig
from dml_cluster.errors import ConfigError, first_line

AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {
    "fp32": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


def check_precision(cfg: Config, device_type: str) -> None:
    """fp16 only with every peer on CUDA (`device_type`: the cohort's): a one-line config error
    otherwise."""
    on_cpu = device_type != "cuda" or "cpu" in (cfg.cohort.devices or [])
    if cfg.run.precision == "fp16" and on_cpu:
        raise ConfigError(
            "config error: run.precision: fp16 needs CUDA GPUs (its loss scaler and kernels); "
            "a peer of this cohort runs on the CPU: use bf16 or fp32"
        )


@contextlib.contextmanager
def autocast(precision: str, device: torch.device) -> Iterator[None]:
    """Autocast to the run's precision on `device` (nothing for fp32)."""
    dtype = AUTOCAST_DTYPES[precision]
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


def to_layout(x: Tensor, channels_last: bool) -> Tensor:
    """A 4-D batch in channels_last when asked (other ranks unchanged)."""
    if channels_last and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def to_model_layout(model: nn.Module, channels_last: bool) -> nn.Module:
    """`model`'s 4-D weights in channels_last when asked, in place (the same module back)."""
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def make_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """The loss scaler fp16 training needs (None otherwise)."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(device.type)


class _AutocastForward:
    """A model's forward run under autocast: an instance attribute, so state_dict, parameters
    and hooks are the model's own (`torch.autocast` itself inside, which torch.compile traces)."""

    def __init__(self, forward: Callable[..., Tensor], dtype: torch.dtype, device_type: str):
        self.forward, self.dtype, self.device_type = forward, dtype, device_type

    def __call__(self, *args: Any, **kwargs: Any) -> Tensor:
        with torch.autocast(device_type=self.device_type, dtype=self.dtype):
            return self.forward(*args, **kwargs)


def prepare_model(model: nn.Module, run: RunConfig, device: torch.device) -> nn.Module:
    """Layout, autocast and compilation of a peer's model, in place (the same module back)."""
    to_model_layout(model, run.channels_last)
    dtype = AUTOCAST_DTYPES[run.precision]
    if dtype is not None:
        model.forward = _AutocastForward(model.forward, dtype, device.type)
    if run.compile:
        compile_model(model, run.compile, device)
    return model


def compile_model(model: nn.Module, setting: bool | str, device: torch.device) -> bool:
    """`torch.compile` the model in place; on a platform that cannot compile, one line on
    stderr and the model runs eagerly. Returns whether it compiled."""
    mode = None if setting is True else setting
    reason = cannot_compile(device)
    if reason is not None:
        print(f"dml-cluster: run.compile: {reason}; running eagerly", file=sys.stderr)
        return False
    model.compile(mode=mode)
    return True


def cannot_compile(device: torch.device) -> str | None:
    """Why torch.compile cannot run here, or None (checked before any model is compiled):
    inductor needs a C++ compiler for the CPU and triton for CUDA."""
    if sys.platform == "win32" or not hasattr(nn.Module, "compile"):
        return f"torch.compile is not available on this platform (torch {torch.__version__})"
    try:
        importlib.import_module("torch._dynamo")
    except Exception as err:  # noqa: BLE001 - any import failure means no compiler
        return f"torch.compile cannot start ({first_line(err)})"
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        return "torch.compile needs triton for CUDA, which is not installed"
    if device.type == "cpu" and shutil.which(os.environ.get("CXX", "c++")) is None:
        return "torch.compile needs a C++ compiler for the CPU (none found; set CXX)"
    return None
