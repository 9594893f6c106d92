"""The Git source: read manifests and the Ansible inventory from one commit (or a plain folder)."""

from lmstack.gitsource.inventory import Inventory, InventoryHost, parse_inventory
from lmstack.gitsource.repo import (
    Revision,
    Snapshot,
    SourceError,
    init_repository,
    read_commit,
    read_directory,
)
from lmstack.gitsource.source import Source, load_source, parse_snapshot

__all__ = [
    "Inventory",
    "InventoryHost",
    "Revision",
    "Snapshot",
    "Source",
    "SourceError",
    "init_repository",
    "load_source",
    "parse_inventory",
    "parse_snapshot",
    "read_commit",
    "read_directory",
]
