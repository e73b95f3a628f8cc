"""The package's build, as pyproject.toml declares it, plus one file: `dml_cluster_torchvision.pth`
in site-packages, whose line makes every `import torchvision` of the environment load the way
dml_cluster/vision.py does (PyPI's torchvision beside a CPU build of torch). It is written in
both kinds of install: a wheel (`pip install .`, the Docker image) and an editable one
(`pip install -e .`, scripts/setup.sh)."""

from __future__ import annotations

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "dml_cluster_torchvision.pth"
# skipped quietly where dml_cluster is not importable (its editable source moved away)
PTH_LINE = (
    "import importlib.util; importlib.util.find_spec('dml_cluster') and "
    "__import__('dml_cluster.vision').vision.install_import_hook()\n"
)


class BuildPyWithPth(build_py):
    """build_py that also writes the .pth at the root of what becomes site-packages."""

    def run(self) -> None:
        super().run()
        # an editable wheel is assembled from the install folder, not from build_lib
        root = self.get_finalized_command("install").install_lib if self.editable_mode else None
        target = Path(root or self.build_lib, PTH)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(PTH_LINE)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib, PTH))]


setup(cmdclass={"build_py": BuildPyWithPth})
