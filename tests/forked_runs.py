"""One-process `dml-cluster train` jobs forked from one fresh interpreter: the suite's way to pay
an interpreter start-up (torch, the engine, scikit-learn's digits, torch's compiler front end)
once for several runs that each need a process of their own.

`python -c "from tests.forked_runs import drive; drive(ROOT)"` first records what the
interpreter's start-up installed (before it imports anything itself: the torchvision import hook
of the package's .pth file, tests/test_user_torchvision.py), then imports what a run imports and
forks one child per job, all at once. Each child is a job of its own, as a shell starts one (a
process group of its own), runs `dml-cluster train config.yaml` through the CLI's entry point in
ROOT/JOB with its output in ROOT/JOB/stdout and ROOT/JOB/stderr, and exits with the status
`dml-cluster` would. The jobs:

- each of tests/test_interrupts.py's PHASES: a run with loader workers that sends itself SIGINT
  there (`DML_CLUSTER_TEST_SIGINT_AT`);
- `torchvision`: a cohort with a user's factory module whose first line is `import torchvision`,
  the first import of torchvision in its interpreter (tests/test_user_torchvision.py).

ROOT/startup.json holds the start-up record, ROOT/codes.json {job: exit status}.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

PHASES = ("worker-start", "evaluation", "checkpoint", "epoch-boundary")
STOPPED = {
    "run": {"name": "stopped", "out_dir": "runs"},
    # 2 steps an epoch: each phase is a second away
    "data": {"name": "digits", "batch_size": 32, "workers": 2, "train_subset": {"per_class": 7}},
    "cohort": {"size": 2, "model": "small_cnn", "args": {"width": 4}},
    "train": {"epochs": 3},
    "metrics": {"enabled": False},
}
"""The interrupted runs' config (each in its phase's folder)."""

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
TORCHVISION = {
    "run": {"name": "tvf", "out_dir": "runs"},
    "data": {"name": "digits"},
    "cohort": {"peers": [{"name": "mine", "model": "userfactory:make"},
                         {"name": "cnn", "model": "small_cnn"}]},
    "train": {"epochs": 1, "max_steps": 2},
    "metrics": {"enabled": False},
}  # fmt: skip
"""The cohort with the user's factory: run in ROOT/torchvision, beside userfactory.py."""


def _write_jobs(root: Path) -> dict[str, dict[str, str]]:
    """Each job's folder and config; its environment's additions, by job."""
    import yaml

    jobs: dict[str, dict[str, str]] = {}
    for phase in PHASES:
        folder = root / phase
        folder.mkdir()
        (folder / "config.yaml").write_text(yaml.safe_dump(STOPPED))
        jobs[phase] = {"DML_CLUSTER_TEST_SIGINT_AT": phase}
    folder = root / "torchvision"
    folder.mkdir()
    (folder / "config.yaml").write_text(yaml.safe_dump(TORCHVISION))
    (folder / "userfactory.py").write_text(FACTORY)
    jobs["torchvision"] = {}
    return jobs


def drive(root: str) -> None:
    """Record the start-up, then fork the jobs and wait for them (see the module's docstring)."""
    finders = [type(f).__name__ for f in sys.meta_path]
    startup = {"hooks": finders.count("_TorchvisionFinder"), "torch": "torch" in sys.modules}
    Path(root, "startup.json").write_text(json.dumps(startup))
    # what a run imports, imported once before the children are forked: the engine, digits
    # (scikit-learn), torch's compiler front end (about 2 s of CPU in each child otherwise);
    # not torchvision, which the factory's job imports first
    import sklearn.datasets  # noqa: F401
    import torch._dynamo  # noqa: F401

    import dml_cluster.launch  # noqa: F401
    from dml_cluster import cli

    assert "torchvision" not in sys.modules, "the driver imported torchvision"
    children = {}
    for job, environ in _write_jobs(Path(root)).items():
        pid = os.fork()
        if pid == 0:  # the child: a job of its own, as a shell starts one
            code = 1
            try:
                os.setpgid(0, 0)
                os.chdir(Path(root, job))
                for fd, name in ((1, "stdout"), (2, "stderr")):
                    os.dup2(os.open(name, os.O_WRONLY | os.O_CREAT, 0o644), fd)
                os.environ.update(environ)
                sys.argv = ["dml-cluster", "train", "config.yaml"]
                cli.main()
                code = 0
            except SystemExit as stop:
                code = stop.code if isinstance(stop.code, int) else 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        children[pid] = job
    codes = {}
    for pid, job in children.items():
        _, status = os.waitpid(pid, 0)
        codes[job] = os.waitstatus_to_exitcode(status)
    Path(root, "codes.json").write_text(json.dumps(codes))
