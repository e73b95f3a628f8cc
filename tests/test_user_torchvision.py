"""A user's own code imports torchvision in the project's environment (issue 21): the installed
package's `dml_cluster_torchvision.pth` (setup.py) installs dml_cluster/vision.py's import hook
at every interpreter start-up, so that every `import torchvision` loads, also where PyPI's
torchvision cannot load its compiled operators beside the CPU build of torch; the project
installs it too before it imports a user's module (importing.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import yaml

from .conftest import CLI, cli_env

PTH = "dml_cluster_torchvision.pth"

# a user's factory module, imported from the current directory: torchvision at its top, the
# first import of torchvision in its interpreter (models are checked when the config is loaded)
FACTORY = """
import torchvision
from torch import nn


def make(num_classes, input_shape):
    channels, height, width = input_shape
    mlp = torchvision.ops.MLP(channels * height * width, [16, num_classes])
    return nn.Sequential(nn.Flatten(), mlp)
"""


def test_the_environment_installs_the_hook_at_start_up() -> None:
    """`python -c "import torchvision"` in the environment: the hook is there before any line
    runs (the hook's loading itself is what the factory below goes through)."""
    installed = Path(sysconfig.get_paths()["purelib"], PTH)
    assert installed.exists(), (
        f"{installed} is missing: install the package again (pip install -e .; "
        "scripts/setup.sh does) so that setup.py writes it"
    )
    code = (
        "import sys; print([type(f).__name__ for f in sys.meta_path].count('_TorchvisionFinder'),"
        " 'torch' in sys.modules)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=cli_env(), capture_output=True, text=True, timeout=60
    )
    assert (proc.returncode, proc.stdout.strip()) == (0, "1 False"), proc.stderr


def test_a_factory_importing_torchvision_trains(tmp_path: Path) -> None:
    (tmp_path / "userfactory.py").write_text(FACTORY)
    raw = {
        "run": {"name": "tvf", "out_dir": str(tmp_path / "runs")},
        "data": {"name": "digits"},
        "cohort": {"peers": [{"name": "mine", "model": "userfactory:make"},
                             {"name": "cnn", "model": "small_cnn"}]},
        "train": {"epochs": 1, "max_steps": 2},
        "metrics": {"enabled": False},
    }  # fmt: skip
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    proc = subprocess.run(
        [*CLI, "train", "c.yaml"], cwd=tmp_path, env=cli_env(),
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "runs" / "tvf" / "summary.json").read_text())
    assert set(summary["peers"]) == {"mine", "cnn"}, summary
