"""A real ComfyUI server on loopback with the pack and the test-only model node in its custom_nodes."""
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    def __init__(self, comfyui_dir, pack_dir, extra_nodes=(), pack_name="calibrated-samplers-under-test", env=None):
        self.base = Path(tempfile.mkdtemp(prefix="comfy-base-"))
        (self.base / "custom_nodes").mkdir()
        os.symlink(pack_dir, self.base / "custom_nodes" / pack_name)
        for node in extra_nodes:
            os.symlink(node, self.base / "custom_nodes" / Path(node).name)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(self.base / "server.log", "w+")
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(comfyui_dir) / "main.py"), "--cpu", "--listen", "127.0.0.1",
             "--port", str(self.port), "--base-directory", str(self.base), "--disable-auto-launch",
             "--database-url", "sqlite:///:memory:"],
            cwd=comfyui_dir, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, **(env or {})})

    def wait_ready(self, timeout=120):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.output()}")
            try:
                self.get("/object_info/KSampler")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        raise TimeoutError(f"ComfyUI did not answer within {timeout} s:\n{self.output()}")

    def output(self):
        self.log.flush()
        return (self.base / "server.log").read_text()[-5000:]

    def get(self, path):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path, payload):
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            return json.loads(e.read() or b"{}") | {"http_status": e.code}

    def run_prompt(self, prompt, timeout=300):
        """Queue an API-format prompt and wait for its history entry."""
        answer = self.post("/prompt", {"prompt": prompt})
        if "prompt_id" not in answer:
            return answer
        pid = answer["prompt_id"]
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.get(f"/history/{pid}")
            if pid in history and history[pid].get("status", {}).get("completed") is not None:
                if history[pid]["status"].get("status_str") in ("success", "error"):
                    return history[pid]
            time.sleep(0.2)
        raise TimeoutError(f"prompt {pid} did not finish in {timeout} s:\n{self.output()}")

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()
