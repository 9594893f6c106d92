"""One validated source: the desired state and inventory of one commit (or folder), or every error."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lmstack.config import Settings
from lmstack.gitsource.inventory import Inventory, parse_inventory
from lmstack.gitsource.repo import MANIFESTS_DIR, Revision, Snapshot, read_commit, read_directory
from lmstack.manifests.errors import ManifestError, ManifestValidationError
from lmstack.manifests.loader import DesiredState, load_manifests
from lmstack.manifests.policy import PushLimits

_MANIFEST_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class Source:
    desired: DesiredState
    inventory: Inventory
    revision: Revision | None  # None for a plain folder
    origin: str
    limits: PushLimits  # the operator's limits it was validated against (secrets are read within them)


def push_limits(settings: Settings) -> PushLimits:
    """The operator's limits on what a push may do, from the settings of the lmstack host."""
    return PushLimits.of(secrets_env_prefix=settings.secrets_env_prefix, mount_roots=settings.mount_roots,
                         docker_hosts=settings.docker_hosts,
                         secrets_dir=settings.secrets_dir or settings.home / "secrets",
                         local_host=settings.local_host, local_docker=settings.local_docker_url,
                         max_startup_timeout_s=settings.max_startup_timeout_s,
                         max_drain_timeout_s=settings.max_drain_timeout_s)


def load_source(*, repo: str | None, ref: str, directory: Path | None, settings: Settings) -> Source:
    """Read, parse and validate; raises SourceError (cannot read) or ManifestValidationError (invalid).

    Inventory and manifest errors are reported together, so one run shows everything to fix.
    """
    if (repo is None) == (directory is None):
        raise ValueError("load_source needs exactly one of repo or directory")
    if repo is not None:
        snapshot = read_commit(repo, ref, cache_dir=settings.repo_cache_dir)
    else:
        assert directory is not None
        snapshot = read_directory(directory)
    return parse_snapshot(snapshot, limits=push_limits(settings))


def parse_snapshot(snapshot: Snapshot, *, limits: PushLimits) -> Source:
    """Parse and validate files already read, within the operator's `limits`; raises ManifestValidationError
    with every error."""
    errors: list[ManifestError] = []
    inventory: Inventory | None = None
    try:
        inventory = parse_inventory(snapshot.files, local_host=limits.local_host)
    except ManifestValidationError as error:
        errors.extend(error.errors)

    manifests = {
        path: data
        for path, data in snapshot.files.items()
        if path.startswith(f"{MANIFESTS_DIR}/") and path.endswith(_MANIFEST_SUFFIXES)
    }
    desired: DesiredState | None = None
    try:
        # Without a parsed inventory, host references cannot be checked (None skips that check).
        addresses = {name: host.address for name, host in inventory.hosts.items()} if inventory else None
        desired = load_manifests(manifests, inventory_hosts=addresses, limits=limits)
    except ManifestValidationError as error:
        errors.extend(error.errors)

    if errors or desired is None or inventory is None:
        raise ManifestValidationError(errors)
    return Source(desired=desired, inventory=inventory, revision=snapshot.revision, origin=snapshot.origin,
                  limits=limits)
