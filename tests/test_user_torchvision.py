"""A user's own code imports torchvision in the project's environment (issue 21): the installed
package's `dml_cluster_torchvision.pth` (setup.py) installs dml_cluster/vision.py's import hook
at every interpreter start-up, so that every `import torchvision` loads, also where PyPI's
torchvision cannot load its compiled operators beside the CPU build of torch; the project
installs it too before it imports a user's module (importing.py).

Both checks read one fresh interpreter of tests/forked_runs.py (shared with the Ctrl-C phases of
tests/test_interrupts.py): what its start-up installed before it imported anything, and a
cohort, run in a child it forked before anything imported torchvision, whose factory module
begins with `import torchvision`."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

PTH = "dml_cluster_torchvision.pth"


def test_the_environment_installs_the_hook_at_start_up(forked_runs: Path) -> None:
    """A fresh interpreter of the environment: the hook is there before any line runs, torch
    not imported yet (the hook's loading itself is what the factory below goes through)."""
    installed = Path(sysconfig.get_paths()["purelib"], PTH)
    assert installed.exists(), (
        f"{installed} is missing: install the package again (pip install -e .; "
        "scripts/setup.sh does) so that setup.py writes it"
    )
    startup = json.loads((forked_runs / "startup.json").read_text())
    assert startup == {"hooks": 1, "torch": False}, startup


def test_a_factory_importing_torchvision_trains(forked_runs: Path) -> None:
    folder = forked_runs / "torchvision"
    code = json.loads((forked_runs / "codes.json").read_text())["torchvision"]
    assert code == 0, (folder / "stderr").read_text()
    summary = json.loads((folder / "runs" / "tvf" / "summary.json").read_text())
    assert set(summary["peers"]) == {"mine", "cnn"}, summary
