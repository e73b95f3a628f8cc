"""A round of candidates evaluated through the cohort.

The round's new candidates train together as the students of ONE cohort: with reward `kd` the
cohort's teacher peer is the frozen teacher (method kd: its forward pass is paid once per batch
for every candidate), with reward `ce` they train alone (method independent). The cohort runs
with the project's own engine: in this process (`run_local`), or one process per peer
(`--nproc`, torch's elastic launcher) -- same trainer, bus, checkpoints (a killed round resumes
from its last one) and metrics. Candidates train on the config's training subset and are
evaluated on the validation split, training images the subset left out (`holdout`): a round
never reads the test set.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dml_cluster.config import Config, DataConfig
from dml_cluster.data import load_dataset, loader_options
from dml_cluster.errors import DmlError
from dml_cluster.search.holdout import FACTORY
from dml_cluster.search.settings import SearchConfig
from dml_cluster.search.space import Arch

TEACHER = "teacher"


@dataclass(frozen=True)
class DataShape:
    """What a candidate's network is built for."""

    input_shape: tuple[int, int, int]
    num_classes: int
    normalize: dict[str, list[float]] | None = None
    flip: bool = False


def data_shape(scfg: SearchConfig) -> DataShape:
    """The dataset's input shape, classes and flip default, and its own normalisation (as
    `data.normalize` gives it: [0, 1] units for 8-bit pixels) so that the proxy runs normalise
    as the teacher's training did, not by the subset's statistics."""
    data = DataConfig.model_validate(scfg.base.get("data") or {})
    loaded = load_dataset(data.name, data.root, **loader_options(data))
    normalize = None
    if loaded.normalisation is not None:
        image = loaded.train[0][0]
        scale = 1.0 if image.dtype.is_floating_point else 255.0
        stats = loaded.normalisation
        normalize = {
            "mean": [m / scale for m in stats.mean],
            "std": [s / scale for s in stats.std],
        }
    return DataShape(loaded.input_shape, loaded.num_classes, normalize, loaded.flip)


def proxy_data(scfg: SearchConfig, shape: DataShape) -> dict[str, Any]:
    """The `data` section of the candidates' proxy training: the `holdout` factory over the
    config's dataset, its train_subset (or `search.proxy_subset`) and the validation split."""
    base = DataConfig.model_validate(scfg.base.get("data") or {})
    subset = base.train_subset or scfg.search.proxy_subset
    run_seed = int((scfg.base.get("run") or {}).get("seed", 0))
    options = {
        "dataset": base.name,
        "dataset_options": loader_options(base),
        "per_class": subset.per_class,
        "fraction": subset.fraction,
        "seed": run_seed if subset.seed is None else subset.seed,
        "validation_per_class": scfg.search.validation_per_class,
    }
    data = base.model_dump(exclude={"train_subset", "options", "factory", "image_size"})
    if base.augment.flip is None:  # the factory's splits do not say; the dataset does
        data["augment"] = {**data["augment"], "flip": shape.flip}
    return {**data, "name": "python", "factory": FACTORY, "options": options, "root": base.root,
            "workers": 0, "normalize": shape.normalize}  # fmt: skip


def search_folder(scfg: SearchConfig) -> Path:
    """<run.out_dir>/<run.name> of the search config."""
    run = scfg.base.get("run") or {}
    return Path(run.get("out_dir", "runs")) / run.get("name", "search")


def peer_name(arch: Arch) -> str:
    return f"c{arch.hash()}"


def round_config(
    scfg: SearchConfig,
    archs: list[Arch],
    out_dir: Path,
    name: str,
    *,
    shape: DataShape | None = None,
    retrain_seed: int | None = None,
) -> Config:
    """The cohort config of a round (`shape` given: proxy training on the training subset) or
    of a retrain (`retrain_seed`: KD from the teacher on the config's own data, full epochs)."""
    search, base = scfg.search, scfg.base
    teacher = {"name": TEACHER, **search.teacher.model_dump(), "role": "teacher"}
    students = [
        {"name": peer_name(a), "model": "searched", "args": {"arch": a.to_dict()}} for a in archs
    ]
    kd = search.reward == "kd" or shape is None
    method = {**(base.get("method") or {}), "name": "kd"} if kd else {"name": "independent"}
    run = {**(base.get("run") or {}), "name": name, "out_dir": str(out_dir)}
    train = dict(base.get("train") or {})
    data = dict(base.get("data") or {})
    if shape is not None:
        train.update(epochs=search.proxy_epochs, eval_every=search.proxy_epochs, max_steps=None)
        data = proxy_data(scfg, shape)
    else:
        run["seed"] = retrain_seed if retrain_seed is not None else run.get("seed", 0)
        train["epochs"] = search.retrain.epochs or train.get("epochs", 10)
    sections: dict[str, Any] = {"run": run, "train": train, "data": data, "method": method}
    if "metrics" not in base:  # the search reports its own progress
        sections["metrics"] = {"enabled": False}
    return scfg.round_config(([teacher] if kd else []) + students, sections)


def train_cohort(cfg: Config, nproc: bool) -> None:
    """Train the cohort `cfg` with the project's engine; its output goes to its run folder."""
    folder = cfg.run.dir
    folder.mkdir(parents=True, exist_ok=True)
    if nproc:
        from dml_cluster.launch import launch_elastic

        path = folder / "config.yaml"
        path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        overrides = [] if cfg.bus.transport != "local" else ["bus.transport=zmq"]
        status = launch_elastic(str(path), overrides, len(cfg.peers))
        if status != 0:
            raise DmlError(f"the cohort in {folder} failed (exit {status}); see its logs")
        return
    from dml_cluster.launch import run_local

    with (folder / "train.log").open("a") as log, contextlib.redirect_stdout(log):
        run_local(cfg)


def score(cfg: Config, archs: list[Arch]) -> dict[str, float]:
    """Validation accuracy of each trained candidate, by arch hash: the final evaluation of its
    proxy run, whose "test" split is the validation split (`holdout`)."""
    summary = json.loads((cfg.run.dir / "summary.json").read_text())
    return {a.hash(): summary["peers"][peer_name(a)]["final_accuracy"] for a in archs}
