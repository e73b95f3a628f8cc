"""Determinism modes (`run.deterministic`) and what each sets in torch.

- ``strict``: `torch.use_deterministic_algorithms(True)`: an op without a deterministic kernel
  raises. cuDNN picks deterministic algorithms and does no benchmarking; cuBLAS gets a fixed
  workspace (CUBLAS_WORKSPACE_CONFIG, set before CUDA initialises). Same config, same hardware
  and software -> the same weights, bitwise. The bitwise tests run in this mode.
- ``warn``: the same settings, but an op without a deterministic kernel only warns (torch's
  `warn_only=True`) and runs its nondeterministic kernel: runs are repeatable except where such
  a warning was printed.
- ``off``: torch's defaults plus cuDNN benchmarking (the fastest kernels, chosen by timing):
  no repeatability promised on a GPU.
- ``auto`` (the default): ``strict``, except on CUDA when a peer's model is not one of the
  project's own (torchvision, timm, a user's module: their ops were not checked) -> ``warn``.

`true` and `false` are accepted as the older spellings of ``strict`` and ``off``.
"""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Iterable

import numpy as np
import torch

from dml_cluster.config import Config
from dml_cluster.devices import cohort_device_type
from dml_cluster.signals import local_reporter

MODES = ("strict", "warn", "off")
CUBLAS_WORKSPACE = ":4096:8"
"""cuBLAS's fixed workspace for deterministic GEMMs (CUDA's documented setting)."""


def is_builtin_model(name: str) -> bool:
    """Is `name` one of the project's own architectures (its ops are checked for determinism),
    not a torchvision, timm or user model? The model registry knows."""
    from dml_cluster.models.registry import is_builtin

    return is_builtin(name)


def resolve_mode(setting: str, device_type: str, models: Iterable[str]) -> str:
    """The mode a cohort runs in: `setting`, with ``auto`` made concrete for this cohort."""
    if setting != "auto":
        return setting
    outside = device_type == "cuda" and not all(is_builtin_model(m) for m in models)
    return "warn" if outside else "strict"


def prepare_environment(setting: str) -> None:
    """Before CUDA initialises: give cuBLAS its fixed workspace unless determinism is off.

    A workspace already in the environment is kept. If CUDA is already up, cuBLAS may have read
    the environment before: say so in one line (strict/warn then cannot promise cuBLAS GEMMs).
    """
    if setting == "off" or "CUBLAS_WORKSPACE_CONFIG" in os.environ:
        return
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE
    if torch.cuda.is_initialized():
        print(
            "dml-cluster: warning: CUDA was initialised before CUBLAS_WORKSPACE_CONFIG was set; "
            f"export CUBLAS_WORKSPACE_CONFIG={CUBLAS_WORKSPACE} for deterministic cuBLAS",
            file=sys.stderr,
        )


def apply_mode(mode: str) -> None:
    """Set torch's global switches for `mode` (one of MODES)."""
    if mode not in MODES:
        raise ValueError(f"unknown determinism mode {mode!r} (known: {', '.join(MODES)})")
    prepare_environment(mode)
    torch.use_deterministic_algorithms(mode != "off", warn_only=mode == "warn")
    torch.backends.cudnn.deterministic = mode != "off"
    torch.backends.cudnn.benchmark = mode == "off"


def current_mode() -> str:
    """The mode torch's switches say is in force (what `apply_mode` set)."""
    if not torch.are_deterministic_algorithms_enabled():
        return "off"
    return "warn" if torch.is_deterministic_algorithms_warn_only_enabled() else "strict"


def set_determinism(cfg: Config) -> str:
    """Seed the process's global RNGs (every peer draws from a stream of its own:
    dml_cluster.streams) and set torch's kernels to the run's determinism mode (returned: one of
    `MODES`, `auto` made concrete). What both engines call first, before CUDA initialises."""
    torch.set_num_threads(cfg.run.threads)
    random.seed(cfg.run.seed)
    np.random.seed(cfg.run.seed % 2**32)
    torch.manual_seed(cfg.run.seed)
    prepare_environment(cfg.run.deterministic)
    device_type = cohort_device_type(cfg)
    mode = resolve_mode(cfg.run.deterministic, device_type, [p.model for p in cfg.peers])
    if mode != cfg.run.deterministic and mode == "warn" and local_reporter():  # once per node
        print(
            "dml-cluster: run.deterministic auto -> warn on CUDA: a peer's model is not built in "
            "(its ops were not checked); ops without a deterministic kernel warn and run anyway "
            "(set run.deterministic: strict to make them errors)",
            file=sys.stderr,
        )
    apply_mode(mode)
    return mode
