"""A real ComfyUI server for the real-ComfyUI and real-browser tiers: main.py --cpu in ComfyUI's own python on a free
127.0.0.1 port, everything (custom_nodes, models, input, output) under a --base-directory, stopped by its pid."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

PACK_FOLDER = "ComfyUI-BoothKit"  # as a user's git clone names it: a hyphen, not an importable name


def http(url, body=None, timeout=30):
    req = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"} if body is not None else {})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        data = r.read()
        return json.loads(data) if r.headers.get_content_type() == "application/json" else data


def base_directory(base: Path, pack: Path) -> Path:
    """custom_nodes/ComfyUI-BoothKit -> the pack, and the folders ComfyUI writes to."""
    for sub in ("models", "custom_nodes", "input", "output", "temp", "user"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / PACK_FOLDER
    if not link.exists():
        link.symlink_to(pack, target_is_directory=True)
    return base


@contextmanager
def running(comfy: dict, base: Path, log: Path, start_timeout: float = 300):
    """{"url", "object_info", "log"} of a server started for the block and stopped after it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [comfy["python"], "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
           "--disable-auto-launch", "--base-directory", str(base), "--database-url", "sqlite:///:memory:",
           "--use-pytorch-cross-attention"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1", "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=comfy["path"], stdout=f, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + start_timeout
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ComfyUI exited with {proc.returncode} during start-up:\n{log.read_text()[-4000:]}")
            try:
                object_info = http(url + "/object_info", timeout=10)
                break
            except (urllib.error.URLError, OSError):
                if time.time() > deadline:
                    pytest.fail(f"ComfyUI did not answer within {start_timeout} s:\n{log.read_text()[-4000:]}")
                time.sleep(1)
        yield {"url": url, "object_info": object_info, "log": log}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
