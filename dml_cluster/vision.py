"""Import torchvision, also where its compiled operators cannot load beside the installed torch.

PyPI's torchvision wheels for Linux are built against CUDA builds of torch. Beside a CPU build of
the same torch release (what this project installs on machines without a GPU) torchvision's
compiled extension does not load, and `import torchvision` then fails while registering fake
kernels for `torchvision::nms` / `qnms`, operators that only that extension defines. The
pure-Python parts (models, datasets, transforms; images are decoded with Pillow) do not need the
extension, so where that happens the two operator schemas are declared here and torchvision's
package is executed again. The detection operators stay unusable (calling them raises), as they
would be with any torchvision whose extension failed to load. Where the extension loads (a
matching build of torch), nothing is declared and torchvision imports as it always does.

This applies to every `import torchvision` of the interpreter once `install_import_hook` has run:
the installed package puts `dml_cluster_torchvision.pth` in site-packages (setup.py), whose one
line runs it at every interpreter start-up, so a user's own code (a factory, a dataset module,
`python -c "import torchvision"`) imports torchvision as the project does. This module imports
nothing heavy at start-up: torch is imported only when torchvision is.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # kept out of start-up, which imports this module (importlib.abc is slow)
    from importlib.abc import Loader
    from importlib.machinery import ModuleSpec
    from types import ModuleType
    from typing import Any

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_fragment: Any = None  # the torch.library.Library holding the schemas (kept: it owns them)


def _declare_detection_schemas() -> None:
    """Declare torchvision's two operators its Python code registers fake kernels for."""
    global _fragment
    import torch

    _fragment = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _SCHEMAS:
        _fragment.define(schema)


class _RetryingLoader:
    """torchvision's own loader, wrapped (an importlib Loader): when the package fails on the
    missing operators, the schemas are declared, its half-imported submodules forgotten and the
    package executed again."""

    def __init__(self, loader: Loader) -> None:
        self._loader = loader

    def __getattr__(self, name: str) -> Any:  # get_source, get_resource_reader, ...
        return getattr(self._loader, name)

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        kept = dict(module.__dict__)  # what the import system set: __spec__, __path__, ...
        try:
            self._loader.exec_module(module)
        except RuntimeError as err:
            if "torchvision::" not in str(err) or _fragment is not None:
                raise
            for name in [m for m in sys.modules if m.startswith("torchvision.")]:
                del sys.modules[name]
            module.__dict__.clear()
            module.__dict__.update(kept)
            _declare_detection_schemas()
            self._loader.exec_module(module)


class _TorchvisionFinder:
    """A meta path finder: finds torchvision as the other finders do and gives it the retrying
    loader."""

    def __init__(self) -> None:
        self._finding = False

    def find_spec(
        self, fullname: str, path: Any = None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname != "torchvision" or self._finding:
            return None
        self._finding = True
        spec = None
        try:
            for finder in sys.meta_path:
                if finder is not self and hasattr(finder, "find_spec"):
                    spec = finder.find_spec(fullname, path, target)
                    if spec is not None:
                        break
        finally:
            self._finding = False
        if spec is None or spec.loader is None:
            return None
        spec.loader = _RetryingLoader(spec.loader)
        return spec


def install_import_hook() -> None:
    """Every later `import torchvision` of this interpreter goes through `_RetryingLoader`
    (idempotent; run at start-up by the installed `dml_cluster_torchvision.pth`)."""
    if not any(isinstance(f, _TorchvisionFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _TorchvisionFinder())


def import_torchvision() -> ModuleType:
    """Return the torchvision module, declaring its detection operators' schemas if needed."""
    install_import_hook()  # also where the .pth is absent (PYTHONPATH on a source checkout)
    import torchvision

    return torchvision
