"""What a push may ask of the lmstack host and of the workers: the operator's limits, checked as pure data.

People who can push have no shell on the lmstack host. A manifest may name secrets only where the operator
put them for this purpose (a directory, an environment prefix), Docker endpoints only on the worker's own
inventory address (or ones the operator lists), and mounts only directly inside the operator's roots. These
checks are lexical (nothing is read here); reading a secret checks again on disk (lmstack.reconcile.secrets).
"""

from __future__ import annotations

import posixpath
import re
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

# lmstack's own settings are LMSTACK_* variables (read case-insensitively by pydantic-settings); of those,
# only names under this prefix are ever secrets, whatever prefix an operator sets.
SETTINGS_PREFIX = "LMSTACK_"
SECRET_NAMESPACE = "LMSTACK_SECRET_"  # noqa: S105 (a variable name prefix, not a password)
DEFAULT_MOUNT_ROOT = "/var/lib/lmstack"
DEFAULT_LOCAL_DOCKER = "unix:///var/run/docker.sock"
DEFAULT_MAX_STARTUP_TIMEOUT_S = 2 * 3600  # a big model on a slow disk can take most of an hour to load
DEFAULT_MAX_DRAIN_TIMEOUT_S = 3600
MAX_SECRET_BYTES = 64 * 1024

# Never a mount root or a model cache, nor any directory above one of these (so never `/`).
SYSTEM_DIRECTORIES = frozenset({
    "/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib32", "/lib64", "/libx32", "/media", "/mnt",
    "/opt", "/proc", "/root", "/run", "/sbin", "/snap", "/srv", "/sys", "/usr", "/usr/local", "/var",
    "/var/cache", "/var/lib", "/var/log", "/var/mail", "/var/run", "/var/spool",
    "/tmp", "/var/tmp",  # noqa: S108 (refused here, not used)
})
# Nor anything inside these: the kernel's interfaces, configuration, programs, the container runtime's state.
SYSTEM_TREES = ("/bin", "/boot", "/dev", "/etc", "/proc", "/root", "/run", "/sbin", "/sys", "/usr", "/var/run",
                "/var/lib/docker", "/var/lib/containerd")

# Characters a mounted path may hold: Docker's bind syntax splits on ':' and ','; nothing here is a template.
_PATH_PATTERN = re.compile(r"[A-Za-z0-9._+@/-]+")
_SSH_USER = re.compile(r"[A-Za-z_][A-Za-z0-9._-]*")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _normalised(path: str) -> str | None:
    """What is wrong with `path` as an absolute, normalised path (None: nothing)."""
    if not path.startswith("/"):
        return "must be an absolute path"
    if _PATH_PATTERN.fullmatch(path) is None:
        return "may contain only letters, digits and . _ + @ - /"
    if ".." in path.split("/"):
        return "must not contain '..'"
    if posixpath.normpath(path) != path or path.startswith("//"):
        return f"must be written normalised ({posixpath.normpath(path)!r})"
    return None


def _inside(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def system_directory_problem(path: str) -> str | None:
    """Why `path` (absolute, normalised) may never be mounted: a system directory, above one, or inside one
    of the trees that belong to the system. None: it may be."""
    if path in SYSTEM_DIRECTORIES or any(_inside(system, path) for system in SYSTEM_DIRECTORIES):
        return f"{path} is (or holds) a system directory"
    top = path.split("/")[1] if path != "/" else ""
    if top.startswith("lib") or any(_inside(path, tree) for tree in SYSTEM_TREES):
        return f"{path} lies inside a system directory"
    return None


def mount_root_problem(path: str) -> str | None:
    """Why `path` cannot be an operator's mount root (for the Settings validator). None: it can."""
    return _normalised(path) or system_directory_problem(path)


def nested_roots_problem(roots: Iterable[str]) -> str | None:
    """Why these mount roots cannot be the operator's together: one inside another would make a model cache
    (a directory directly inside a root, writable by containers) the parent of another root's caches. None:
    they can."""
    ordered = sorted({root.rstrip("/") or "/" for root in roots})
    for outer in ordered:
        for inner in ordered:
            if inner != outer and _inside(inner, outer):
                return (f"{inner} lies inside {outer}: mount roots must not nest (a model cache directly inside "
                        f"{outer} would hold the caches of {inner}, and containers write to a cache)")
    return None


def secrets_dir_problem(directory: str, home: str) -> str | None:
    """Why `directory` (absolute) cannot be the operator's secrets directory, with lmstack's state in `home`
    (its JWT secret, its database): a push may read any file in it. None: it can."""
    directory, home = posixpath.normpath(directory), posixpath.normpath(home)
    if directory in SYSTEM_DIRECTORIES or any(_inside(system, directory) for system in SYSTEM_DIRECTORIES):
        return f"{directory} is (or holds) a system directory"
    if _inside(home, directory):
        return f"{directory} holds lmstack's own state (LMSTACK_HOME {home}: its JWT secret, its database)"
    return None


def env_prefix_problem(prefix: str) -> str | None:
    """Why `prefix` cannot be the operator's secrets environment prefix. None: it can."""
    if prefix and _ENV_NAME.fullmatch(prefix) is None:
        return "must be empty or letters, digits and '_', not starting with a digit"
    upper = prefix.upper()
    if upper.startswith(SETTINGS_PREFIX) and not (upper.startswith(SECRET_NAMESPACE)
                                                   or SECRET_NAMESPACE.startswith(upper)):
        return f"would name lmstack's own settings: a prefix starting with {SETTINGS_PREFIX} must start with " \
               f"{SECRET_NAMESPACE}"
    return None


@dataclass(frozen=True)
class PushLimits:
    """The operator's limits on what a manifest may ask for (built from Settings; never from Git).

    The defaults are the strictest: secrets only as LMSTACK_SECRET_* variables or files in the secrets
    directory, model caches only directly inside /var/lib/lmstack, Docker only over SSH to the worker's own address.
    """

    secrets_env_prefix: str = SECRET_NAMESPACE
    mount_roots: tuple[str, ...] = (DEFAULT_MOUNT_ROOT,)
    docker_hosts: frozenset[str] = frozenset()
    # Where `fromFile` paths are read, on the lmstack host (None: nowhere, every fromFile fails to resolve).
    secrets_dir: Path | None = field(default=None, compare=False)
    # The inventory host that is the lmstack host itself (`lmstack up`; None: none) and its Docker endpoint. Only
    # the operator makes a host local: the repository cannot name a local connection or a local Docker socket.
    local_host: str | None = None
    local_docker: str = DEFAULT_LOCAL_DOCKER
    # The longest waits a push may ask for, in seconds: a pass holds the one applier's lock while it waits.
    max_startup_timeout_s: int = DEFAULT_MAX_STARTUP_TIMEOUT_S
    max_drain_timeout_s: int = DEFAULT_MAX_DRAIN_TIMEOUT_S

    @classmethod
    def of(cls, *, secrets_env_prefix: str, mount_roots: Iterable[str | Path], docker_hosts: Iterable[str],
           secrets_dir: Path | None, local_host: str | None = None,
           local_docker: str = DEFAULT_LOCAL_DOCKER, max_startup_timeout_s: int = DEFAULT_MAX_STARTUP_TIMEOUT_S,
           max_drain_timeout_s: int = DEFAULT_MAX_DRAIN_TIMEOUT_S) -> PushLimits:
        return cls(secrets_env_prefix=secrets_env_prefix, mount_roots=tuple(str(p) for p in mount_roots),
                   docker_hosts=frozenset(docker_hosts), secrets_dir=secrets_dir, local_host=local_host,
                   local_docker=local_docker, max_startup_timeout_s=max_startup_timeout_s,
                   max_drain_timeout_s=max_drain_timeout_s)

    # -- waits (a pass holds the applier's lock while it waits) ------------------------------------------

    def wait_problem(self, field: str, seconds: int) -> str | None:
        """Why `seconds` of health.startupTimeout / rollout.drainTimeout is more than the operator allows."""
        limit, setting = ((self.max_startup_timeout_s, "LMSTACK_MAX_STARTUP_TIMEOUT_S") if field == "startupTimeout"
                          else (self.max_drain_timeout_s, "LMSTACK_MAX_DRAIN_TIMEOUT_S"))
        if seconds > limit:
            return (f"{seconds} s is more than the operator allows ({limit} s, {setting}): a rollout holds the "
                    "controller while it waits")
        return None

    # -- secrets (read on the lmstack host) -----------------------------------------------------------

    def env_name_problem(self, name: str) -> str | None:
        """Why `{fromEnv: name}` is not allowed. None: it is."""
        upper = name.upper()
        if upper.startswith(SETTINGS_PREFIX) and not upper.startswith(SECRET_NAMESPACE):
            return f"{name!r} is one of lmstack's own settings, never passed to a container"
        if not name.startswith(self.secrets_env_prefix):
            return (f"may only name variables starting with {self.secrets_env_prefix!r} "
                    "(the operator's LMSTACK_SECRETS_ENV_PREFIX)")
        return None

    @staticmethod
    def secret_file_problem(path: str) -> str | None:
        """Why `{fromFile: path}` is not allowed, lexically. None: it may be read, if it resolves inside the
        secrets directory."""
        if path.startswith(("/", "~")) or "\x00" in path:
            return "must be a path relative to the operator's secrets directory (LMSTACK_SECRETS_DIR)"
        if ".." in path.split("/"):
            return "must not contain '..': only files inside the operator's secrets directory can be read"
        return None

    # -- workers ------------------------------------------------------------------------------------

    def model_cache_problem(self, path: str) -> str | None:
        """Why `modelCache: path` is not allowed (it is mounted read-write into containers). None: it is.

        A cache is a directory directly inside a mount root: never the root itself, never deeper. Then the
        directory that holds a cache is never mounted into a container, so no container can plant a symlink
        that a later modelCache passes through (Docker and `lmstack prepare` would follow it on the worker).
        The workers refuse a cache that is itself a symlink (playbooks/library)."""
        problem = _normalised(path) or system_directory_problem(path)
        if problem is not None:
            return problem
        roots = [root.rstrip("/") or "/" for root in self.mount_roots]
        allowed = f"({', '.join(roots) or 'none'}; LMSTACK_MOUNT_ROOTS)"
        if path in roots:
            return f"must be a directory directly inside a mount root {allowed}, not the root: e.g. {path}/models"
        if posixpath.dirname(path) in roots:
            return None
        holder = next((root for root in roots if _inside(path, root)), None)
        if holder is None:
            return f"must lie under a directory the operator allows for mounts {allowed}, directly inside it"
        child = path[len(holder):].lstrip("/").split("/")[0]
        return (f"must be a directory directly inside a mount root {allowed}, not deeper (e.g. "
                f"{holder.rstrip('/')}/{child}): a "
                "directory that holds a cache may be another cache, which containers can write to")

    def docker_host_problem(self, url: str, address: str | None) -> str | None:
        """Why `dockerHost: url` is not allowed for a worker whose inventory address is `address` (None:
        unknown, only the form is checked). None: it is."""
        if url in self.docker_hosts:
            return None
        wanted = f"ssh://[USER@]{address or 'ADDRESS'}[:PORT]"
        refusal = (f"must be {wanted}, the worker's own inventory address; other Docker endpoints only when "
                   "the operator lists them (LMSTACK_DOCKER_HOSTS)")
        try:
            parsed = urllib.parse.urlsplit(url)
            port = parsed.port
        except ValueError:
            return refusal
        if (parsed.scheme != "ssh" or not url.startswith("ssh://") or parsed.path or parsed.query
                or parsed.fragment or parsed.password is not None or not parsed.hostname
                or port == 0 or "%" in url or any(c.isspace() for c in url)):
            return refusal
        if parsed.username is not None and _SSH_USER.fullmatch(parsed.username) is None:
            return refusal
        if address is not None and parsed.hostname != address.strip("[]").lower():
            return refusal
        return None


DEFAULT_LIMITS = PushLimits()
