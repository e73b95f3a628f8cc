"""No op that raises on CUDA under `torch.use_deterministic_algorithms(True)` (the `strict` mode)
hides in dml_cluster/: a static scan of every module, so a CPU machine catches what only a GPU
would raise. A use is allowed when its line (or the line above) carries a marker comment
`# deterministic: <why it is safe here>`.

The list is torch's documented one (the docstring of torch.use_deterministic_algorithms, section
"will throw a RuntimeError"; torch 2.11-2.14 list the same ops), with each op's functional and
module spellings; a test keeps it in step with the installed torch's docstring.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

PACKAGE = Path(__file__).resolve().parents[1] / "dml_cluster"
MARKER = "# deterministic:"

# documented name -> the spellings that reach it (class, functional, tensor method)
RAISING: dict[str, tuple[str, ...]] = {
    "AvgPool3d": ("AvgPool3d", "avg_pool3d"),
    "AdaptiveAvgPool2d": ("AdaptiveAvgPool2d", "adaptive_avg_pool2d"),
    "AdaptiveAvgPool3d": ("AdaptiveAvgPool3d", "adaptive_avg_pool3d"),
    "AdaptiveMaxPool2d": ("AdaptiveMaxPool2d", "adaptive_max_pool2d"),
    "FractionalMaxPool2d": ("FractionalMaxPool2d", "fractional_max_pool2d"),
    "FractionalMaxPool3d": ("FractionalMaxPool3d", "fractional_max_pool3d"),
    "MaxUnpool1d": ("MaxUnpool1d", "max_unpool1d"),
    "MaxUnpool2d": ("MaxUnpool2d", "max_unpool2d"),
    "MaxUnpool3d": ("MaxUnpool3d", "max_unpool3d"),
    "interpolate": ("interpolate", "Upsample", "UpsamplingBilinear2d", "upsample"),
    "ReflectionPad1d": ("ReflectionPad1d",),
    "ReflectionPad2d": ("ReflectionPad2d",),
    "ReflectionPad3d": ("ReflectionPad3d",),
    "NLLLoss": ("NLLLoss", "nll_loss", "CrossEntropyLoss", "cross_entropy"),
    "CTCLoss": ("CTCLoss", "ctc_loss"),
    "EmbeddingBag": ("EmbeddingBag", "embedding_bag"),
    "put_": ("put_", "put"),
    "histc": ("histc",),
    "bincount": ("bincount",),
    "median": ("median", "nanmedian"),
    "grid_sample": ("grid_sample",),
    "cumsum": ("cumsum", "cumsum_"),
    "scatter_reduce": ("scatter_reduce", "scatter_reduce_"),
    "resize_": ("resize_",),
}
SPELLINGS = {s for names in RAISING.values() for s in names}
REFLECT_PAD = {"reflect"}  # F.pad(..., mode="reflect") is ReflectionPad


def _imported_names(tree: ast.Module) -> set[str]:
    """Names bound by imports of anything but torch (`statistics`, `from dml_cluster import
    losses`): `statistics.median` is no tensor op, and `losses.cross_entropy` is the project's
    function, checked where it is defined."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and not (node.module or "").startswith("torch"):
            names |= {a.asname or a.name for a in node.names}
        if isinstance(node, ast.Import):
            names |= {a.asname or a.name for a in node.names if not a.name.startswith("torch")}
    return names


def raising_uses(source: str) -> list[tuple[int, str]]:
    """(line, spelling) of every use of a raising op in `source` without a marker."""
    tree = ast.parse(source)
    lines = source.splitlines()
    own = _imported_names(tree)
    hits: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        name = None
        if isinstance(node, ast.Attribute) and node.attr in SPELLINGS:
            base = node.value
            if not (isinstance(base, ast.Name) and base.id in own):
                name = node.attr
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch"):
            found = [a.name for a in node.names if a.name in SPELLINGS]
            name = found[0] if found else None
        elif _is_reflect_mode(node):
            name = "pad(mode='reflect')"
        if name is None:
            continue
        if not _marked(lines, node.lineno):
            hits.append((node.lineno, name))
    return hits


def _is_reflect_mode(node: ast.AST) -> bool:
    """`mode="reflect"` (F.pad's reflection padding)."""
    return (
        isinstance(node, ast.keyword)
        and node.arg == "mode"
        and isinstance(node.value, ast.Constant)
        and node.value.value in REFLECT_PAD
    )


def _marked(lines: list[str], lineno: int) -> bool:
    """The marker on the line itself or in the comment block right above it."""
    if MARKER in lines[lineno - 1]:
        return True
    above = lineno - 2
    while above >= 0 and lines[above].strip().startswith("#"):
        if lines[above].strip().startswith(MARKER):
            return True
        above -= 1
    return False


def test_no_module_uses_an_op_that_raises_under_strict_determinism() -> None:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for line, name in raising_uses(path.read_text()):
            found.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {name}")
    assert not found, (
        "ops that raise on CUDA under run.deterministic: strict (use a deterministic "
        f"equivalent, or add '{MARKER} <why safe>'):\n" + "\n".join(found)
    )


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import torch.nn as nn\np = nn.AdaptiveAvgPool2d(1)\n", [(2, "AdaptiveAvgPool2d")]),
        ("import torch\nc = torch.bincount(y, weights=w)\n", [(2, "bincount")]),
        ("F.pad(x, (1, 1), mode='reflect')\n", [(1, "pad(mode='reflect')")]),
        ("from torch.nn.functional import interpolate\n", [(1, "interpolate")]),
        ("s = x.cumsum(0)  # deterministic: CPU-only tensor\n", []),
        ("# deterministic: 2-D input\nl = F.cross_entropy(z, y)\n", []),
        ("# deterministic: [B, C]\n# input\nl = F.cross_entropy(z, y)\n", []),
        ("# an unrelated comment\nl = F.cross_entropy(z, y)\n", [(2, "cross_entropy")]),
        ("from dml_cluster import losses\nl = losses.cross_entropy(z, y)\n", []),
        ("import statistics\nm = statistics.median(times)\n", []),
        ("m = times.median()\n", [(1, "median")]),
        ('"""AdaptiveAvgPool2d in a docstring"""\n', []),
    ],
)  # fmt: skip
def test_the_scan_finds_uses_and_honours_markers(source: str, expected: list) -> None:
    assert raising_uses(source) == expected


def test_the_list_covers_the_installed_torchs_documented_list() -> None:
    """Every op torch's docstring says raises is one the scan looks for (a torch upgrade that
    adds one fails here until it is added above)."""
    doc = torch.use_deterministic_algorithms.__doc__ or ""
    section = doc.split("operations will throw a")[-1].split("In addition")[0]
    documented = {m.split(".")[-1] for m in re.findall(r"`(torch\.[\w.]+)`", section)}
    assert documented, "torch's docstring changed shape: read the list by hand"
    assert documented <= set(RAISING), sorted(documented - set(RAISING))
