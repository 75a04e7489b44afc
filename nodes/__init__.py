"""ComfyUI nodes of the pack (V3 schema): thin adapters over `optimizers`."""
from comfy_api.latest import ComfyExtension, io

CATEGORY = "sampling/calibrated_samplers"

from .calibration import CalibrateSampler, CalibrationSigmas, LoadCalibration  # noqa: E402
from .ksampler import CalibratedKSampler  # noqa: E402
from .report import CalibrationReport  # noqa: E402
from .samplers import IIASampler, OLSSSampler, TimeTunerSampler  # noqa: E402
from .trust_region import TrustRegionStepsScheduler  # noqa: E402

NODES: list[type[io.ComfyNode]] = [CalibrateSampler, CalibratedKSampler, LoadCalibration, OLSSSampler, IIASampler,
                                   TimeTunerSampler, CalibrationSigmas, CalibrationReport, TrustRegionStepsScheduler]


class CalibratedSamplersExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES


async def comfy_entrypoint() -> CalibratedSamplersExtension:
    return CalibratedSamplersExtension()
