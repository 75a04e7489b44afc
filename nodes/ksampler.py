"""CalibratedKSampler: KSampler's inputs and output, sampling with a calibrated method."""
import logging

import torch

import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
from comfy_api.latest import io

from . import CATEGORY, CalibrationType
from ..optimizers.coordinates import NoiseSchedule
from .builtins import DETERMINISTIC_SAMPLERS
from .calibrate import calibrate, check_denoise, checked_sampler, chosen_sampler, log_borrowed, method_sigmas
from .calibration import (CALIBRATION_BATCH_TOOLTIP, SCHEDULER_TOOLTIP, TEACHER_STEPS_TOOLTIP, follows_tooltip,
                          latent_samples, method_tooltip)
from .fingerprint import model_fingerprint
from .methods import AUTO as AUTO_METHODS, METHODS
from .request import AUTO_SCHEDULER, SCHEDULERS, Request, check_number


AUTO = "auto"


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
                               tooltip="Guidance scale. A calibration is made for one cfg and latent size; a stored "
                                       "one for a nearby cfg or size is borrowed (and logged) where the pack's "
                                       "measurement found it within 1.2x of one made for the setting."),
                io.Combo.Input("sampler_name", options=DETERMINISTIC_SAMPLERS, default="euler",
                               tooltip=follows_tooltip("sampler_name", "The built-in sampler")),
                io.Combo.Input("scheduler", options=SCHEDULERS, default=AUTO_SCHEDULER,
                               tooltip=follows_tooltip("scheduler", SCHEDULER_TOOLTIP)),
                io.Conditioning.Input("positive", tooltip="What to include in the image."),
                io.Conditioning.Input("negative", tooltip="What to exclude from the image."),
                io.Latent.Input("latent_image", tooltip="The latent to denoise: an empty one (sets size and batch), or "
                                                        "a picture for denoise below 1."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="As KSampler's: below 1 the pass starts from latent_image re-noised to the "
                                       "sigma KSampler starts at (img2img, a hires fix's second pass). A calibration "
                                       "is fitted for one denoise; its starting pictures are latent_image's, or the "
                                       "teacher's own when latent_image is empty."),
                io.Combo.Input("method", options=[AUTO, *METHODS], default=AUTO,
                               tooltip=method_tooltip("auto: whichever validated best on calibration noises it was "
                                                      "not fitted on, a built-in sampler included, within these "
                                                      "steps' model evaluations (it calibrates those of "
                                                      f"{', '.join(AUTO_METHODS)} that sample within them). ")),
                io.Int.Input("teacher_steps", default=0, min=0, max=4000,
                             tooltip=TEACHER_STEPS_TOOLTIP + " Ignored when reusing a calibration."),
                io.Int.Input("calibration_batch", default=8, min=1, max=256,
                             tooltip=CALIBRATION_BATCH_TOOLTIP + " Ignored when reusing a calibration."),
                CalibrationType.Input("calibration", optional=True,
                                      tooltip="A calibration from Calibrate Sampler or Load Calibration."),
            ],
            outputs=[io.Latent.Output()],
        )

    @classmethod
    def execute(cls, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise,
                method, teacher_steps, calibration_batch, calibration=None) -> io.NodeOutput:
        check_number("denoise", denoise, 0, 1)
        check_number("cfg", cfg, 0)
        check_number("steps", steps, 1, integer=True)
        if denoise <= 0:
            raise ValueError("denoise 0: nothing to sample; use denoise above 0 (KSampler returns the latent as it is)")
        latent = latent_image.copy()
        samples = latent_samples(model, latent)
        if calibration is None:
            request = Request.from_inputs(method, seed=0, cfg=cfg, steps=steps, denoise=denoise,
                                          teacher_steps=teacher_steps, calibration_batch=calibration_batch,
                                          scheduler=scheduler, sampler_name=sampler_name)
            calibration, _ = calibrate(model, positive, negative, samples, request, borrow=method)
        else:
            family = NoiseSchedule.from_model_sampling(model.get_model_object("model_sampling")).family
            log_borrowed(calibration, calibration.check_compatible(
                family=family, fingerprint=model_fingerprint(model), steps=steps, cfg=cfg,
                latent_shape=tuple(samples.shape[1:]), borrow=calibration.borrow_range(method)))
            check_denoise(calibration, denoise)
            if method in METHODS:
                METHODS[method].check_use(calibration.settings, sampler_name=sampler_name, scheduler=scheduler)
        if method == AUTO:
            sampler, sigmas, label = chosen_sampler(calibration, steps)
            logging.info("Calibrated Samplers: auto samples with %s (the lowest validated error)", label)
        else:
            sampler, sigmas = checked_sampler(calibration, method), method_sigmas(calibration, method)
        noise = comfy.sample.prepare_noise(samples, seed, latent.get("batch_index"))
        callback = latent_preview.prepare_callback(model, len(sigmas) - 1)
        out = comfy.sample.sample_custom(model, noise, cfg, sampler, sigmas, positive,
                                         negative, samples, noise_mask=latent.get("noise_mask"), callback=callback,
                                         disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
        latent["samples"] = out.to(torch.float32)
        return io.NodeOutput(latent)
