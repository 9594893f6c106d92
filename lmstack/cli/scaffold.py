"""`lmstack init`: a manifests repository to start from (the same example as the project's own)."""

from __future__ import annotations

import json
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


# --- `lmstack up`: a fleet whose only worker is this machine ----------------------------------------------

LOCAL_WORKER = "local"  # the inventory host and the Worker that are this machine in `lmstack up`'s repository


def local_fleet_files(*, model_cache: str) -> dict[str, str]:
    """The inventory and the Worker of a fleet of one machine, this one (by repository-relative path)."""
    return {
        "inventory/hosts.ini": (
            "# The Ansible inventory lmstack uses: exactly what `ansible-playbook -i inventory/` takes.\n"
            f"# `{LOCAL_WORKER}` is the machine that runs lmstack. lmstack reaches it through Ansible's local\n"
            "# connection and the local Docker because its operator said so (LMSTACK_LOCAL_HOST, written to\n"
            "# LMSTACK_HOME/local-host by `lmstack up`), never because of anything in this repository.\n"
            "# Add GPU machines below it (`gpu-a ansible_host=10.0.0.11 ansible_user=root`), with a Worker each\n"
            "# in manifests/workers.yaml.\n"
            "[workers]\n"
            f"{LOCAL_WORKER} ansible_host=127.0.0.1\n"
        ),
        "manifests/workers.yaml": (
            "# Workers: the machines lmstack may run replicas on. `host` is an inventory host.\n"
            "apiVersion: lmstack.dev/v1\n"
            "kind: Worker\n"
            "metadata:\n"
            f"  name: {LOCAL_WORKER}\n"
            "spec:\n"
            f"  host: {LOCAL_WORKER}\n"
            "  gpus: all\n"
            f"  modelCache: {model_cache}\n"
        ),
        "README.md": (
            "# A fleet of one machine, written by `lmstack up`\n\n"
            "Edit a manifest and commit: `lmstack serve` (started by `lmstack up`) applies the commit.\n"
            "`lmstack validate --dir .` checks the files first; `lmstack down` stops everything.\n"
        ),
    }


def deployment_file(*, name: str, backend: str, model: str, gpus: int, image: str | None,
                    note: str) -> tuple[str, str]:
    """A Deployment manifest (its path and text): one replica of `model` on `backend`."""
    lines = [
        f"# {note}",
        "# Change it and commit: lmstack rolls the new spec out (the old replica serves until the new one is",
        "# ready).",
        "apiVersion: lmstack.dev/v1",
        "kind: Deployment",
        "metadata:",
        f"  name: {name}",
        "spec:",
        f"  backend: {backend}",
        f"  model: {_yaml_string(model)}",
    ]
    if image is not None:
        lines.append(f"  image: {_yaml_string(image)}")
    lines += [
        "  replicas: 1",
        f"  resources: {{gpus: {gpus}}}",
        "  args: []",
    ]
    return f"manifests/deployments/{name}.yaml", "\n".join(lines) + "\n"


def _yaml_string(value: str) -> str:
    # JSON is YAML: a quoted string needs no thought about YAML's special characters.
    return json.dumps(value)


def write_files(target: Path, files: dict[str, str]) -> list[Path]:
    written = []
    for relative, text in files.items():
        path = target / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written
