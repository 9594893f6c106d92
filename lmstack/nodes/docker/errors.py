"""How an action on a worker fails: `NodeError` with a kind that says whether a later pass may clear it."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

# unreachable: no SSH connection (refused, timed out, no route, lost); auth_failed: the host refused the
# key; host_key: the host's key is not in known_hosts or differs from it; docker_unavailable: SSH works
# but Docker does not answer (no docker CLI for dial-stdio, daemon down, no permission on its socket);
# gpu_runtime: GPUs asked for, but Docker has no NVIDIA runtime; not_found: no such container or image;
# foreign: the container exists but lmstack did not make it (no lmstack labels), so it is left alone;
# api: any other error Docker answered.
ErrorKind = Literal["unreachable", "auth_failed", "host_key", "docker_unavailable", "gpu_runtime", "api",
                    "not_found", "foreign"]
# Kinds that a later pass may clear by itself; the others need a person (a key, a driver, a name).
RETRYABLE_KINDS: frozenset[ErrorKind] = frozenset({"unreachable", "docker_unavailable", "api"})

_MESSAGE_LIMIT = 600


class NodeError(Exception):
    """An action on a worker failed. `message` names the worker and says what to check."""

    def __init__(self, *, kind: ErrorKind, worker: str, message: str) -> None:
        super().__init__(message)
        self.kind: ErrorKind = kind
        self.worker = worker
        self.message = message

    @property
    def retryable(self) -> bool:
        return self.kind in RETRYABLE_KINDS

    def __repr__(self) -> str:
        return f"NodeError(kind={self.kind!r}, worker={self.worker!r}, message={self.message!r})"

    def __reduce__(self) -> tuple[Any, ...]:  # keyword-only arguments: pickle needs help
        return (_node_error, (self.kind, self.worker, self.message))


def _node_error(kind: ErrorKind, worker: str, message: str) -> NodeError:
    return NodeError(kind=kind, worker=worker, message=message)


class DockerSetupError(Exception):
    """The pool cannot be made (a missing key or known_hosts file, a bad URL); nothing was contacted."""


def redact(text: str, secrets: Iterable[str]) -> str:
    for value in secrets:
        if len(value) >= 4:  # shorter values are no secret, and replacing them would garble the text
            text = text.replace(value, "***")
    return text


def clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MESSAGE_LIMIT else text[: _MESSAGE_LIMIT - 1] + "…"
