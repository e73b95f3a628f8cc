"""The user's code named in a config: `"package.module:attribute"` -> the object it names.

Used for the factories a config can name (models, datasets). The module is imported as Python
would import it, with the current directory on the path (as `python -m` has it, and as uvicorn
and gunicorn look up `module:app`). Every failure is one `ConfigError` line, without the key:
the caller prefixes the key it checks.
"""

from __future__ import annotations

import difflib
import importlib
import os
import sys
from typing import Any

from dml_cluster.errors import ConfigError, typed_first_line
from dml_cluster.vision import install_import_hook


def is_reference(text: str) -> bool:
    """Does `text` have the form `package.module:attribute`?"""
    module, sep, attr = text.partition(":")
    return bool(sep) and bool(module) and bool(attr)


def load_callable(reference: str) -> Any:
    """The callable that `reference` ("package.module:attribute", dots allowed in attribute)
    names; ConfigError when it cannot be imported, is missing or is not callable."""
    if not is_reference(reference):
        raise ConfigError(f"{reference!r} is not of the form 'package.module:function'")
    module_name, _, attr_path = reference.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    install_import_hook()  # the user's module may import torchvision (vision.py)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name is not None and f"{module_name}.".startswith(f"{err.name}."):
            raise ConfigError(
                f"cannot import {module_name!r} for {reference!r}: no module named {err.name!r} "
                "(install it, or run from the folder that holds it)"
            ) from None
        raise ConfigError(f"importing {module_name!r} for {reference!r} failed: {err}") from None
    except Exception as err:  # noqa: BLE001 - the user's module failing to import is one error
        raise ConfigError(
            f"importing {module_name!r} for {reference!r} failed: {typed_first_line(err)}"
        ) from None
    target: Any = module
    for part in attr_path.split("."):
        if not hasattr(target, part):
            public = [n for n in dir(target) if not n.startswith("_")]
            close = difflib.get_close_matches(part, public, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"{reference!r}: {module_name!r} has no attribute {part!r}{hint}")
        target = getattr(target, part)
    if not callable(target):
        raise ConfigError(f"{reference!r} is not callable (it is a {type(target).__name__})")
    return target
