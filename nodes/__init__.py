"""ComfyUI nodes of the pack (V3 schema): thin adapters over `optimizers`."""
from comfy_api.latest import ComfyExtension, io

CATEGORY = "sampling/calibrated_samplers"
CalibrationType = io.Custom("CALIBRATION")

from . import ksampler_schedulers, store  # noqa: E402

store.register_folder()
ksampler_schedulers.register()

from .calibration import CalibrateSampler, CalibrationSigmas, LoadCalibration  # noqa: E402
from .ksampler import CalibratedKSampler  # noqa: E402
from .report import CalibrationReport  # noqa: E402
from .samplers import CalibratedSampler  # noqa: E402
from .trust_region import TrustRegionStepsScheduler  # noqa: E402

NODES: list[type[io.ComfyNode]] = [CalibrateSampler, CalibratedKSampler, LoadCalibration, *CalibratedSampler.NODES,
                                   CalibrationSigmas, CalibrationReport, TrustRegionStepsScheduler]


class CalibratedSamplersExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES


async def comfy_entrypoint() -> CalibratedSamplersExtension:
    return CalibratedSamplersExtension()
