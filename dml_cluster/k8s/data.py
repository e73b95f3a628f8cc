"""The user's data in the pods: a PersistentVolumeClaim, a read-only hostPath, or the image.

A config names local files (data roots, initial weights, teacher checkpoints, factory modules;
for text data the training and validation files or globs, a tokenizer.json, `hf:PATH` model
folders) that a pod cannot see. Given where the data lives in the pods, every path-valued key of
the shipped config is rewritten to it or checked against it:

- a relative path `p` is rewritten to `<mount>/p` (the claim, the node folder or the image folder
  holds the same layout as the folder `render` runs in); one under the config's `run.out_dir`
  (a teacher trained by an earlier run) stays relative: the pods find it in their workspace,
  which holds run folders when `--pvc` makes it a shared claim;
- an absolute path must lie under the data mount (a PVC, a hostPath), else no pod reaches it;
  with `--data-in-image` an absolute path is the image's own and is kept;
- a factory module that is a local file (`mydata.py` next to the config) is imported from the
  data mount (PYTHONPATH), or from the image folder.

A key that no pod can reach is one warning line naming it (`render` writes the manifests
anyway: the cluster may hold what this machine does not know about).

The data mount is read-only; text data's token cache (`data.cache_dir`, written by the run) goes
to the pods' workspace instead: `runs/.cache/tokens`, the default under the pods' run.out_dir
(a local data.cache_dir is this machine's folder, no pod's).
"""

from __future__ import annotations

import importlib.util
import os
import posixpath
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dml_cluster.data.text import CACHE_SUBDIR
from dml_cluster.k8s.options import RenderOptions
from dml_cluster.k8s.pod import RUN_OUT_DIR
from dml_cluster.models.hf_source import is_hf_name

DATA_VOLUME = "data"
PATH_KEYS = ("root", "weights", "checkpoint")  # string values under these keys are paths
TEXT_KEYS = ("train", "val", "tokenizer")  # text data's paths (or globs): strings or lists
BYTES_TOKENIZER = "bytes"  # data.tokenizer's built-in one: no file
HF_PREFIX = "hf:"
POD_TOKEN_CACHE = posixpath.join(RUN_OUT_DIR, *CACHE_SUBDIR.parts)
SKIPPED_SECTIONS = ("run", "metrics", "bus", "checkpoint")  # no user data there
# datasets read from a default folder when data.root is not set (dml_cluster/data/idx.py)
DEFAULT_ROOTS = {
    "fashion-mnist": "/usr/share/datasets/fashion-mnist",
    "mnist": "/usr/share/datasets/mnist",
}


@dataclass(frozen=True)
class DataPlacement:
    """Where the user's data is in every pod, and what the container needs for it."""

    volume: dict[str, Any] | None = None  # the pod volume holding the data
    mount: str | None = None  # where it is mounted (or the image folder)
    env: list[dict[str, str]] = field(default_factory=list)  # PYTHONPATH for factory modules
    warnings: list[str] = field(default_factory=list)

    def volume_mount(self) -> dict[str, Any] | None:
        if self.volume is None or self.mount is None:
            return None
        return {"name": DATA_VOLUME, "mountPath": self.mount, "readOnly": True}


def data_source(opts: RenderOptions) -> tuple[dict[str, Any] | None, str | None, str]:
    """(volume, mount, what) of the render options' data source; (None, None, '') for none."""
    if opts.data_pvc:
        claim = {"claimName": opts.data_pvc, "readOnly": True}
        volume = {"name": DATA_VOLUME, "persistentVolumeClaim": claim}
        return volume, opts.data_pvc_mount, f"--data-pvc {opts.data_pvc}"
    if opts.data_host_path:
        host = {"path": opts.data_host_path, "type": "Directory"}
        return {"name": DATA_VOLUME, "hostPath": host}, opts.data_host_mount, "--data-host-path"
    if opts.data_in_image:
        return None, opts.data_in_image, "--data-in-image"
    return None, None, ""


def place_data(raw: dict[str, Any], opts: RenderOptions, local_runs: str) -> DataPlacement:
    """Rewrite `raw`'s path-valued keys (in place) for the pods; `local_runs`: the config's
    run.out_dir as written (a checkpoint under it is a run folder, not data)."""
    volume, mount, what = data_source(opts)
    in_image = bool(opts.data_in_image)
    warnings: list[str] = []
    hint = "--data-pvc NAME[:MOUNT], --data-host-path PATH[:MOUNT] or --data-in-image DIR"
    runs = posixpath.normpath(local_runs)
    data = raw.get("data") or {}
    if data.get("name") in DEFAULT_ROOTS and not data.get("root"):
        raw["data"] = {**data, "root": DEFAULT_ROOTS[data["name"]]}  # explicit in the pods
    if data.get("name") == "text":  # the token cache on the writable workspace
        raw["data"] = {**raw["data"], "cache_dir": POD_TOKEN_CACHE}
    for key, holder, name, prefix, path in _all_path_keys(raw):
        if not os.path.isabs(path):
            norm = posixpath.normpath(path)
            if norm == runs or norm.startswith(runs + "/"):
                rest = posixpath.relpath(norm, runs)
                holder[name] = prefix + posixpath.join(RUN_OUT_DIR, rest)
                if not opts.pvc:
                    warnings.append(
                        f"{key}: {path} is a run folder; the pods' workspace is an emptyDir that "
                        "starts empty: give --pvc with the claim holding that run"
                    )
                continue
            if mount is None:
                warnings.append(f"{key}: {path} is a local path no pod can reach ({hint})")
                continue
            holder[name] = prefix + posixpath.join(mount, norm)
            continue
        if mount is not None and (in_image or _under(path, mount)):
            continue
        where = f"is not under the data mount {mount} ({what})" if mount else "is a local path"
        warnings.append(f"{key}: {path} {where}; no pod can reach it ({hint})")
    env: list[dict[str, str]] = []
    for key, module, origin in _local_modules(raw):
        if mount is None:
            warnings.append(
                f"{key}: module {module!r} is a local file ({origin}) no pod can import; put it "
                f"in the image or next to the data ({hint})"
            )
        elif not env:
            env.append({"name": "PYTHONPATH", "value": mount})
    return DataPlacement(volume, mount, env, warnings)


def add_data(placement: DataPlacement, spec: dict[str, Any]) -> dict[str, Any]:
    """A peer pod's spec with the data volume mounted read-only and the data's env."""
    mount = placement.volume_mount()
    if mount is None and not placement.env:
        return spec
    (main,) = spec["containers"]
    main = {**main, "env": [*main["env"], *placement.env]}
    if mount is not None:
        main["volumeMounts"] = [*main["volumeMounts"], mount]
        spec = {**spec, "volumes": [*spec["volumes"], placement.volume]}
    return {**spec, "containers": [main]}


def _under(path: str, mount: str) -> bool:
    path, mount = posixpath.normpath(path), posixpath.normpath(mount)
    return path == mount or path.startswith(mount.rstrip("/") + "/")


PathKey = tuple[str, Any, Any, str, str]
"""(dotted key, the dict or list holding it, its name or index there, what precedes the path in
the value ('hf:' or ''), the path)."""


def _all_path_keys(raw: dict[str, Any]) -> Iterator[PathKey]:
    """Every path of the config: path-valued keys, text data's files, `hf:` model folders."""
    for key, holder, name, path in _path_keys(raw):
        yield key, holder, name, "", path
    yield from _text_keys(raw)
    for key, holder, name, value in _model_keys(raw, hf=True):
        yield key, holder, name, HF_PREFIX, value.removeprefix(HF_PREFIX)


def _text_keys(raw: dict[str, Any]) -> Iterator[PathKey]:
    """data.train, data.val (a path or glob, or a list of them) and data.tokenizer (a file,
    unless the built-in bytes) of text data."""
    data = raw.get("data") or {}
    if data.get("name") != "text":
        return
    for name in TEXT_KEYS:
        value = data.get(name)
        if isinstance(value, str) and value and value != BYTES_TOKENIZER:
            yield f"data.{name}", data, name, "", value
        elif isinstance(value, list) and name != "tokenizer":
            for i, item in enumerate(value):
                if isinstance(item, str) and item:
                    yield f"data.{name}.{i}", value, i, "", item


def _path_keys(raw: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any], str, str]]:
    """(dotted key, the dict holding it, its name, the path) of every path-valued key."""

    def walk(node: Any, key: str) -> Iterator[tuple[str, dict[str, Any], str, str]]:
        if isinstance(node, dict):
            for name, value in node.items():
                dotted = f"{key}.{name}" if key else str(name)
                if not key and name in SKIPPED_SECTIONS:
                    continue
                if name in PATH_KEYS and isinstance(value, str) and value:
                    yield dotted, node, name, value
                else:
                    yield from walk(value, dotted)
        elif isinstance(node, list):
            for i, value in enumerate(node):
                yield from walk(value, f"{key}.{i}")

    yield from walk(raw, "")


def _local_modules(raw: dict[str, Any]) -> Iterator[tuple[str, str, str]]:
    """(key, module, file) of every factory reference (data.factory, a peer's `model:
    package.module:function`) whose module is a file under this folder, not an installed one."""
    refs: list[tuple[str, str]] = []
    data = raw.get("data") or {}
    if isinstance(data.get("factory"), str):
        refs.append(("data.factory", data["factory"]))
    for key, holder, name, _ in _model_keys(raw, hf=False):
        refs.append((key, holder[name]))
    here = Path.cwd().resolve()
    for key, ref in refs:
        module = ref.partition(":")[0].split(".")[0]
        origin = _module_file(module, here)
        if origin is not None:
            yield key, module, str(origin.relative_to(here))


def _model_keys(raw: dict[str, Any], *, hf: bool) -> Iterator[tuple[str, dict[str, Any], str, str]]:
    """Model names with a colon: `hf:PATH` ones (`hf`), or else factory references."""

    def walk(node: Any, key: str) -> Iterator[tuple[str, dict[str, Any], str, str]]:
        if isinstance(node, dict):
            for name, value in node.items():
                dotted = f"{key}.{name}" if key else str(name)
                if (
                    name == "model"
                    and isinstance(value, str)
                    and ":" in value
                    and is_hf_name(value) == hf
                ):
                    yield dotted, node, name, value
                else:
                    yield from walk(value, dotted)
        elif isinstance(node, list):
            for i, value in enumerate(node):
                yield from walk(value, f"{key}.{i}")

    yield from walk(raw, "")


def _module_file(module: str, here: Path) -> Path | None:
    """The file or package folder of top-level `module` when it is under `here` and not on the
    interpreter's own path (an installed package, this project)."""
    added = str(here) not in sys.path
    if added:
        sys.path.insert(0, str(here))
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    finally:
        if added:
            sys.path.remove(str(here))
    if spec is None or not spec.origin or spec.origin in ("built-in", "frozen"):
        return None
    origin = Path(spec.origin).resolve()
    if origin.name == "__init__.py":
        origin = origin.parent
    installed = any(part in ("site-packages", "dist-packages") for part in origin.parts)
    project = Path(__file__).resolve().parents[2]  # dml_cluster itself is in the image
    if (
        installed
        or origin.is_relative_to(project / "dml_cluster")
        or not origin.is_relative_to(here)
    ):
        return None
    return origin
