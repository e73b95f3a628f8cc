"""Unreadable images are found before training where a pass reads them anyway (issue 21, item 6):
the evaluation split always, the train split in the statistics pass; every one counted in one
line, exit 2, nothing written. What no pass reads first (the train split with `data.normalize`)
is still checked as training reads it. In-process, through the CLI's own entry point."""

from __future__ import annotations

from pathlib import Path

import pytest

from dml_cluster.data.scan import NAMED

from .conftest import cli_in_process
from .imagefolder_helpers import CLASSES, write_imagefolder

CONFIG = "configs/imagefolder-example.yaml"
SMALL = ("data.image_size=8", "data.batch_size=8", "data.workers=0", "cohort.model=small_cnn",
         "cohort.args.width=4", "train.epochs=1", "metrics.enabled=false",
         "run.progress_every_s=0")  # fmt: skip
NORMALIZE = ("data.normalize.mean=[0.5,0.5,0.5]", "data.normalize.std=[0.2,0.2,0.2]")


def _train(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *settings: str):
    """`dml-cluster train CONFIG --set ...` in this process: (exit status, stdout, stderr)."""
    args = [arg for s in (*SMALL, *settings) for arg in ("--set", s)]
    return cli_in_process(monkeypatch, capsys, "train", CONFIG, *args)


def _break(path: Path, how: str) -> Path:
    """Make the image at `path` unreadable: not an image, empty, or cut short."""
    if how == "garbage":
        path.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    elif how == "empty":
        path.write_bytes(b"")
    else:
        path.write_bytes(path.read_bytes()[:60])
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return write_imagefolder(tmp_path / "images", per_class=6, val_per_class=2)


def test_every_unreadable_image_of_both_splits_is_one_line_before_anything_is_written(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    broken = [
        _break(folder / "train" / CLASSES[0] / "0001.png", "garbage"),
        _break(folder / "train" / CLASSES[2] / "0004.png", "empty"),
        _break(folder / "val" / CLASSES[1] / "0000.png", "truncated"),
        _break(folder / "val" / CLASSES[3] / "0001.png", "garbage"),
        _break(folder / "val" / CLASSES[3] / "0000.png", "empty"),
    ]
    out = tmp_path / "runs"
    code, stdout, stderr = _train(
        monkeypatch, capsys, f"data.root={folder}", f"run.out_dir={out}", "run.name=bad"
    )
    assert code == 2, stderr
    (line,) = stderr.strip().splitlines()
    assert "Traceback" not in stdout + stderr
    assert f"imagefolder: {len(broken)} images cannot be read (train 2, val 3): " in line
    assert f"and {len(broken) - NAMED} more; replace or remove them" in line
    named = [p for p in broken if str(p) in line]
    assert len(named) == NAMED, line  # the first few named, in the order of the splits' files
    assert "image file is truncated" in line
    assert not out.exists() or not any(out.rglob("*")), list(out.rglob("*"))


def test_the_evaluation_split_is_checked_before_training_also_with_given_statistics(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    bad = _break(folder / "val" / CLASSES[2] / "0001.png", "truncated")
    out = tmp_path / "runs"
    code, _, stderr = _train(
        monkeypatch, capsys, f"data.root={folder}", *NORMALIZE, f"run.out_dir={out}"
    )
    assert code == 2, stderr
    # one unreadable image: the line it gives alone, as when training meets it
    assert stderr.strip() == (
        f"dml-cluster: {bad}: cannot read the image (OSError: image file is truncated); "
        "replace or remove the file"
    )
    assert not out.exists() or not any(out.rglob("*")), list(out.rglob("*"))


def test_a_train_split_no_pass_reads_first_is_checked_as_it_is_read(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """With `data.normalize` no statistics pass reads the train split: the run starts, and the
    batch holding the file stops it with one line naming it."""
    bad = _break(folder / "train" / CLASSES[1] / "0002.png", "garbage")
    out = tmp_path / "runs"
    code, _, stderr = _train(
        monkeypatch, capsys, f"data.root={folder}", *NORMALIZE, f"run.out_dir={out}",
        "run.name=lazy",
    )  # fmt: skip
    assert code == 2, stderr
    assert stderr.strip().splitlines() == [
        f"dml-cluster: {bad}: cannot read the image (UnidentifiedImageError); replace or remove "
        "the file"
    ]
