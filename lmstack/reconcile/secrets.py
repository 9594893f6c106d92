"""Environment values for containers, resolved on the lmstack server: `{fromEnv: NAME}`, `{fromFile: PATH}`.

Secrets never live in Git; they are read here when a container is created and passed to Docker only, and
only where the operator allows (PushLimits: an environment prefix, a secrets directory). The manifests were
checked against the same limits when loaded; this checks again, on disk, because a symlink inside the
secrets directory may lead out of it. Errors name the deployment and the manifest field, never a value and
never what exists on the lmstack host: a file that is missing, unreadable or outside reads the same.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path

from lmstack.manifests.policy import MAX_SECRET_BYTES, PushLimits
from lmstack.manifests.schema import EnvFromEnv, EnvFromFile, EnvValue


class SecretError(Exception):
    pass


def resolve_env(deployment: str, env: Mapping[str, EnvValue], *, environ: Mapping[str, str],
                limits: PushLimits) -> dict[str, str]:
    """Plain values as they are; `fromEnv` from the server's environment; `fromFile` from a file in the
    operator's secrets directory (`limits.secrets_dir`). Raises SecretError naming the field."""
    resolved: dict[str, str] = {}
    for name, value in env.items():
        if isinstance(value, str):
            resolved[name] = value
        elif isinstance(value, EnvFromEnv):
            source = value.from_env
            field = f"deployment {deployment}: spec.env.{name}.fromEnv"
            problem = limits.env_name_problem(source)
            if problem is not None:
                raise SecretError(f"{field}: {problem}")
            if source not in environ:
                raise SecretError(f"{field}: the variable {source} is not set where lmstack runs")
            resolved[name] = environ[source]
        elif isinstance(value, EnvFromFile):
            resolved[name] = _read_secret(f"deployment {deployment}: spec.env.{name}.fromFile",
                                          value.from_file, limits)
        else:
            raise SecretError(f"deployment {deployment}: spec.env.{name} has an unsupported form")
    return resolved


def _read_secret(field: str, relative: str, limits: PushLimits) -> str:
    problem = limits.secret_file_problem(relative)
    if problem is not None:
        raise SecretError(f"{field}: {problem}")
    unreadable = SecretError(f"{field}: {relative!r} is not readable in the secrets directory")
    if limits.secrets_dir is None:
        raise unreadable
    # Symlinks followed: whatever the path names must lie inside the directory, itself resolved.
    directory = os.path.realpath(limits.secrets_dir)
    target = os.path.realpath(Path(directory) / relative)
    if os.path.commonpath([directory, target]) != directory or target == directory:
        raise unreadable
    try:
        # O_NONBLOCK: a FIFO must not stall apply; only regular files are read, and only so much.
        descriptor = os.open(target, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        raise unreadable from None
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise unreadable
        data = b""
        while len(data) <= MAX_SECRET_BYTES:
            chunk = os.read(descriptor, MAX_SECRET_BYTES + 1 - len(data))
            if not chunk:
                break
            data += chunk
    except OSError:
        raise unreadable from None
    finally:
        os.close(descriptor)
    if len(data) > MAX_SECRET_BYTES:
        raise SecretError(f"{field}: {relative!r} is larger than {MAX_SECRET_BYTES // 1024} KiB")
    try:
        return data.decode().rstrip("\n")
    except UnicodeDecodeError:
        raise SecretError(f"{field}: {relative!r} is not UTF-8 text") from None
