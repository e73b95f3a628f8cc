"""Name -> builder registry for the model zoo, and the sources of models built elsewhere.

A builder has the signature ``builder(input_shape, num_classes, *, <options>) -> nn.Module``;
its keyword-only options (all with defaults) are what ``build_model`` accepts as ``**kwargs``.

A name that is not a built-in one belongs to a `ModelSource`, chosen by its form:
``<scheme>.<name>`` (``torchvision.resnet18``, ``timm.resnet18``), ``<scheme>:<path>`` for a
source of language models read from a folder (``hf:models/tiny``), or ``package.module:factory``
(the scheme ``:``). A source checks names cheaply (`check_model_name`, at config time) and builds
models; whatever it builds must map [B, *input_shape] to logits [B, num_classes] (a token
source's: token ids [B, T] to logits [B, T, num_classes]), which `build_model` checks with one
forward pass of a two-sample batch.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dml_cluster.errors import ConfigError, typed_first_line

InputShape = tuple[int, int, int]
TokenShape = tuple[int]
"""A token model's input shape: (block_size,), windows of token ids [B, T]."""
Builder = Callable[..., nn.Module]
FACTORY_SCHEME = ":"

_REGISTRY: dict[str, Builder] = {}
_OPTIONS: dict[str, tuple[str, ...]] = {}
_TOKEN_MODELS: set[str] = set()


@dataclass(frozen=True)
class ModelSource:
    """Models built outside the zoo. `check(name)` raises ConfigError for a name the source
    cannot build (cheaply: no model is built); `build(name, input_shape, num_classes, **args)`
    builds one. `name` is what follows the scheme (the whole reference for factories)."""

    form: str  # how its names look, for messages: "torchvision.<builder>"
    check: Callable[[str], None]
    build: Callable[..., nn.Module]
    tokens: bool = False
    """Language models: token ids [B, T] in, logits [B, T, vocabulary] out (see `register`)."""
    separator: str = "."
    """What joins the scheme and the name: "." (``timm.resnet18``) or ":" (``hf:PATH``)."""
    trained: Callable[[str], bool] | None = None
    """Does the named model come with trained weights of its own (an ``hf:`` folder with
    weights beside its config), which a teacher may use without a checkpoint? None: never."""


_SOURCES: dict[str, ModelSource] = {}


def register(name: str, *, tokens: bool = False) -> Callable[[Builder], Builder]:
    """Decorator: register `builder` under `name` (a duplicate name is a programming error).

    `tokens`: a language model; its input shape is (block_size,), its input int64 token ids
    [B, T], its logits [B, T, num_classes] (num_classes: the vocabulary size)."""

    def decorator(builder: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"model '{name}' is registered twice")
        params = list(inspect.signature(builder).parameters.values())
        positional = [p for p in params if p.kind is not p.KEYWORD_ONLY]
        if len(positional) != 2 or any(p.kind is p.VAR_KEYWORD for p in params):
            raise TypeError(
                f"builder for '{name}' must be f(input_shape, num_classes, *, options...)"
            )
        _REGISTRY[name] = builder
        _OPTIONS[name] = tuple(p.name for p in params if p.kind is p.KEYWORD_ONLY)
        if tokens:
            _TOKEN_MODELS.add(name)
        return builder

    return decorator


def register_source(scheme: str, source: ModelSource) -> None:
    """Models named `<scheme>.<name>` (or `module:factory` for FACTORY_SCHEME) come from
    `source` (a duplicate scheme is a programming error)."""
    if scheme in _SOURCES:
        raise ValueError(f"model source '{scheme}' is registered twice")
    _SOURCES[scheme] = source


def as_rows(logits: torch.Tensor) -> torch.Tensor:
    """A model's predictions as rows [N, C], as the cohort exchanges, learns from and evaluates
    them: a token model's [B, T, V] is one row per position, [B·T, V] (a view); [B, C] as it is."""
    return logits.flatten(0, -2) if logits.dim() > 2 else logits


def model_names() -> list[str]:
    """All registered (built-in) model names, sorted."""
    return sorted(_REGISTRY)


def is_builtin(name: str) -> bool:
    """Is `name` one of the project's own architectures (not torchvision, timm or user code)?"""
    return name in _REGISTRY


def is_token_model(name: str) -> bool:
    """Is `name` a language model (token ids in, per-position logits out): a built-in one, or
    one of a token source (``hf:PATH``)?"""
    if name in _TOKEN_MODELS:
        return True
    try:
        found = _source(name)
    except ConfigError:  # an unknown scheme: no language model
        return False
    return found is not None and found[0].tokens


def model_options(name: str) -> tuple[str, ...]:
    """The keyword options the built-in model `name` accepts."""
    _lookup(name)
    return _OPTIONS[name]


def close_names(name: str, known: list[str], n: int = 3) -> str:
    """' (did you mean a, b?)' for the names of `known` close to `name`, or ''."""
    close = difflib.get_close_matches(name, known, n=n, cutoff=0.6)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def _split(name: str) -> tuple[str | None, str]:
    """(scheme, the name within it); scheme None for a built-in name."""
    prefix, colon, rest = name.partition(":")
    if colon and prefix in _SOURCES and _SOURCES[prefix].separator == ":":
        return prefix, rest
    if FACTORY_SCHEME in name:
        return FACTORY_SCHEME, name
    scheme, dot, rest = name.partition(".")
    return (scheme, rest) if dot else (None, name)


def _unknown(name: str) -> ConfigError:
    forms = ", ".join(s.form for s in _SOURCES.values())
    return ConfigError(
        f"unknown model {name!r} (known: {', '.join(model_names())}; or {forms})"
        f"{close_names(name, model_names())}"
    )


def _source(name: str) -> tuple[ModelSource, str] | None:
    scheme, rest = _split(name)
    if scheme is None:
        return None
    if scheme not in _SOURCES:
        raise _unknown(name)
    return _SOURCES[scheme], rest


def check_model_name(name: str) -> None:
    """Raise ConfigError (one line, without the config key) if `name` names no model that can
    be built here. Builds nothing."""
    found = _source(name)
    if found is None:
        _lookup(name)
        return
    source, rest = found
    source.check(rest)


def comes_trained(name: str) -> bool:
    """Does model `name` come with trained weights of its own (`ModelSource.trained`; checked
    cheaply, nothing built)? Built-in models never do."""
    found = _source(name)
    if found is None:
        return False
    source, rest = found
    return source.trained is not None and source.trained(rest)


def _lookup(name: str) -> Builder:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise _unknown(name) from None


def _check_input_shape(name: str, input_shape: Any) -> InputShape:
    try:
        shape = tuple(int(v) for v in input_shape)
    except (TypeError, ValueError):
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(
            f"model '{name}': input_shape must be (channels, height, width) of positive ints, "
            f"got {input_shape!r}"
        )
    return shape  # type: ignore[return-value]


def _check_token_shape(name: str, input_shape: Any) -> TokenShape:
    try:
        shape = tuple(int(v) for v in input_shape)
    except (TypeError, ValueError):
        shape = ()
    if len(shape) != 1 or shape[0] < 1:
        raise ConfigError(
            f"model '{name}': input_shape must be (block_size,), a positive int, "
            f"got {input_shape!r}"
        )
    return shape  # type: ignore[return-value]


def build_model(
    name: str, input_shape: InputShape | TokenShape, num_classes: int, /, **kwargs: Any
) -> nn.Module:
    """Build model `name` for inputs [B, *input_shape] -> logits [B, num_classes]; a token
    model (`is_token_model`): token ids [B, T] -> logits [B, T, num_classes], T <= block_size
    of input_shape (block_size,).

    Raises ConfigError for an unknown name, an option the model does not take, or a bad value;
    for a model from a source, also when what it built is no nn.Module or does not map such a
    batch to such logits.
    """
    if is_token_model(name):
        shape: Any = _check_token_shape(name, input_shape)
    else:
        shape = _check_input_shape(name, input_shape)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(
            f"model '{name}': num_classes must be a positive int, got {num_classes!r}"
        )
    found = _source(name)
    if found is not None:
        source, rest = found
        source.check(rest)
        if "num_classes" in kwargs:
            raise ConfigError(f"model {name!r}: args.num_classes: the number comes from the data")
        model = source.build(rest, shape, num_classes, **kwargs)
        return _probed(name, model, shape, num_classes, tokens=source.tokens)
    builder = _lookup(name)
    unexpected = sorted(set(kwargs) - set(_OPTIONS[name]))
    if unexpected:
        accepted = ", ".join(_OPTIONS[name]) or "none"
        bad = ", ".join(f"'{k}'" for k in unexpected)
        raise ConfigError(f"model '{name}' got unexpected argument {bad} (accepted: {accepted})")
    return builder(shape, num_classes, **kwargs)


def _probed(
    name: str, model: Any, shape: tuple[int, ...], num_classes: int, *, tokens: bool
) -> nn.Module:
    """`model` if it is an nn.Module mapping a [2, *shape] batch to [2, num_classes] logits in
    training mode (a token model: [2, T] ids to [2, T, num_classes]). The probe leaves no trace:
    no graph, buffers (BN statistics) restored, torch's RNG state restored."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model {name!r} built a {type(model).__name__}, not a torch nn.Module")
    saved = [b.clone() for b in model.buffers()]
    was_training = model.training
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            model.train()
            out = model(torch.zeros(2, *shape, dtype=torch.int64 if tokens else None))
    except Exception as err:  # noqa: BLE001 - any failure here is the same user error
        raise ConfigError(
            f"model {name!r} cannot take a batch of shape [B, {', '.join(map(str, shape))}] "
            f"({typed_first_line(err)}); small images may need a model made for them, or "
            "larger images (see the README, 'Your own models')"
        ) from None
    finally:
        with torch.no_grad():
            for buf, old in zip(model.buffers(), saved, strict=True):
                buf.copy_(old)
        model.train(was_training)
    want = (2, *shape, num_classes) if tokens else (2, num_classes)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != want:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        rows = "[B, T, " if tokens else "[B, "
        raise ConfigError(
            f"model {name!r} must return logits of shape {rows}{num_classes}] in training mode, "
            f"got {got} for a batch of 2"
        )
    return model
