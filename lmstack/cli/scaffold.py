"""`lmstack init`: a manifests repository to start from (the same example as the project's own)."""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

TEMPLATES = resources.files("lmstack.cli") / "templates"


class ScaffoldError(Exception):
    pass


def scaffold(target: Path) -> list[Path]:
    """Copy the example inventory and manifests into `target`; refuse to overwrite anything."""
    if target.exists() and any(target.iterdir()):
        raise ScaffoldError(f"{target} is not empty; choose a new folder")
    target.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    with resources.as_file(TEMPLATES) as root:
        for source in sorted(Path(root).rglob("*")):
            if source.is_dir() or "__pycache__" in source.parts:
                continue
            destination = target / source.relative_to(root)
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, destination)
            written.append(destination)
    return written
