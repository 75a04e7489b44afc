"""In-process use of the real ComfyUI host, shared by the tests, the benchmarks and the demo.

`setup()` puts ComfyUI's source (COMFYUI_DIR, default: the `comfyui` folder of the venv that
tools/setup_host.sh made) and tests/ on sys.path, switches ComfyUI to the CPU, and imports the
pack under the fixed name `calibrated_samplers`, whatever its folder is called.
`setup(comfy=False)` registers the package without running its root __init__ (which loads the
nodes, hence comfy): enough for `optimizers` and `calibration_cache`, which never import comfy.
"""
import importlib.util
import os
import sys
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
COMFYUI_DIR = Path(os.environ.get("COMFYUI_DIR", Path(sys.prefix) / "comfyui"))


# ComfyUI's default discrete schedule (ModelSamplingDiscrete: SD1.x, SD2, SDXL): scaled-linear betas
# 0.00085..0.012 over 1000 steps, in float64
SD15_BETAS = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2


def setup(comfy=True):
    if "calibrated_samplers" in sys.modules:
        return sys.modules["calibrated_samplers"]
    if not comfy:
        package = types.ModuleType("calibrated_samplers")
        package.__path__ = [str(ROOT)]
        sys.modules["calibrated_samplers"] = package
        return package
    if not (COMFYUI_DIR / "comfy").is_dir():
        raise RuntimeError(f"ComfyUI not found at {COMFYUI_DIR}: run through `make test` / `make bench`")
    sys.path.insert(0, str(COMFYUI_DIR))
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    import comfy.options
    comfy.options.enable_args_parsing(False)
    import comfy.cli_args
    comfy.cli_args.args.cpu = True

    spec = importlib.util.spec_from_file_location(
        "calibrated_samplers", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["calibrated_samplers"] = module
    spec.loader.exec_module(module)
    return module
