"""The Dockerfile's steps, run here: no Docker engine runs on this machine, so CI checks that the
image installs keysvc with the README's own command and runs its ENTRYPOINT and HEALTHCHECK
commands as the image would, against a data dir standing in for /data."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from server import free_port

ROOT = Path(__file__).resolve().parent.parent
VENV = "/opt/keysvc/.venv"  # where the image's venv lives


def dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def instruction(name: str) -> str:
    """The last `name` instruction, its continuation lines joined."""
    text = dockerfile().replace("\\\n", " ")
    found = [line.split(None, 1)[1] for line in text.splitlines() if line.split(None, 1)[:1] == [name]]
    assert found, f"no {name} in the Dockerfile"
    return found[-1]


def test_the_image_installs_with_the_readme_command():
    readme = (ROOT / "README.md").read_text()
    start_command = re.search(r"```sh\n(python3 -m venv .*keysvc serve)\n```", readme).group(1)
    installs = [run for run in re.findall(r"^RUN (.*)$", dockerfile(), re.M) if "pip install" in run]
    assert installs == [start_command.removesuffix(" && .venv/bin/keysvc serve")]
    assert instruction("WORKDIR") == "/opt/keysvc" and f"{VENV}/bin/keysvc" in instruction("ENTRYPOINT")


def test_the_image_runs_as_a_user_with_its_data_in_a_volume():
    assert instruction("USER") == "keysvc"
    assert instruction("VOLUME") == "/data"
    assert instruction("EXPOSE") == "8080"
    assert json.loads(instruction("ENTRYPOINT"))[-2:] == ["--data-dir", "/data"]


def as_here(command: list[str], port: int, data_dir: Path) -> list[str]:
    """An image command for this machine: our interpreter for the venv's, our port and data dir."""
    out: list[str] = []
    for arg in command:
        if arg == f"{VENV}/bin/keysvc":
            out += [sys.executable, "-m", "keysvc"]
        elif arg == f"{VENV}/bin/python":
            out.append(sys.executable)
        else:
            out.append(arg.replace("8080", str(port)).replace("/data", str(data_dir)))
    return out


def test_the_entrypoint_serves_prints_the_root_key_once_and_the_healthcheck_sees_it(tmp_path):
    # (As root here: this machine's interpreter lives under /root, which no other user may enter.)
    port = free_port()
    data_dir = tmp_path / "data"
    entrypoint = as_here(json.loads(instruction("ENTRYPOINT")), port, data_dir)
    healthcheck = as_here(json.loads(instruction("HEALTHCHECK").split("CMD", 1)[1]), port, data_dir)
    env = {**os.environ, "KEYSVC_METRICS__PORT": str(free_port())}

    def healthy() -> bool:
        return subprocess.run(healthcheck, env=env, capture_output=True, timeout=10).returncode == 0

    assert not healthy()  # nothing serves yet: the check must be able to fail
    outputs = []
    for _ in range(2):
        process = subprocess.Popen(entrypoint, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + 60
            while not healthy():
                assert process.poll() is None, process.communicate()[0]
                assert time.monotonic() < deadline, "the entrypoint did not become healthy"
                time.sleep(0.2)
        finally:
            process.send_signal(signal.SIGTERM)
            outputs.append(process.communicate(timeout=30)[0])
        assert process.returncode == 0, outputs[-1]
    first, second = outputs
    assert re.search(r"^\s*unkey_root_\w+$", first, re.M), first
    assert "unkey_root_" not in second
