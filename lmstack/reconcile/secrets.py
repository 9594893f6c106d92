"""Environment values for containers, resolved on the lmstack server: `{fromEnv: NAME}`, `{fromFile: PATH}`.

Secrets never live in Git; they are read here when a container is created and passed to Docker only.
Errors name the deployment and the variable, never a value.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any


class SecretError(Exception):
    pass


def resolve_env(deployment: str, env: Mapping[str, Any], *, environ: Mapping[str, str],
                base_dir: Path | None = None) -> dict[str, str]:
    """Plain values as they are; `fromEnv` from the server's environment; `fromFile` from a file on the server
    (relative paths from `base_dir`). Raises SecretError naming what is missing."""
    resolved: dict[str, str] = {}
    for name, value in env.items():
        if isinstance(value, str):
            resolved[name] = value
        elif isinstance(value, Mapping) and "fromEnv" in value:
            source = str(value["fromEnv"])
            if source not in environ:
                raise SecretError(f"deployment {deployment}: env {name} comes from the server's environment "
                                  f"variable {source}, which is not set where lmstack runs")
            resolved[name] = environ[source]
        elif isinstance(value, Mapping) and "fromFile" in value:
            path = Path(str(value["fromFile"])).expanduser()
            if not path.is_absolute() and base_dir is not None:
                path = base_dir / path
            try:
                resolved[name] = path.read_text().rstrip("\n")
            except OSError as exc:
                raise SecretError(f"deployment {deployment}: env {name} comes from the file {path}, which "
                                  f"cannot be read on the lmstack server ({exc.strerror})") from None
        else:
            raise SecretError(f"deployment {deployment}: env {name} has an unsupported form")
    return resolved
