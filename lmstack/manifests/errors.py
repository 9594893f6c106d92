"""Validation errors that point at a file, a line and a key path."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class ManifestError:
    """One problem in one place: rendered as `FILE:LINE: key.path: message`."""

    file: str
    line: int
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class ManifestValidationError(Exception):
    """Raised with every error found at once; nothing is applied from a source that has any."""

    def __init__(self, errors: Iterable[ManifestError]) -> None:
        self.errors: tuple[ManifestError, ...] = tuple(sorted(set(errors)))
        super().__init__(self.render())

    def render(self) -> str:
        count = len(self.errors)
        lines = [str(error) for error in self.errors]
        lines.append(f"{count} error{'s' if count != 1 else ''} found")
        return "\n".join(lines)
