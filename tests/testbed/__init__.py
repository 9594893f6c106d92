"""lmstack's multi-host test bed: sshd + dockerd "machines" in network namespaces on this one.

    from testbed import TestBed          # tests/ is on sys.path under pytest
    with TestBed.start() as bed:         # or the `testbed` fixture in tests/conftest.py
        bed.docker_client("node1").containers.run(bed.standin_image, ...)

By hand (as root): `python -m tests.testbed up|down|status` from the repository root.
See bed.py for the layout, image.py for the stand-in image, standin.py for the stand-in engine and
fake_nvidia_smi.py for the fake GPUs.
"""

from .bed import BedConfig, TestBed, TestbedUnavailable, TestHost, leftovers, preflight, remove_bed
from .image import STANDIN_IMAGE, build_standin_archive

__all__ = [
    "STANDIN_IMAGE",
    "BedConfig",
    "TestBed",
    "TestHost",
    "TestbedUnavailable",
    "build_standin_archive",
    "leftovers",
    "preflight",
    "remove_bed",
]
