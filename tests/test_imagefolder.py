"""Training on a generated ImageFolder through the CLI: a 2-peer cohort over zmq and over
torch.distributed ends bitwise as the one-process engine across an epoch boundary (2 loader
workers per peer, augmentation on), a run killed mid-epoch resumes bitwise, and every bad data
input is one line, exit 2, nothing written."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from .cohort_runs import cli_each, sets
from .conftest import References, assert_same_states
from .faults_helpers import (
    cut_back_to,
    one_line_error,
    start,
    train,
    wait_for,
)
from .imagefolder_helpers import CLASSES, write_imagefolder

CONFIG = "configs/imagefolder-example.yaml"
# 4 classes x 48 PNGs of 12 x 10 -> 8 x 8; 6 steps per epoch, 2 epochs
SMALL = ("data.image_size=8", "data.batch_size=32", "data.workers=2", "data.augment.crop_padding=1",
         "cohort.model=small_cnn", "cohort.args.width=8", "train.epochs=2",
         "metrics.enabled=false", "bus.timeout_s=60")  # fmt: skip


@pytest.fixture(scope="module")
def images(two_peer_launch: Path) -> Path:
    return two_peer_launch / "test_imagefolder" / "images"


@pytest.fixture(scope="module")
def reference(images: Path, references: References) -> Path:
    (run,) = references((CONFIG, f"data.root={images}", *SMALL))
    return run


@pytest.mark.parametrize("transport", ["zmq", "torch"])
def test_a_two_peer_cohort_matches_the_one_process_engine(
    images: Path, reference: Path, cohorts: Path, transport: str
) -> None:
    assert_same_states(cohorts / transport, reference)
    record = json.loads((cohorts / transport / "data.json").read_text())
    assert record == json.loads((reference / "data.json").read_text())
    assert record["class_names"] == list(CLASSES) and record["num_train"] == 192


def launch_entries(folder: Path) -> list[list[str]]:
    """The images, and the zmq and the torch cohort of the session's two-peer launch (conftest's
    `two_peer_launch`), one after the other; their run folders in `folder`."""
    images = write_imagefolder(folder / "images")
    return [
        [CONFIG, *sets(f"data.root={images}", *SMALL, f"run.out_dir={folder}", f"run.name={t}",
                       f"bus.transport={t}")]
        for t in ("zmq", "torch")
    ]  # fmt: skip


@pytest.fixture(scope="module")
def cohorts(two_peer_launch: Path) -> Path:
    """The zmq and the torch cohort's run folders (`launch_entries`)."""
    out = two_peer_launch / "test_imagefolder"
    for t in ("zmq", "torch"):
        assert (out / t / "summary.json").exists(), (two_peer_launch / "launch.err").read_text()
    return out


def test_a_run_killed_mid_epoch_resumes_bitwise(
    images: Path, reference: Path, tmp_path: Path
) -> None:
    args = sets(f"data.root={images}", *SMALL, f"run.out_dir={tmp_path}", "run.name=killed",
                "checkpoint.every_steps=4", "checkpoint.keep=100")  # fmt: skip
    proc = start(*args, config=CONFIG)
    try:
        wait_for(tmp_path / "killed" / "checkpoints" / "step-000000004" / "manifest.json", proc)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate()
    cut_back_to(tmp_path / "killed", 4)  # whatever the kill caught after step 4
    resumed = train(*args, config=CONFIG)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at step 4 (epoch 1, step 4 of it)" in resumed.stdout
    assert_same_states(tmp_path / "killed", reference)


# -- bad input --------------------------------------------------------------------------------


def _bad_folders(base: Path) -> dict[str, Path]:
    """Data folders each wrong in one way."""
    empty = base / "empty"
    empty.mkdir(parents=True)
    no_val = base / "no-val"
    (no_val / "train" / "a").mkdir(parents=True)
    write_imagefolder(base / "tmp-src", per_class=2, val_per_class=1)
    (base / "tmp-src" / "train" / CLASSES[0] / "0000.png").rename(no_val / "train" / "a" / "x.png")
    no_classes = base / "no-classes"
    (no_classes / "train").mkdir(parents=True)
    (no_classes / "val").mkdir()
    classless = write_imagefolder(base / "classless", per_class=2, val_per_class=1)
    (classless / "train" / "empty-class").mkdir()
    (classless / "train" / "empty-class" / "notes.txt").write_text("no images here")
    corrupt = write_imagefolder(base / "corrupt", per_class=8, val_per_class=1)
    bad = corrupt / "train" / CLASSES[2] / "0003.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return {"empty": empty, "no-val": no_val, "no-classes": no_classes, "classless": classless,
            "corrupt": corrupt, "bad": bad}  # fmt: skip


BAD = [  # (case, extra settings, phrases of the one line)
    ("missing", ["data.root={base}/nowhere"], ["data.root:", "nowhere is not a folder"]),
    ("empty", ["data.root={empty}"], ["data.root:", "has no train/ folder"]),
    ("no-val", ["data.root={no-val}"], ["data.root:", "has no val/ or test/ folder"]),
    ("no-classes", ["data.root={no-classes}"], ["data.root:", "has no class folders"]),
    ("classless", ["data.root={classless}"], ["empty-class holds no images"]),
    ("corrupt-stats", ["data.root={corrupt}"], ["{bad}: cannot read the image"]),
    ("factory-import", ["data.name=python", "data.root=null", "data.image_size=null",
                        "data.factory=tests.no_such_module:make"],
     ["config error: data.factory:", "no module named 'tests.no_such_module'"]),
    ("factory-attr", ["data.name=python", "data.root=null", "data.image_size=null",
                      "data.factory=tests.data_factories:nope"],
     ["config error: data.factory:", "has no attribute 'nope'"]),
    ("factory-type", ["data.name=python", "data.root=null", "data.image_size=null",
                      "data.factory=tests.data_factories:not_a_tuple"],
     ["data.factory: tests.data_factories:not_a_tuple returned dict",
      "(train, test, num_classes[, class_names])"]),
    ("factory-splits", ["data.name=python", "data.root=null", "data.image_size=null",
                        "data.factory=tests.data_factories:lists_not_datasets"],
     ["the train split is a int, not a dataset"]),
    ("factory-raises", ["data.name=python", "data.root=null", "data.image_size=null",
                        "data.factory=tests.data_factories:broken"],
     ["RuntimeError: cannot reach the database"]),
    ("option-elsewhere", ["data.name=digits", "data.root=null"],
     ["config error: data.image_size: dataset 'digits' does not take it"]),
]  # fmt: skip


def test_bad_data_inputs_are_one_line_exit_2_nothing_written(images: Path, tmp_path: Path) -> None:
    folders = {k: str(v) for k, v in _bad_folders(tmp_path / "data").items()}
    folders["base"] = str(tmp_path / "data")
    out = tmp_path / "runs"
    commands = []
    for case, extra, _ in BAD:
        # the metrics endpoint on (it writes into the run folder once it starts): bad data
        # must stop the run before that
        items = [*SMALL, "metrics.enabled=true", "metrics.port=0",
                 *(e.format(**folders) for e in extra)]  # fmt: skip
        commands.append(["train", CONFIG, *sets(*items, f"run.out_dir={out}", f"run.name={case}")])
    # met during training (the statistics given, so no pass reads the file first): exit 2, the
    # file named; the run folder keeps what the run wrote before (a resumable checkpoint)
    during = [*SMALL, f"data.root={folders['corrupt']}", "data.normalize.mean=[0.5,0.5,0.5]",
              "data.normalize.std=[0.2,0.2,0.2]", f"run.out_dir={out}",
              "run.name=corrupt-train"]  # fmt: skip
    commands.append(["train", CONFIG, *sets(*during)])
    results = cli_each(commands, tmp_path / "bad.json")
    for (case, _, phrases), proc in zip(BAD, results, strict=False):
        assert proc.returncode == 2, (case, proc.stdout, proc.stderr)
        one_line_error(proc, *(p.format(**folders) for p in phrases))
        assert len(proc.stderr.strip().splitlines()) == 1, (case, proc.stderr)
        run_dir = out / case
        assert not run_dir.exists() or not any(run_dir.rglob("*")), (case, list(run_dir.rglob("*")))
    last = results[-1]
    assert last.returncode == 2, last.stderr
    one_line_error(last, f"{folders['bad']}: cannot read the image")
