"""The calibrated samplers as SAMPLER nodes for SamplerCustom / SamplerCustomAdvanced, one node per family of
methods (`Method.node`), built from the registry.

Each takes a CALIBRATION and gives a sampler that checks, when it runs, that the model, guidance scale,
latent shape and sigmas are the ones it was fitted for (connect Calibration Sigmas for the sigmas).
"""
from comfy_api.latest import io

from . import CATEGORY, CalibrationType
from .calibrate import checked_sampler
from .methods import METHODS

CALIBRATION_TOOLTIP = "From Calibrate Sampler or Load Calibration (it must hold this method)."


class CalibratedSampler(io.ComfyNode):
    """Base of the sampler nodes; `NODES` holds one subclass per `Method.node`."""
    METHODS: list = []
    NODES: list = []

    @classmethod
    def define_schema(cls):
        node_id, display_name, description = cls.METHODS[0].node
        inputs = [CalibrationType.Input("calibration", tooltip=CALIBRATION_TOOLTIP)]
        if len(cls.METHODS) > 1:
            default = next(m.name for m in cls.METHODS if m.default_variant)
            inputs.append(io.Combo.Input("variant", options=[m.name for m in cls.METHODS], default=default,
                                         tooltip=" ".join(f"{m.name}: {m.summary}." for m in cls.METHODS)))
        inputs += cls.METHODS[0].sampler_inputs()
        return io.Schema(node_id=node_id, display_name=display_name, category=f"{CATEGORY}/samplers",
                         description=description, inputs=inputs, outputs=[io.Sampler.Output()])

    @classmethod
    def execute(cls, calibration, variant=None, **options) -> io.NodeOutput:
        return io.NodeOutput(checked_sampler(calibration, variant or cls.METHODS[0].name, **options))


def _families():
    families = {}
    for method in METHODS.values():
        families.setdefault(method.node[0], []).append(method)
    return families


CalibratedSampler.NODES = [type(node_id, (CalibratedSampler,), {"METHODS": methods})
                           for node_id, methods in _families().items()]


def node_for(method):
    """The sampler node of a method."""
    return next(node for node in CalibratedSampler.NODES if METHODS[method] in node.METHODS)
