"""lmstack's own Ansible modules (playbooks/library/), loaded as Python modules so tests can call their
functions directly; tests that run them as Ansible does use `path(...)` with a subprocess."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

LIBRARY = Path(__file__).resolve().parent.parent / "playbooks" / "library"


def path(name: str) -> Path:
    """The module file, e.g. path("lmstack_facts")."""
    return LIBRARY / f"{name}.py"


def load(name: str, *, as_name: str | None = None) -> ModuleType:
    """A fresh module object for playbooks/library/<name>.py (`as_name`: another name, for a separate copy
    that one test file may patch without touching another's)."""
    spec = importlib.util.spec_from_file_location(as_name or name, path(name))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
