"""Docker on the workers: `DockerPool` (containers, logs, ports), over SSH as `transport` makes it."""

from lmstack.nodes.docker.containers import ManagedContainer
from lmstack.nodes.docker.errors import RETRYABLE_KINDS, DockerSetupError, ErrorKind, NodeError
from lmstack.nodes.docker.pool import DockerPool, DockerTarget

__all__ = ["RETRYABLE_KINDS", "DockerPool", "DockerSetupError", "DockerTarget", "ErrorKind", "ManagedContainer",
           "NodeError"]
