"""Model file references for engines that load one file (llama.cpp's GGUF): pure parsing, no I/O.

A reference is either a path relative to the worker's model cache (`smollm2/model.Q4_1.gguf`), an absolute
path inside the container (a file the image carries), or a Hugging Face file that `lmstack prepare`
downloads into the model cache first:

    hf://OWNER/REPO/PATH/IN/REPO.gguf
    hf://OWNER/REPO/PATH/IN/REPO.gguf@sha256:<64 hex digits>    (checked after the download)
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass

HF_SCHEME = "hf://"
HF_ENDPOINT = "https://huggingface.co"
# Where downloaded Hugging Face files go, relative to the model cache: hf/OWNER/REPO/PATH.
HF_CACHE_DIR = "hf"

_REPO_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class HfFile:
    """One file of a Hugging Face model repository (its `main` revision)."""

    repo: str  # OWNER/NAME
    path: str  # the file's path inside the repository
    sha256: str | None = None  # lower-case hex, when the reference pins it

    @property
    def cache_path(self) -> str:
        """Where the file goes, relative to the worker's model cache."""
        return f"{HF_CACHE_DIR}/{self.repo}/{self.path}"

    def url(self, endpoint: str = HF_ENDPOINT) -> str:
        return f"{endpoint.rstrip('/')}/{self.repo}/resolve/main/{urllib.parse.quote(self.path)}"

    def __str__(self) -> str:
        pin = f"@sha256:{self.sha256}" if self.sha256 else ""
        return f"{HF_SCHEME}{self.repo}/{self.path}{pin}"


@dataclass(frozen=True)
class LocalFile:
    """A file already in place: `path` relative to the model cache, or absolute (inside the container)."""

    path: str

    @property
    def in_cache(self) -> bool:
        return not self.path.startswith("/")


ModelFile = HfFile | LocalFile


def parse_model_file(model: str) -> ModelFile:
    """The reference `model` names; ValueError (with the reason, in words) when it names none."""
    if model.startswith(HF_SCHEME):
        return _parse_hf(model)
    if "://" in model:
        scheme = model.split("://", 1)[0]
        raise ValueError(f"unknown scheme {scheme + '://'!r}: use a path in the model cache or "
                         f"{HF_SCHEME}OWNER/REPO/FILE.gguf")
    parts = model.strip("/").split("/")
    if model != model.strip() or not model.strip("/") or any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"{model!r} is not a usable file path: no empty, '.' or '..' parts")
    return LocalFile(model)


def _parse_hf(model: str) -> HfFile:
    rest = model.removeprefix(HF_SCHEME)
    sha256 = None
    if "@" in rest:
        rest, pin = rest.rsplit("@", 1)
        if not pin.startswith("sha256:") or not _SHA256.fullmatch(pin.removeprefix("sha256:").lower()):
            raise ValueError(f"{model!r}: after '@' give sha256:<64 hex digits>, not {pin!r}")
        sha256 = pin.removeprefix("sha256:").lower()
    parts = rest.split("/")
    if len(parts) < 3 or any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"{model!r} is not a Hugging Face file: use {HF_SCHEME}OWNER/REPO/FILE.gguf")
    owner, name = parts[0], parts[1]
    for part in (owner, name):
        if not _REPO_PART.fullmatch(part):
            raise ValueError(f"{model!r}: {part!r} is not a valid Hugging Face owner or repository name")
    if any(not part.isprintable() or "\\" in part for part in parts[2:]):
        raise ValueError(f"{model!r}: the file path has characters a file name cannot have")
    return HfFile(repo=f"{owner}/{name}", path="/".join(parts[2:]), sha256=sha256)
