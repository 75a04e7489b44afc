"""The calibrated samplers as SAMPLER nodes for SamplerCustom / SamplerCustomAdvanced: OLSS, IIA, TimeTuner.

Each takes a CALIBRATION and gives a sampler that checks, when it runs, that the model, guidance scale,
latent shape and sigmas are the ones it was fitted for (connect Calibration Sigmas for the sigmas).
"""
from comfy_api.latest import io

from . import CATEGORY
from .calibration import CalibrationType, checked_sampler
from .methods import METHODS

CALIBRATION_TOOLTIP = "From Calibrate Sampler or Load Calibration (it must hold this method)."


def _variant_tooltip(names):
    return " ".join(f"{n}: {METHODS[n].summary}." for n in names)


class OLSSSampler(io.ComfyNode):
    VARIANTS = ["olss", "olss_p"]

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="OLSSSampler",
            display_name="OLSS Sampler",
            category=f"{CATEGORY}/samplers",
            description="Optimal Linear Subspace Search (Duan et al., CIKM 2023): each step is the fitted linear "
                        "combination of the start noise and all earlier model outputs. Use with the "
                        "calibration's sigmas (Calibration Sigmas) in SamplerCustom.",
            inputs=[CalibrationType.Input("calibration", tooltip=CALIBRATION_TOOLTIP),
                    io.Combo.Input("variant", options=cls.VARIANTS, default="olss",
                                   tooltip=_variant_tooltip(cls.VARIANTS))],
            outputs=[io.Sampler.Output()],
        )

    @classmethod
    def execute(cls, calibration, variant) -> io.NodeOutput:
        return io.NodeOutput(checked_sampler(calibration, variant))


class IIASampler(io.ComfyNode):
    VARIANTS = ["iia_ddim", "biia_heun", "iia_heun"]

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IIASampler",
            display_name="IIA Sampler",
            category=f"{CATEGORY}/samplers",
            description="Improved Integration Approximation (Zhang, Niwa, Kleijn): DDIM or Heun with a few fitted "
                        "coefficients per step. Use with the calibration's sigmas (Calibration Sigmas).",
            inputs=[CalibrationType.Input("calibration", tooltip=CALIBRATION_TOOLTIP),
                    io.Combo.Input("variant", options=cls.VARIANTS, default="iia_heun",
                                   tooltip=_variant_tooltip(cls.VARIANTS))],
            outputs=[io.Sampler.Output()],
        )

    @classmethod
    def execute(cls, calibration, variant) -> io.NodeOutput:
        return io.NodeOutput(checked_sampler(calibration, variant))


class TimeTunerSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TimeTunerSampler",
            display_name="TimeTuner Sampler",
            category=f"{CATEGORY}/samplers",
            description="TimeTuner (Xia et al., CVPR 2024): the sampler the calibration was tuned with, feeding the "
                        "network a tuned time input per step. Use with the calibration's sigmas "
                        "(Calibration Sigmas, method timetuner).",
            inputs=[CalibrationType.Input("calibration", tooltip=CALIBRATION_TOOLTIP),
                    io.Sampler.Input("sampler", optional=True,
                                     tooltip="Wrap this sampler instead (e.g. from KSamplerSelect); the ratios were "
                                             "tuned for the calibration's sampler, so use the same one for best "
                                             "results.")],
            outputs=[io.Sampler.Output()],
        )

    @classmethod
    def execute(cls, calibration, sampler=None) -> io.NodeOutput:
        return io.NodeOutput(checked_sampler(calibration, "timetuner", base=sampler))
