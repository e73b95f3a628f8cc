"""The DML paper's analysis (Zhang et al. 2018, §4.8) of a trained run: how confident the students
are on their training data (mean posterior entropy) and how flat the minimum they found is (the
rise of the training loss when Gaussian noise of std sigma is added to every weight).

`dml-cluster analyze RUN_DIR...` reads each run folder's final weights and its resolved config
(RUN_DIR/config.yaml, or the config given with --config and --set), writes RUN_DIR/analysis.json,
and draws the runs side by side (independent vs DML) in one figure.

Not every result can be read as flatness: each student's result carries `flags`, the reasons
it cannot (`flatness_flags`), said by the command and left out of the figure.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor, nn

from dml_cluster import losses
from dml_cluster.config import Config, load_config
from dml_cluster.data.dataset import Dataset
from dml_cluster.data.seeding import seeded_generator
from dml_cluster.data.text import TextData, val_starts
from dml_cluster.errors import ConfigError, InputError
from dml_cluster.metrics.chance import (
    STALE,
    batchnorm_facts,
    chance,
    chance_bound,
    stale_statistics,
)
from dml_cluster.models import as_rows
from dml_cluster.precision import to_layout, to_model_layout
from dml_cluster.run_folder import CONFIG_FILE

SIGMAS = (0.01, 0.02, 0.04, 0.08)
"""Default noise levels: std of the Gaussian noise added to every weight."""
ANALYSIS_FILE = "analysis.json"

Batches = Sequence[tuple[Tensor, Tensor]]


# -- the measures, on a model and its training batches -------------------------------------------


@torch.no_grad()
def loss_and_entropy(model: nn.Module, batches: Batches) -> dict[str, float]:
    """Mean CE, mean posterior entropy (nats) and accuracy over `batches`, in eval mode."""
    was_training = model.training
    model.eval()
    total = entropy = correct = 0.0
    count = 0
    for x, y in batches:
        log_p = F.log_softmax(as_rows(model(x)), dim=1)  # a language model's: per position
        y = y.reshape(-1)
        # deterministic: [B, C] inputs: nll_loss's 1-D-target CUDA kernels reduce in one block
        total += F.nll_loss(log_p, y, reduction="sum").item()
        entropy += losses.entropy(log_p).item() * len(y)
        correct += (log_p.argmax(1) == y).sum().item()
        count += len(y)
    model.train(was_training)
    return {"loss": total / count, "entropy": entropy / count, "accuracy": correct / count}


@torch.no_grad()
def add_noise(model: nn.Module, sigma: float, generator: torch.Generator) -> None:
    """Add N(0, sigma^2) to every parameter, in `model.parameters()` order, drawn on the CPU
    from `generator` (the same numbers on any device); buffers (BN statistics) are untouched."""
    for param in model.parameters():
        noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
        param.add_(noise.to(param.device, param.dtype), alpha=sigma)


@torch.no_grad()
def flatness(
    model: nn.Module, batches: Batches, sigmas: Iterable[float], draws: int, seed: int = 0
) -> dict[str, Any]:
    """For each sigma: the training loss with noise of std sigma on every weight minus the loss
    without, averaged over `draws` draws (draw d of sigma i seeded by (seed, i, d)). The model
    is left as it was."""
    clean = loss_and_entropy(model, batches)["loss"]
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    rises: dict[str, float] = {}
    spread: dict[str, float] = {}
    for i, sigma in enumerate(sigmas):
        noisy = []
        for d in range(draws):
            add_noise(model, sigma, seeded_generator("analyze.flatness", seed, i, d))
            noisy.append(loss_and_entropy(model, batches)["loss"] - clean)
            model.load_state_dict(saved)
        rises[f"{sigma:g}"] = statistics.mean(noisy)
        spread[f"{sigma:g}"] = statistics.stdev(noisy) if len(noisy) > 1 else 0.0
    return {"rise": rises, "rise_std": spread}


def analyze_model(
    model: nn.Module, batches: Batches, sigmas: Sequence[float], draws: int, seed: int = 0
) -> dict[str, Any]:
    """Training accuracy, loss and mean posterior entropy, and the flatness of the minimum."""
    clean = loss_and_entropy(model, batches)
    flat = flatness(model, batches, sigmas, draws, seed)
    return {
        "train_accuracy": clean["accuracy"],
        "train_loss": clean["loss"],
        "train_entropy": clean["entropy"],
        "flatness": flat["rise"],
        "flatness_std": flat["rise_std"],
    }


def flatness_flags(
    result: dict[str, Any], model: nn.Module, num_classes: int, samples: int, draws: int
) -> list[str]:
    """Why `analyze_model`'s `result` for `model` (on `samples` training samples of
    `num_classes` classes, `draws` draws per sigma) cannot be read as flatness, one line per
    reason; none when it can. The loss rise measures how flat a minimum is only where the
    model, as evaluated, sits in one:
    - its accuracy on its own training set is no better than chance (`metrics.chance`: 1/C plus
      three standard errors), e.g. BatchNorm's running statistics never caught up;
    - its training loss exceeds ln C, that of a uniform guess: confidently wrong, not a minimum;
    - noise lowers the loss: a mean rise below zero by more than two standard errors of the
      mean over the draws (any negative mean with one draw).
    """
    flags = []
    accuracy, loss = result["train_accuracy"], result["train_loss"]
    if accuracy <= chance_bound(num_classes, samples):
        facts = batchnorm_facts(model)
        stale = facts is not None and facts.stale_share >= STALE
        cause = f"likely {stale_statistics(facts)}" if stale else "it has not learnt it"
        flags.append(
            f"in evaluation mode its accuracy on its own training set, {100 * accuracy:.2f}%, "
            f"is no better than chance (1/{num_classes}, {100 * chance(num_classes):.1f}%): "
            f"{cause}"
        )
    if loss > math.log(num_classes):
        flags.append(
            f"its training loss {loss:.4g} exceeds ln {num_classes} = "
            f"{math.log(num_classes):.3f}, a uniform guess's: it is not at a minimum"
        )
    falling = [
        sigma
        for sigma, rise in result["flatness"].items()
        if rise < 0 and -rise > 2 * result["flatness_std"][sigma] / math.sqrt(draws)
    ]
    if falling:
        flags.append(
            f"noise of σ = {', '.join(falling)} lowers its training loss (a negative rise): "
            "it is not at a minimum"
        )
    return flags


# -- a run folder ------------------------------------------------------------------------------


def run_config(run_dir: Path, config: str | None = None, overrides: Sequence[str] = ()) -> Config:
    """The run's resolved config: `config` (+ overrides) if given, else RUN_DIR/config.yaml."""
    if not run_dir.is_dir():
        raise InputError(f"analyze: {run_dir}: no such run folder")
    if config:
        return load_config(config, list(overrides))
    if not (run_dir / CONFIG_FILE).exists():
        raise ConfigError(
            f"analyze: {run_dir} has no {CONFIG_FILE}; give the config it was trained with "
            "(--config CONFIG, and the same --set overrides)"
        )
    return load_config(run_dir / CONFIG_FILE, list(overrides))


def training_batches(
    cfg: Config, run_dir: Path, device: torch.device
) -> tuple[Batches, Dataset | TextData]:
    """The run's training set (its subset, if it had one) in order, normalised as the run saw
    it, without augmentation, with its true labels, held on `device` in the run's memory layout
    (`run.channels_last`); and the dataset. Text: the first `data.val_tokens` positions of the
    training split, in consecutive windows (ids [B, T], next tokens [B·T])."""
    from dml_cluster.data.loader import DataPath
    from dml_cluster.data.prepare import prepare_data

    prepared = prepare_data(cfg, run_dir)  # true labels: semi-supervised masks are not applied
    data, normalisation = prepared.dataset, prepared.normalisation
    if isinstance(data, TextData):
        starts = val_starts(data.train.tokens.num_tokens, data.block_size, data.val_tokens)
        bs = cfg.data.eval_batch_size
        windows = [data.train.read(starts[i : i + bs]) for i in range(0, len(starts), bs)]
        return [(x.to(device), y.reshape(-1).to(device)) for x, y in windows], data
    assert normalisation is not None
    train = data.train
    in_order = dataclasses.replace(data, test=train)  # the in-order split reader, on train
    path = DataPath(
        in_order, normalisation, device, batch_size=cfg.data.eval_batch_size,
        eval_batch_size=cfg.data.eval_batch_size, seed=cfg.run.seed, workers=0, prefetch=2,
        crop_padding=0, flip=False,
    )  # fmt: skip
    layout = cfg.run.channels_last
    return [(to_layout(x, layout), y) for x, y in path.test_batches()], data


def analyze_run(
    run_dir: Path,
    sigmas: Sequence[float] = SIGMAS,
    draws: int = 5,
    config: str | None = None,
    overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """Analyze every student of the run in `run_dir`; the result is also written to
    RUN_DIR/analysis.json."""
    from dml_cluster.cohort import read_weights
    from dml_cluster.models import build_model

    run_dir = Path(run_dir)
    cfg = run_config(run_dir, config, overrides)
    torch.set_num_threads(cfg.run.threads)
    device = torch.device("cpu")
    batches, data = training_batches(cfg, run_dir, device)
    scored = sum(int(y.numel()) for _, y in batches)  # samples, or a language model's positions
    result: dict[str, Any] = {"run": str(run_dir), "sigmas": list(sigmas), "draws": draws,
                              "peers": {}}  # fmt: skip
    for k, peer in enumerate(cfg.peers):
        if peer.role != "student":
            continue
        weights = run_dir / "final" / f"{peer.name}.pt"
        if not weights.exists():
            raise ConfigError(f"analyze: {weights}: no such file (has the run finished?)")
        model = build_model(peer.model, data.input_shape, data.num_classes, **peer.args)
        model.load_state_dict(read_weights(weights))
        to_model_layout(model, cfg.run.channels_last)  # as the run computed it (up to rounding)
        found = analyze_model(model, batches, sigmas, draws, seed=k)
        found["flags"] = flatness_flags(found, model, data.num_classes, scored, draws)
        result["peers"][peer.name] = found
    (run_dir / ANALYSIS_FILE).write_text(json.dumps(result, indent=1))
    return result


# -- the figure -------------------------------------------------------------------------------


def readable_groups(groups: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    """`groups` without the results that carry `flags` (and without groups left empty)."""
    readable = {k: [p for p in ps if not p.get("flags")] for k, ps in groups.items()}
    return {k: ps for k, ps in readable.items() if ps}


def flatness_plot(
    groups: dict[str, list[dict[str, Any]]], sigmas: Sequence[float], path: Path
) -> Path:
    """Left: training-loss rise against sigma (mean ± std over the peers of each group); right:
    mean posterior entropy on the training set. One group per line (e.g. independent, DML);
    peers whose results carry `flags` are left out (a group of only such peers too)."""
    fig = Figure(figsize=(10, 3.8))
    rise_ax, ent_ax = fig.subplots(1, 2, gridspec_kw={"width_ratios": [2, 1]})
    groups = readable_groups(groups)
    for i, (label, peers) in enumerate(groups.items()):
        means = [statistics.mean(p["flatness"][f"{s:g}"] for p in peers) for s in sigmas]
        stds = [
            statistics.stdev([p["flatness"][f"{s:g}"] for p in peers]) if len(peers) > 1 else 0
            for s in sigmas
        ]
        rise_ax.errorbar(sigmas, means, yerr=stds, marker="o", capsize=3, label=label)
        entropies = [p["train_entropy"] for p in peers]
        ent_ax.bar(i, statistics.mean(entropies), yerr=statistics.pstdev(entropies), capsize=3)
    rise_ax.set_xscale("log")
    rise_ax.set_xlabel("σ of the Gaussian noise on every weight")
    rise_ax.set_ylabel("training loss rise (nats)")
    rise_ax.set_title("Flatness: loss rise under weight noise (lower: flatter)")
    if groups:
        rise_ax.legend()
    ent_ax.set_xticks(range(len(groups)), list(groups), rotation=15)
    ent_ax.set_ylabel("nats")
    ent_ax.set_title("Mean posterior entropy, training set")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def summary_table(results: Sequence[dict[str, Any]]) -> str:
    """A Markdown table: one row per analyzed student; its last column says whether the result
    reads as flatness (⚠ no: the reasons are `flag_lines`)."""
    sigmas = results[0]["sigmas"] if results else []
    head = ["run", "peer", "train acc. %", "train loss", "train entropy"]
    head += [f"rise σ={s:g}" for s in sigmas]
    head.append("flatness?")
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 3) + "---|"]
    for result in results:
        for name, p in result["peers"].items():
            cells = [Path(result["run"]).name, name, f"{100 * p['train_accuracy']:.2f}",
                     f"{p['train_loss']:.4f}", f"{p['train_entropy']:.4f}"]  # fmt: skip
            cells += [f"{p['flatness'][f'{s:g}']:.4f}" for s in sigmas]
            cells.append("⚠ no, see below" if p.get("flags") else "yes")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def flag_lines(results: Sequence[dict[str, Any]]) -> list[str]:
    """One warning line per reason a student's result cannot be read as flatness."""
    return [
        f"warning: {Path(result['run']).name}/{name}: not readable as flatness: {flag}"
        for result in results
        for name, p in result["peers"].items()
        for flag in p.get("flags", [])
    ]
