"""Test-only ComfyUI custom node: hands the pack's tiny real models to a running ComfyUI.

Copied (or linked) into a test server's custom_nodes; never shipped as part of the pack's nodes.
Models: the closed-form Gaussian mixture as EPS, V-prediction and flow (CONST) models (latent format of
scale 1), the sharp closed-form mixture built like real checkpoints (`sharp_<checkpoint>`: SD1.5, SD2,
SDXL, SD3 and Flux model configs and latent formats, as ComfyUI defines them), and the trained digits UNet
as EPS and flow models. Conditionings select a class (0-9); the negative is the
unconditional one, for classifier-free guidance.
"""
import torch

MODELS = ("gmm_eps", "gmm_v_prediction", "gmm_flow", "digits_eps", "digits_flow",
          "sharp_sd15", "sharp_sd2", "sharp_sdxl", "sharp_sd3", "sharp_flux")


def load(name):
    """(ModelPatcher, module) for one of MODELS; the module provides conditioning/null_conditioning."""
    kind, family = name.split("_", 1)
    if kind == "gmm":
        from . import gmm
        return gmm.build_model(family), gmm
    if kind == "sharp":            # sharp_<checkpoint>, or sharp_<checkpoint>_scale1: its identity-format twin
        from . import gmm
        checkpoint, _, twin = family.partition("_")
        return gmm.build_like(checkpoint, scale_one=twin == "scale1"), gmm
    from . import digits
    return digits.build_model(family), digits


class TinyModelLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model_name": (list(MODELS), {"tooltip": "A tiny test model (closed-form mixture or trained digits)."}),
            "label": ("INT", {"default": 3, "min": 0, "max": 9, "tooltip": "The class (digit) to condition on."}),
            "batch_size": ("INT", {"default": 4, "min": 1, "max": 256}),
        }}

    RETURN_TYPES = ("MODEL", "CONDITIONING", "CONDITIONING", "LATENT")
    RETURN_NAMES = ("model", "positive", "negative", "latent")
    FUNCTION = "load"
    CATEGORY = "testing/calibrated_samplers"

    def load(self, model_name, label, batch_size):
        model, module = load(model_name)
        latent = torch.zeros(batch_size, model.model.latent_format.latent_channels, 8, 8)
        return (model, module.conditioning([label]), module.null_conditioning(1), {"samples": latent})


NODE_CLASS_MAPPINGS = {"CalibratedSamplersTinyModel": TinyModelLoader}
NODE_DISPLAY_NAME_MAPPINGS = {"CalibratedSamplersTinyModel": "Tiny test model (Calibrated Samplers tests)"}
