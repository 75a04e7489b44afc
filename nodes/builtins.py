"""What the pack needs to know about ComfyUI's own samplers and schedulers, in one place."""
import torch

import comfy.samplers

# ComfyUI's deterministic samplers (no noise injected: one trajectory per start noise), in KSampler's order:
# those a method can tune, and those the report and the benchmarks compare with.
DETERMINISTIC_SAMPLERS = ["euler", "ddim", "heun", "heunpp2", "dpm_2", "lms", "dpmpp_2m", "ipndm", "ipndm_v", "deis",
                          "res_multistep", "gradient_estimation", "uni_pc", "uni_pc_bh2"]
# Those spending one model evaluation per step, the built-ins `auto` chooses from (ComfyUI's ddim is its euler)
ONE_EVALUATION = [s for s in DETERMINISTIC_SAMPLERS if s not in ("ddim", "heun", "heunpp2", "dpm_2")]


def schedules(model_sampling, steps, sampler_name, denoise=1.0, start=None) -> dict:
    """{scheduler: sigmas} for every ComfyUI scheduler that gives `steps` steps (as KSampler makes them for the
    sampler and denoise); with `start`, only those that start there (a partial pass's start sets its noise)."""
    out = {}
    for scheduler in comfy.samplers.SCHEDULER_NAMES:
        sigmas = ksampler_sigmas(model_sampling, scheduler, steps, sampler_name, denoise)
        if len(sigmas) - 1 == steps and bool(torch.all(sigmas[1:] < sigmas[:-1])) \
                and (start is None or same_start(float(sigmas[0]), start)):
            out[scheduler] = sigmas
    return out


def same_start(sigma, start) -> bool:
    return abs(sigma - start) <= 1e-3 * start


def partial_pass(denoise) -> bool:
    """Whether KSampler samples only the last part of a schedule for this denoise (its rule: below 0.9999)."""
    return denoise <= 0.9999


def ksampler_sigmas(model_sampling, scheduler, steps, sampler_name=None, denoise=1.0):
    """Sigmas as ComfyUI's KSampler makes them: it drops the penultimate sigma for some samplers, and for denoise
    below 1 takes the last steps + 1 sigmas of the schedule for int(steps / denoise) steps."""
    discard = sampler_name in comfy.samplers.KSampler.DISCARD_PENULTIMATE_SIGMA_SAMPLERS
    partial = partial_pass(denoise)
    sigmas = comfy.samplers.calculate_sigmas(model_sampling, scheduler, (int(steps / denoise) if partial else steps)
                                             + discard)
    sigmas = drop_penultimate(sigmas) if discard else sigmas
    return sigmas[-(steps + 1):] if partial else sigmas


def drop_penultimate(sigmas):
    return torch.cat([sigmas[:-2], sigmas[-1:]])


def model_evaluations(sampler_name, steps) -> int:
    """Model evaluations of a deterministic ComfyUI sampler over `steps` steps ending at sigma 0: heun and dpm_2
    evaluate twice per step but the last, heunpp2 three times (twice at the penultimate step)."""
    if sampler_name == "heunpp2":
        return max(1, 3 * steps - 3)
    return 2 * steps - 1 if sampler_name in ("heun", "dpm_2") else steps
