"""By hand: `python -m tests.testbed up` (prints the hosts, leaves the bed running), `down`, `status`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .bed import BedConfig, TestBed, TestbedUnavailable, _lock, leftovers, remove_bed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.testbed")
    parser.add_argument("action", choices=["up", "down", "status"])
    args = parser.parse_args(argv)
    config = BedConfig.from_env()
    if args.action == "up":
        bed = TestBed.start(config)
        # Leave it running: the lock is released when this process exits; `down` removes the bed.
        hosts = [{"name": h.name, "address": h.address, "docker_url": bed.docker_url(h),
                  "docker_host": h.docker_host, "bin_dir": str(h.bin_dir)} for h in bed.hosts]
        print(json.dumps({"hosts": hosts,
                          "ssh_config": str(bed.ssh_config), "known_hosts": str(bed.known_hosts),
                          "ssh_key": str(bed.ssh_key), "image": bed.standin_image, "timings": bed.timings},
                         indent=2))
        print(f"ssh: ssh -F {bed.ssh_config} root@{bed.hosts[0].address}", file=sys.stderr)
        return 0
    if args.action == "down":
        # Not while a test session holds the bed: wait a little for its lock, then give up.
        try:
            fd = _lock(Path(f"{config.state_dir}.lock"), timeout=10)
        except TestbedUnavailable as exc:
            print(exc, file=sys.stderr)
            return 1
        try:
            problems = remove_bed(config)
        finally:
            os.close(fd)
        for problem in problems:
            print(problem, file=sys.stderr)
        return 1 if problems else 0
    found = leftovers(config)
    print("\n".join(found) if found else "no test bed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
