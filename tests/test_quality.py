"""The project's own checks run with the tests: types (mypy --strict), lint (ruff) and layers (import-linter)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_mypy_strict() -> None:
    result = _run(str(BIN / "mypy"), "lmstack")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff() -> None:
    result = _run(str(BIN / "ruff"), "check", "lmstack", "tests", "bench")
    assert result.returncode == 0, result.stdout + result.stderr


def test_layers() -> None:
    result = _run(str(BIN / "lint-imports"))
    assert result.returncode == 0, result.stdout + result.stderr
