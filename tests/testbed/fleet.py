"""A fleet repository for the test bed's hosts, written as a user would: the bed's inventory, one Worker per
host, and the manifests a test gives.

    repo = write_fleet(tmp_path / "fleet", bed, {"chat.yaml": deployment_yaml}, message="one deployment")
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from lmstack.gitsource import init_repository


def workers_yaml(hosts: Iterable[Any], *, name: Callable[[Any], str] = lambda host: str(host.name),
                 labels: Callable[[Any], Mapping[str, str]] | None = None,
                 model_cache: Callable[[Any], object] | None = None) -> str:
    """One Worker document per host: named `name(host)`, on that host, with the labels and model cache given
    per host."""
    documents = []
    for host in hosts:
        metadata = f"name: {name(host)}"
        if labels is not None:
            metadata += ", labels: {" + ", ".join(f"{k}: '{v}'" for k, v in labels(host).items()) + "}"
        spec = f"host: {host.name}" + (f", modelCache: {model_cache(host)}" if model_cache is not None else "")
        documents.append(f"---\napiVersion: lmstack.dev/v1\nkind: Worker\nmetadata: {{{metadata}}}\nspec: {{{spec}}}\n")
    return "".join(documents)


def write_fleet(repo: Path, bed: Any, manifests: Mapping[str, str], *, workers: str | None = None,
                message: str | None = None) -> Path:
    """inventory/hosts.ini (the bed's hosts), manifests/workers.yaml (`workers`, default one Worker per host
    named after it) and `manifests` (file name under manifests/: text). With `message`, also committed."""
    (repo / "inventory").mkdir(parents=True)
    (repo / "manifests").mkdir()
    (repo / "inventory" / "hosts.ini").write_text(bed.inventory_ini())
    (repo / "manifests" / "workers.yaml").write_text(workers if workers is not None else workers_yaml(bed.hosts))
    for file, text in manifests.items():
        (repo / "manifests" / file).write_text(text)
    if message is not None:
        init_repository(repo, message)
    return repo
