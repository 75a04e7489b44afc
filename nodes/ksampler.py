"""CalibratedKSampler: KSampler's inputs and output, sampling with a calibrated method."""
import torch

import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
from comfy_api.latest import io

from . import CATEGORY
from ..optimizers.calibration import CalibrationMismatch
from .calibration import FIXED_SCHEDULE, CalibrationType, calibrate, checked_sampler, method_sigmas, method_tooltip
from .methods import METHODS, TIMETUNER_BASES


class CalibratedKSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CalibratedKSampler",
            display_name="KSampler (Calibrated)",
            category=CATEGORY,
            description="A drop-in for KSampler that samples with a calibrated few-step method. Without a "
                        "calibration input it reuses a stored one for this model and settings, or calibrates "
                        "first (once) and stores it.",
            inputs=[
                io.Model.Input("model", tooltip="The model used for denoising the input latent."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                             tooltip="The random seed used for creating the noise."),
                io.Int.Input("steps", default=5, min=1, max=100,
                             tooltip="Steps, as in KSampler (Heun methods evaluate the model twice per step but "
                                     "the last)."),
                io.Float.Input("cfg", default=7.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Guidance scale; a calibration is valid for the cfg it was fitted at."),
                io.Combo.Input("sampler_name", options=TIMETUNER_BASES, default="euler",
                               tooltip="The sampler TimeTuner tunes (other methods bring their own solver)."),
                io.Combo.Input("scheduler", options=list(comfy.samplers.SCHEDULER_NAMES), default="karras",
                               tooltip="Sigmas for IIA and TimeTuner (OLSS searches its own)."),
                io.Conditioning.Input("positive", tooltip="What to include in the image."),
                io.Conditioning.Input("negative", tooltip="What to exclude from the image."),
                io.Latent.Input("latent_image", tooltip="The empty latent to denoise (sets size and batch)."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Calibrated methods sample from pure noise: only 1.0 is supported."),
                io.Combo.Input("method", options=list(METHODS), default="olss", tooltip=method_tooltip()),
                io.Int.Input("teacher_steps", default=500, min=20, max=4000,
                             tooltip="Teacher run length when calibrating (ignored when reusing)."),
                io.Int.Input("calibration_batch", default=8, min=1, max=256,
                             tooltip="Noise samples for calibrating (ignored when reusing)."),
                CalibrationType.Input("calibration", optional=True,
                                      tooltip="A calibration from Calibrate Sampler or Load Calibration."),
            ],
            outputs=[io.Latent.Output()],
        )

    @classmethod
    def execute(cls, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise,
                method, teacher_steps, calibration_batch, calibration=None) -> io.NodeOutput:
        if denoise < 1:
            raise ValueError(f"denoise {denoise}: calibrated samplers are fitted for sampling from pure noise "
                             "(denoise 1.0); use KSampler for img2img")
        latent = latent_image.copy()
        samples = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
        if calibration is None:
            calibration, _ = calibrate(model, positive, negative, {"samples": samples}, 0, cfg, steps,
                                       teacher_steps, calibration_batch, method, scheduler=scheduler,
                                       sampler_name=sampler_name)
        else:
            calibration.check_compatible(nfe=steps, cfg=cfg, latent_shape=tuple(samples.shape[1:]))
            for name, given in (("sampler_name", sampler_name if method == "timetuner" else None),
                                ("scheduler", scheduler if method in FIXED_SCHEDULE else None)):
                fitted = calibration.teacher.get(name)
                if given is not None and fitted is not None and given != fitted:
                    raise CalibrationMismatch(f"this calibration was fitted with {name} {fitted}, not {given}: "
                                              f"set {name} to {fitted} or calibrate again")
        sigmas = method_sigmas(calibration, method)
        noise = comfy.sample.prepare_noise(samples, seed, latent.get("batch_index"))
        callback = latent_preview.prepare_callback(model, len(sigmas) - 1)
        out = comfy.sample.sample_custom(model, noise, cfg, checked_sampler(calibration, method), sigmas, positive,
                                         negative, samples, noise_mask=latent.get("noise_mask"), callback=callback,
                                         disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
        latent["samples"] = out.to(torch.float32)
        return io.NodeOutput(latent)
