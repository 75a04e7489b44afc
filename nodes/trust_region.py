"""TrustRegionStepsScheduler: optimized time steps (Xue et al., CVPR 2024) as a SIGMAS node."""
import logging
from functools import lru_cache

import torch

import comfy.model_management
import comfy.samplers
from comfy_api.latest import io

from ..optimizers.coordinates import NoiseSchedule
from ..optimizers import trust_region
from ..optimizers.trust_region import time_step_sigmas
from . import CATEGORY

SOLVERS = [s for s in trust_region.SOLVERS if s != "original"]     # the ComfyUI samplers it models
INITS = ["uniform_t", "uniform_lambda", "karras"]


@lru_cache(maxsize=256)
def _optimized(schedule: NoiseSchedule, steps, solver, init_sigmas, error_exponent, trunc_num, final_sigma_zero):
    init = init_sigmas if isinstance(init_sigmas, str) else list(init_sigmas)
    return tuple(time_step_sigmas(schedule, steps, solver, init, error_exponent, trunc_num, final_sigma_zero,
                                  check=comfy.model_management.throw_exception_if_processing_interrupted))


def trust_region_sigmas(model_sampling, steps, solver, init, error_exponent, denoise=1.0,
                        trunc_num=3, final_sigma_zero=True) -> torch.Tensor:
    """The node's work, callable without a graph. denoise < 1 optimizes the steps over the part of the
    noise range that img2img samples: from ComfyUI's sigma at (1 - denoise) of its timesteps.

    trunc_num: 3 at every N, the value the authors' code runs with. Their comment's rule (None here:
    3 up to 7 steps, 0 above) collapses steps to the margin from 8 steps on and the samples with
    them (benchmarks/quality.py, method trust_region_trunc_rule: RMSE 3.9 against 0.03 for uni_pc at
    NFE 8 on the closed-form EPS model)."""
    if denoise <= 0:
        return torch.FloatTensor([])
    schedule = NoiseSchedule.from_model_sampling(model_sampling)
    if denoise < 1:
        top = float(model_sampling.percent_to_sigma(1.0 - denoise))
        if not schedule.sigma_min < top < schedule.sigma_max:
            raise ValueError(f"denoise {denoise} leaves no noise range to schedule (sigma {top:.4g})")
        schedule = NoiseSchedule(schedule.family, schedule.sigma_min, top)
    if init == "uniform_t":
        if denoise < 1:
            raise ValueError("init 'uniform_t' is for denoise 1; use 'uniform_lambda' or 'karras' for img2img")
        init_sigmas = tuple(float(s) for s in comfy.samplers.calculate_sigmas(model_sampling, "normal", steps))
    else:
        init_sigmas = init
    sigmas = _optimized(schedule, int(steps), solver, init_sigmas, float(error_exponent),
                        None if trunc_num is None else int(trunc_num), bool(final_sigma_zero))
    return torch.FloatTensor(sigmas)


class TrustRegionStepsScheduler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TrustRegionStepsScheduler",
            display_name="Trust-Region Steps Scheduler",
            category=f"{CATEGORY}/schedulers",
            description="Sigmas for few-step sampling, optimized for your model's noise schedule and the "
                        "sampler you will use (Xue et al., CVPR 2024). No model evaluations; well under a "
                        "second. Use with SamplerCustom and the same sampler in KSamplerSelect. A theory bound, "
                        "not a measurement of your model: on this pack's test models its sigmas measured 1.2-90x "
                        "the error of the same sampler's best built-in schedule on flow models (SD3, Flux: not "
                        "for them) and 0.9-50x on EPS models. Where that matters, use KSampler (Calibrated) "
                        "(auto), or calibrated time steps (Calibrate Sampler, method time_steps), which start "
                        "from the better of this schedule and the best built-in one and are fitted to your model.",
            inputs=[
                io.Model.Input("model", tooltip="The model to sample: its noise schedule (and shift) sets the range."),
                io.Int.Input("steps", default=5, min=2, max=100,
                             tooltip="Number of steps (model evaluations for these multistep samplers)."),
                io.Combo.Input("solver", options=SOLVERS, default="uni_pc",
                               tooltip="The sampler these sigmas are for: pick the same one in KSamplerSelect."),
                io.Combo.Input("init", options=INITS, default="uniform_t",
                               tooltip="Starting schedule of the optimization: uniform timesteps (the authors' "
                                       "advice for latent models), uniform log-SNR, or Karras."),
                io.Float.Input("error_exponent", default=2.0, min=0.5, max=4.0, step=0.5,
                               tooltip="p in the error weight sigma^p/alpha: 2 for latent models (the "
                                       "authors' default), 1 for pixel-space models."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Below 1 (img2img), the steps are optimized over the remaining noise range."),
            ],
            outputs=[io.Sigmas.Output()],
        )

    @classmethod
    def execute(cls, model, steps, solver, init, error_exponent, denoise) -> io.NodeOutput:
        ms = model.get_model_object("model_sampling")
        if NoiseSchedule.from_model_sampling(ms).is_flow:
            logging.warning("Trust-Region Steps Scheduler: this is a flow model, for which these sigmas measured "
                            "1.5-9x the error of the best built-in schedules; prefer a built-in schedule or "
                            "calibrated time steps")
        return io.NodeOutput(trust_region_sigmas(ms, steps, solver, init, error_exponent, denoise))
