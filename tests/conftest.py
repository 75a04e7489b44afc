"""Test set-up: the real ComfyUI host (tools/setup_host.sh installs it) and the pack as a package."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import host  # noqa: E402

host.setup()


@pytest.fixture(scope="session")
def comfy_server():
    """The real ComfyUI server with the pack (under an arbitrary folder name) and the test models."""
    from comfy_server import ComfyServer
    server = ComfyServer(host.COMFYUI_DIR, host.ROOT, extra_nodes=[host.TESTS / "tinymodels"])
    try:
        yield server.wait_ready()
    finally:
        server.stop()
