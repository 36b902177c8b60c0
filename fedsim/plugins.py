"""A user's code named by import path: ``"package.module:attr"``, the form of Flower's
``serverapp = "..."`` components.

The module is looked up in the current directory first, then in the installed packages
(as Flower loads an app's components from the app's folder). A mistake (no colon, a
module that does not import, a missing attribute) is a ConfigError of one line that
names the module and the Python error: a user's code is input like any other.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from typing import Any

from fedsim.errors import ConfigError

_PATH_RE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


def is_import_path(text: str) -> bool:
    """Whether ``text`` has the form ``package.module:attr`` (``attr`` may be dotted)."""
    return bool(_PATH_RE.match(text.strip()))


def load_attr(path: str, what: str) -> Any:
    """The object ``path`` ("module:attr") names; ``what`` (e.g. "model") is said in errors."""
    text = path.strip()
    if not is_import_path(text):
        raise ConfigError(f"{what}={path!r}: expected 'package.module:attr' (e.g. 'mytask.task:Net')")
    module_name, attr = text.split(":", 1)
    module = _import(module_name, what, path)
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            where = getattr(module, "__file__", None) or module_name
            raise ConfigError(f"{what}={path!r}: module {module_name!r} ({where}) has no attribute {attr!r}") from None
    return obj


def _import(module_name: str, what: str, path: str) -> Any:
    """Import ``module_name`` with the current directory first on the path."""
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module_name)
    except Exception as err:
        first = str(err).splitlines()[0] if str(err) else ""
        raise ConfigError(f"{what}={path!r}: importing module {module_name!r} failed: {type(err).__name__}: {first}") from None
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)
