"""The manifest schema and loader: knows no storage and no machines."""

from lmstack.manifests.errors import ManifestError, ManifestValidationError
from lmstack.manifests.loader import DesiredState, Origin, load_manifests
from lmstack.manifests.schema import API_VERSION, Deployment, DeploymentSpec, Worker, WorkerSpec, json_schema

__all__ = [
    "API_VERSION",
    "Deployment",
    "DeploymentSpec",
    "DesiredState",
    "ManifestError",
    "ManifestValidationError",
    "Origin",
    "Worker",
    "WorkerSpec",
    "json_schema",
    "load_manifests",
]
