"""Smoke test with Unkey's official npm SDK (`@unkey/api`, pinned exactly in tests/npm/package.json
and locked in tests/npm/package-lock.json) against the session's real `keysvc serve`.

The npm project is copied to a temp dir and installed there with `npm ci` (reproducible from the
lock file); `node smoke.mjs` then creates an API and a key, verifies the key (VALID), verifies a
garbage key (NOT_FOUND), reads the key back, and prints a JSON summary that is asserted here.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

NPM_DIR = Path(__file__).parent / "npm"
PINNED = "2.5.1"

NODE = shutil.which("node")
NPM = shutil.which("npm")
pytestmark = pytest.mark.skipif(not (NODE and NPM), reason="node and npm are needed for the npm SDK smoke test")


def test_package_pins_the_sdk_exactly() -> None:
    package = json.loads((NPM_DIR / "package.json").read_text())
    lock = json.loads((NPM_DIR / "package-lock.json").read_text())
    assert package["private"] is True
    assert package["dependencies"] == {"@unkey/api": PINNED}
    assert lock["packages"]["node_modules/@unkey/api"]["version"] == PINNED


def test_npm_sdk_smoke(server, tmp_path: Path) -> None:
    project = tmp_path / "npm"
    project.mkdir()
    for name in ("package.json", "package-lock.json", "smoke.mjs"):
        shutil.copy(NPM_DIR / name, project / name)
    install = subprocess.run(
        [NPM, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=project, capture_output=True, text=True, timeout=300,
    )
    assert install.returncode == 0, f"npm ci failed:\n{install.stdout}\n{install.stderr}"

    run = subprocess.run(
        [NODE, "smoke.mjs"], cwd=project, capture_output=True, text=True, timeout=120,
        env={**os.environ, "UNKEY_URL": server.url, "UNKEY_ROOT_KEY": server.root_key},
    )
    assert run.returncode == 0, f"smoke.mjs failed:\n{run.stdout}\n{run.stderr}\nserver log:\n{server.log()[-4000:]}"
    summary = json.loads(run.stdout.strip().splitlines()[-1])

    assert summary["sdkVersion"] == PINNED
    assert summary["apiId"].startswith("api_")
    assert summary["requestId"].startswith("req_")
    assert summary["keyId"].startswith("key_")
    assert summary["keyPrefix"] == "npm"
    verify = summary["verify"]
    assert verify["valid"] is True
    assert verify["code"] == "VALID"
    assert verify["keyId"] == summary["keyId"]
    assert verify["name"].startswith("npm-key-")
    assert verify["meta"] == {"sdk": "npm"}
    assert verify["credits"] == 9  # 10, one spent by the verification
    assert summary["garbage"] == {"valid": False, "code": "NOT_FOUND"}
    assert summary["getKey"]["keyId"] == summary["keyId"]
    assert summary["getKey"]["start"].startswith("npm_")
    assert summary["getKey"]["remaining"] == 9

    # The key really exists on the server the npm SDK talked to.
    status, body = server.call("/v2/keys.getKey", {"keyId": summary["keyId"]})
    assert status == 200
    assert body["data"]["credits"]["remaining"] == 9
