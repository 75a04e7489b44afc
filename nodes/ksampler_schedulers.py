"""Opt-in: the trust-region schedule as a name in ComfyUI's scheduler list, so that KSampler, KSampler (Advanced)
and every other node that reads that list (detailers, tiled upscalers, other packs) can use it.

Off unless the environment variable CALIBRATED_SAMPLERS_KSAMPLER_SCHEDULERS is 1 when ComfyUI starts: packs that
change global lists have broken other packs, so nothing is touched by default. When on, `trust_region` is added to
`comfy.samplers.SCHEDULER_HANDLERS` and appended in place to `comfy.samplers.SCHEDULER_NAMES` (the list object
KSampler's input reads), after every built-in name, so saved workflows keep validating. It is the no-calibration
schedule of Xue et al. for the model's own noise schedule, optimized for a second-order multistep sampler
(dpmpp_2m's order: the scheduler handler is not told the sampler).
"""
import logging
import os

import comfy.samplers

from .trust_region import trust_region_sigmas

SETTING = "CALIBRATED_SAMPLERS_KSAMPLER_SCHEDULERS"
NAME = "trust_region"
SOLVER = "dpmpp_2m"


def _trust_region(model_sampling, steps):
    return trust_region_sigmas(model_sampling, steps, SOLVER, "uniform_t", 2.0)


def enabled() -> bool:
    return os.environ.get(SETTING, "").strip() == "1"


def register():
    """Add the scheduler where the setting asks for it (once); returns whether it is registered."""
    if not enabled():
        return False
    if NAME not in comfy.samplers.SCHEDULER_HANDLERS:
        comfy.samplers.SCHEDULER_HANDLERS[NAME] = comfy.samplers.SchedulerHandler(_trust_region, use_ms=True)
    if NAME not in comfy.samplers.SCHEDULER_NAMES:
        comfy.samplers.SCHEDULER_NAMES.append(NAME)     # in place: KSampler.SCHEDULERS is this list
    logging.info("Calibrated Samplers: scheduler %r added to ComfyUI's scheduler list (%s=1)", NAME, SETTING)
    return True
