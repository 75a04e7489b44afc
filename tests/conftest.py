"""Test set-up: the real ComfyUI host (tools/setup_host.sh installs it) and the pack as a package.

The suite runs under the host venv's python; COMFYUI_DIR overrides where ComfyUI's source lies.
The pack is imported under the fixed name `calibrated_samplers` whatever its folder is called.
"""
import importlib.util
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
COMFYUI_DIR = Path(os.environ.get("COMFYUI_DIR", Path(sys.prefix) / "comfyui"))
if not (COMFYUI_DIR / "comfy").is_dir():
    raise RuntimeError(f"ComfyUI not found at {COMFYUI_DIR}: run the tests with `make test`")

sys.path.insert(0, str(COMFYUI_DIR))
sys.path.insert(0, str(TESTS))
import comfy.options  # noqa: E402

comfy.options.enable_args_parsing(False)
import comfy.cli_args  # noqa: E402

comfy.cli_args.args.cpu = True


def _import_pack():
    if "calibrated_samplers" in sys.modules:
        return sys.modules["calibrated_samplers"]
    spec = importlib.util.spec_from_file_location(
        "calibrated_samplers", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["calibrated_samplers"] = module
    spec.loader.exec_module(module)
    return module


_import_pack()
