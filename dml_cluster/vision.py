"""Import torchvision, also where its compiled operators cannot load beside the installed torch.

PyPI's torchvision wheels for Linux are built against CUDA builds of torch. Beside a CPU build of
the same torch release (what this project installs on machines without a GPU) torchvision's
compiled extension does not load, and `import torchvision` then fails while registering fake
kernels for `torchvision::nms` / `qnms`, operators that only that extension defines. The
pure-Python parts the project uses (models, datasets, transforms; images are decoded with Pillow)
do not need the extension, so where that happens the two operator schemas are declared here and
the import is retried. The detection operators stay unusable (calling them raises), as they would
be with any torchvision whose extension failed to load.
"""

from __future__ import annotations

import sys
from types import ModuleType

import torch

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_fragment: torch.library.Library | None = None


def import_torchvision() -> ModuleType:
    """Return the torchvision module, declaring its detection operators' schemas if needed."""
    global _fragment
    try:
        import torchvision
    except RuntimeError as err:
        if "torchvision::" not in str(err) or _fragment is not None:
            raise
        for name in [m for m in sys.modules if m.split(".")[0] == "torchvision"]:
            del sys.modules[name]
        _fragment = torch.library.Library("torchvision", "FRAGMENT")
        for schema in _SCHEMAS:
            _fragment.define(schema)
        import torchvision
    return torchvision
