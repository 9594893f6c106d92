"""How long `lmstack up` takes from nothing to a model's first answer, split by phase.

    .venv/bin/python bench/quickstart.py              # as root, like the test bed

The image and the model are already on the machine (the goal the issue sets: under 30 s on 2 cores, most of
it the engine's start): llama.cpp's llama-server image and SmolLM2-135M from the test assets
(scripts/prepare_test_assets.sh, env LMSTACK_TEST_ASSETS), given to `up` with --image and --model-file.

The "machine" is a one-host test bed of its own (tests/testbed; names that do not clash with the tests' bed:
prefix lmsqsb, bridge lmsqsbbr0, subnet 10.217.0.0/24, /var/tmp/lmstack-quickstart-bench; --subnet to move it),
as in tests/test_up.py: `lmstack up` runs in its network namespace with its dockerd as DOCKER_HOST and a fresh
HOME, so nothing it starts meets other servers on this machine. Two runs are timed: the first `up` (the
embedded PostgreSQL is created, the repository written) and, after `lmstack down`, a second `up` that reuses
everything. Each ends with one chat completion through the printed endpoint with the printed key; the
phases are `up`'s own progress lines (the time each step ended). Everything is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests"))  # the test bed (tests/testbed)

import testbed as tb  # noqa: E402
from testbed.llamacpp import build_llamacpp_archive, find_assets  # noqa: E402

SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_STEP = re.compile(r"^\s+([\d.]+)s (\w+)\s+(.*)$")


def _first_answer(run: list[str], endpoint: str, key: str, model: str) -> float:
    """Seconds for one chat completion through the gateway, from inside the machine."""
    script = ("import json, sys, time, urllib.request\n"
              "t = time.monotonic()\n"
              "body = json.dumps({'model': sys.argv[3], 'max_tokens': 8,"
              " 'messages': [{'role': 'user', 'content': 'Hello!'}]}).encode()\n"
              "request = urllib.request.Request(sys.argv[1] + '/chat/completions', body, headers={"
              "'Authorization': 'Bearer ' + sys.argv[2], 'Content-Type': 'application/json'})\n"
              "urllib.request.urlopen(request, timeout=60).read()\n"
              "print(time.monotonic() - t)\n")
    done = subprocess.run([*run, sys.executable, "-c", script, endpoint, key, model], capture_output=True,
                          text=True, check=True, timeout=120)
    return float(done.stdout)


def _one_up(run: list[str], env: dict[str, str], cwd: Path, extra: list[str]) -> dict[str, float]:
    started = time.monotonic()
    done = subprocess.run([*run, sys.executable, "-m", "lmstack", "up", *extra], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=900, check=False)
    wall = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"lmstack up failed:\n{done.stdout}\n{done.stderr}")
    phases: dict[str, float] = {}
    for line in done.stdout.splitlines():
        step = _STEP.match(line)
        if step and not step[3].startswith("total"):
            phases[step[2]] = float(step[1])  # the last line of a step: when it ended
    endpoint = re.search(r"^\s+endpoint\s+(\S+)$", done.stdout, re.MULTILINE)
    key = re.search(r"^\s+API key\s+(\S+)$", done.stdout, re.MULTILINE)
    model = re.search(r'"model": "([^"]+)"', done.stdout)
    assert endpoint and key and model, done.stdout
    phases["first answer"] = wall + _first_answer(run, endpoint[1], key[1], model[1])
    phases["up (wall)"] = wall
    return phases


def _show(title: str, phases: dict[str, float]) -> None:
    print(f"\n{title}")
    previous = 0.0
    for name, at in phases.items():
        if name == "up (wall)":
            continue
        print(f"  {name:<13} {at:6.1f} s  (+{max(0.0, at - previous):.1f})")
        previous = at
    print(f"  {'up, wall':<13} {phases['up (wall)']:6.1f} s;  time to the first answer: {phases['first answer']:.1f} s"
          " (goal: under 30 s)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subnet", default="10.217.0")
    args = parser.parse_args()
    assets = find_assets()
    if isinstance(assets, str):
        raise SystemExit(assets)
    config = tb.BedConfig(hosts=1, prefix="lmsqsb", bridge="lmsqsbbr0", subnet=args.subnet,
                          state_dir=Path("/var/tmp/lmstack-quickstart-bench"))
    bed = tb.TestBed.start(config)
    try:
        host = bed.hosts[0]
        archive = build_llamacpp_archive(config.state_dir / "llamacpp-image.tar", assets.server)
        bed.load_image(archive.path)
        with tempfile.TemporaryDirectory(prefix="lmstack-quickstart-") as temp:
            root = Path(temp)
            for folder in ("home", "work", "mounts"):
                (root / folder).mkdir()
            env = {"PATH": SYSTEM_PATH, "HOME": str(root / "home"), "LANG": "C.UTF-8",
                   "DOCKER_HOST": host.docker_host, "LMSTACK_MOUNT_ROOTS": str(root / "mounts"),
                   "PYTHONPATH": str(REPO_ROOT)}
            run = ["nsenter", f"--net=/run/netns/{host.netns}", f"--uts={host.uts_file}", "--"]
            try:
                first = _one_up(run, env, root / "work", ["--model-file", str(assets.model), "--image", archive.name])
                subprocess.run([*run, sys.executable, "-m", "lmstack", "down"], env=env, cwd=root / "work",
                               capture_output=True, check=True, timeout=300)
                again = _one_up(run, env, root / "work", [])
            finally:
                subprocess.run([*run, sys.executable, "-m", "lmstack", "down", "--purge"], env=env, cwd=root / "work",
                               capture_output=True, check=False, timeout=300)
        _show("First `lmstack up` (fresh HOME: database created, repository written), seconds since it began:", first)
        _show("`lmstack up` again after `lmstack down` (everything reused):", again)
        print(json.dumps({"first": first, "again": again}))
    finally:
        problems = bed.close()
        if problems:
            print("test bed not removed completely: " + "; ".join(problems), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
