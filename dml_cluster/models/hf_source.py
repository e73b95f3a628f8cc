"""`hf:PATH`: a causal language model of Hugging Face transformers (the optional extra
`dml-cluster[hf]`), read from a local folder; nothing is downloaded.

PATH is a folder holding a `config.json` (what `save_pretrained` writes): with weights beside it
(`model.safetensors`, `pytorch_model.bin` or their sharded index) the model is
`AutoModelForCausalLM.from_pretrained(PATH, local_files_only=True)`, else
`AutoModelForCausalLM.from_config` of that config, initialised by the model's own rule from the
peer's seed; a teacher peer of a folder with weights needs no `checkpoint` (it predicts with
them). A peer's `args` override settings of the config (`{resid_pdrop: 0.0}`); a setting
the config does not have is refused. The weights are float32 (precision is the run's autocast).

The model's vocabulary (its config's `vocab_size`) must be the run's tokenizer's, so that every
peer of a cohort predicts over the same ids; windows longer than its position table
(`max_position_embeddings`, GPT-2's `n_positions`) are refused. transformers is imported only
when an `hf:` model is built.

The model stays the transformers module itself, so its parameter names (and the run's
checkpoints) are transformers' own: two forward hooks make it what every model of the project
is, token ids [B, T] -> logits [B, T, V] (no key/value cache; the output's `.logits`). Its
`generate` is not used (`dml-cluster generate` samples from the logits). At the end of a run
the trainer also writes each `hf:` peer's final weights with `save_pretrained` into
`RUN/hf/<peer>/`, which `AutoModelForCausalLM.from_pretrained` loads as it is.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import shutil
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from dml_cluster.errors import ConfigError, first_line
from dml_cluster.models.registry import ModelSource, TokenShape, register_source

SCHEME = "hf"
HF_DIR = "hf"
"""The run folder's subfolder of `save_pretrained` copies: RUN/hf/<peer>/."""
INSTALL = "pip install 'dml-cluster[hf]' (or pip install transformers)"
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_MARK = "dml_cluster_hf_folder"
"""Attribute naming the folder an `hf:` model was built from (and marking it as one)."""


def is_hf_name(name: str) -> bool:
    """Is `name` a model of this source (`hf:PATH`)?"""
    return name.startswith(f"{SCHEME}:")


@functools.cache
def _transformers() -> ModuleType | None:
    try:
        import transformers
    except ImportError:
        return None
    transformers.utils.logging.disable_progress_bar()  # no bar per load and save: runs report
    return transformers


def _missing(path: str) -> ConfigError:
    return ConfigError(f"model 'hf:{path}' needs transformers, which is not installed: {INSTALL}")


def _require(path: str) -> ModuleType:
    transformers = _transformers()
    if transformers is None:
        raise _missing(path)
    return transformers


def _folder(path: str) -> Path:
    folder = Path(path).expanduser()
    if not path:
        raise ConfigError("model 'hf:': give the folder of a model after 'hf:' (hf:PATH)")
    if not folder.is_dir():
        raise ConfigError(
            f"model 'hf:{path}': no such folder (a local folder, nothing is downloaded)"
        )
    if not (folder / "config.json").is_file():
        raise ConfigError(
            f"model 'hf:{path}': the folder has no config.json (what save_pretrained writes)"
        )
    return folder


def has_weights(folder: Path) -> bool:
    """Does `folder` hold weights beside its config (from_pretrained), or only the config?"""
    return any((folder / name).is_file() for name in WEIGHT_FILES)


def _trained(path: str) -> bool:
    """The folder holds weights (a teacher of them needs no checkpoint)."""
    return has_weights(_folder(path))


def check(path: str) -> None:
    """The folder and its config.json exist, transformers is installed (found, not imported)."""
    _folder(path)
    if importlib.util.find_spec("transformers") is None:
        raise _missing(path)


def _config(transformers: ModuleType, path: str, folder: Path, args: dict[str, Any]) -> Any:
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as err:
        raise ConfigError(f"model 'hf:{path}': config.json: {first_line(err)}") from None
    for key, value in args.items():
        if not hasattr(config, key):
            raise ConfigError(
                f"model 'hf:{path}': args.{key}: {type(config).__name__} has no such setting"
            )
        setattr(config, key, value)
    return config


def context_of(config: Any) -> int | None:
    """The longest window the model takes: its config's `max_position_embeddings` (GPT-2's
    `n_positions`, `n_ctx`), or None when the config names none."""
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _plain_call(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Forward pre-hook: no key/value cache (training and scoring whole windows)."""
    return args, {**kwargs, "use_cache": False}


def _logits(module: nn.Module, args: tuple[Any, ...], output: Any) -> torch.Tensor:
    """Forward hook: the output's logits [B, T, V], as every model of the project returns."""
    return output.logits if hasattr(output, "logits") else output[0]


def build(path: str, input_shape: TokenShape, num_classes: int, **args: Any) -> nn.Module:
    transformers = _require(path)
    folder = _folder(path)
    config = _config(transformers, path, folder, args)
    vocab = getattr(config, "vocab_size", None)
    if vocab != num_classes:
        raise ConfigError(
            f"model 'hf:{path}': its vocab_size {vocab} is not the tokenizer's {num_classes} ids "
            "(data.tokenizer); every peer predicts over the tokenizer's ids"
        )
    (window,) = input_shape
    context = context_of(config)
    if context is not None and window > context:
        raise ConfigError(
            f"model 'hf:{path}': data.block_size {window} is larger than the model's context "
            f"({context} positions)"
        )
    auto = transformers.AutoModelForCausalLM
    try:
        if has_weights(folder):
            model = auto.from_pretrained(folder, config=config, local_files_only=True)
        else:
            model = auto.from_config(config)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as err:
        raise ConfigError(f"model 'hf:{path}': {type(err).__name__}: {first_line(err)}") from None
    model = model.float()  # save_pretrained records the weights' dtype in config.json
    model.register_forward_pre_hook(_plain_call, with_kwargs=True)
    model.register_forward_hook(_logits)
    if context is not None:
        model.block_size = context  # what `dml-cluster generate` feeds back at most
    setattr(model, _MARK, str(folder))
    return model


def is_hf_model(model: nn.Module) -> bool:
    """Was `model` built by this source?"""
    return hasattr(model, _MARK)


def _whole_here(is_main_process: bool = True) -> bool:
    """This process writes the model: it holds all of it."""
    return True


def write_pretrained(
    model: nn.Module, state: dict[str, Any], run_dir: Path, peer: str
) -> Path | None:
    """For an `hf:` model: `state` (its whole state dict, as `final/<peer>.pt` holds it: a
    sharded model's gathered) and its config written with `save_pretrained` into
    RUN/hf/<peer>/ (replacing what was there, through a temporary folder beside it); the
    folder, or None for another model."""
    if not is_hf_model(model):
        return None
    target = run_dir / HF_DIR / peer
    tmp = target.with_name(f".{peer}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    # transformers (5.15 on) writes on torch.distributed's rank 0 only (its models sharded);
    # a peer's model is whole in the process that hosts it, whichever rank that is
    model.should_save_on_this_rank = _whole_here
    try:
        # a copy: save_pretrained empties the dict it is given as it writes it
        model.save_pretrained(tmp, state_dict=dict(state))  # type: ignore[operator]
    finally:
        del model.should_save_on_this_rank
    if not (tmp / "config.json").is_file():
        raise RuntimeError(f"save_pretrained wrote no config.json into {tmp}")
    shutil.rmtree(target, ignore_errors=True)
    tmp.replace(target)
    return target


register_source(
    SCHEME,
    ModelSource(
        form="hf:PATH", check=check, build=build, tokens=True, separator=":", trained=_trained
    ),
)
