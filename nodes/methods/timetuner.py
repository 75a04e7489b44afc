"""TimeTuner (Xia et al., CVPR 2024) on ComfyUI: a deterministic ComfyUI sampler with a tuned time input per
step, and the hook that feeds the network that time input.

The hook: `with_time_ratio(extra_args, ratios)` returns a copy of a k-diffusion sampler's extra_args whose
model_options carry a DIFFUSION_MODEL wrapper (comfy.patcher_extension). That wrapper runs after
ComfyUI has scaled the input (c_in) and converted sigma to the network's timestep, around
`diffusion_model.forward(x, timesteps, ...)`: it multiplies `timesteps` by `ratios(sigma)` of each
batch row (sigma from transformer_options["sigmas"]) and leaves the input, the conditioning and the
output conversion alone. The caller's extra_args and model_options are never modified.
Diffusion models that do not run DIFFUSION_MODEL wrappers (in ComfyUI 0.3.75 e.g. SD3's MMDiT) would
silently ignore the ratios: `verify_time_ratio` raises after such a run.
"""
import math
import time

import torch

import comfy.model_patcher
import comfy.patcher_extension as pe
import comfy.samplers
from comfy_api.latest import io

from ...optimizers import timetuner
from ...optimizers.teacher import rmse
from ..builtins import DETERMINISTIC_SAMPLERS, ksampler_sigmas, model_evaluations
from . import Method, NotApplicable, finite, scheduler_setting

# ComfyUI's uni_pc samplers report their states to the callback in variance-preserving scale, x / sqrt(1 + sigma^2)
CALLBACK_SCALES = {name: (lambda sigma: math.sqrt(1 + sigma ** 2)) for name in ("uni_pc", "uni_pc_bh2")}


class TimeTuner(Method):
    name = "timetuner"
    summary = "TimeTuner: the chosen sampler with a tuned time input per step (the scheduler's sigmas)"
    follows = ("scheduler", "sampler_name")
    # not fitted by `auto`: it never validated best there in the benchmarks (42 calibrations on the digits and
    # closed-form models, NFE 4-10), and its fit was a quarter of auto's model calls
    in_auto = False
    node = ("TimeTunerSampler", "TimeTuner Sampler",
            "TimeTuner (Xia et al., CVPR 2024): the sampler the calibration was tuned with, feeding the network a "
            "tuned time input per step. Use with the calibration's sigmas (Calibration Sigmas, method timetuner).")

    @staticmethod
    def sampler_inputs():
        return [io.Sampler.Input("sampler", optional=True,
                                 tooltip="Wrap this sampler instead (e.g. from KSamplerSelect); the ratios were tuned "
                                         "for the calibration's sampler, so use the same one for best results.")]

    def check(self, request, sigmas, schedule):
        if request.sampler_name not in DETERMINISTIC_SAMPLERS:
            raise ValueError(f"sampler_name {request.sampler_name!r}: TimeTuner needs a deterministic sampler, one of "
                             f"{', '.join(DETERMINISTIC_SAMPLERS)}")
        if request.sigmas is None and not request.partial and float(sigmas[0]) < schedule.sigma_max * (1 - 1e-3):
            raise NotApplicable(f"scheduler {request.scheduler} starts at sigma {float(sigmas[0]):.4g}, below the "
                                f"model's {schedule.sigma_max:.4g}: TimeTuner needs a schedule from sigma_max (or "
                                "connect sigmas)")

    def settings(self, request):
        return {**scheduler_setting(request), "sampler_name": request.sampler_name}

    def evaluations(self, steps, settings):
        return model_evaluations(settings["sampler_name"], steps)

    def fit(self, run):
        request = run.request
        ms = run.model.get_model_object("model_sampling")
        sigmas = run.sigmas if request.sigmas is not None else \
            ksampler_sigmas(ms, run.scheduler_name, request.steps, request.sampler_name, request.denoise).double()
        targets = run.teacher_states(sigmas[1:])
        base = comfy.samplers.sampler_object(request.sampler_name)
        result = {}
        start = time.perf_counter()
        x = run.sample(timetuner.tune_time_ratios, sigmas.float(), base=base.sampler_function,
                   base_options=base.extra_options, targets=targets, with_time_ratio=with_time_ratio,
                   callback_scale=CALLBACK_SCALES.get(request.sampler_name), verify=verify_time_ratio, result=result)
        tensors = finite(self.name, {"sigmas": sigmas.float(), "ratios": result["ratios"].double()})
        steps = len(sigmas) - 1
        # (each ratio is tuned before the next step is taken: the tuning run's final x is the fit's own sample; its
        # first run, every ratio 1, is the plain sampler's)
        return tensors, {"rmse": rmse(x.cpu(), run.trajectory.final), "plain_rmse": result["errors_nominal"][-1],
                         "sampler_name": request.sampler_name, "scheduler": run.scheduler_name,
                         "step_error": result["errors_final"], "plain_step_error": result["errors_nominal"],
                         "evaluations": result["evaluations"],
                         "evaluations_per_step": result["evaluations"] / steps,
                         "fit_seconds": time.perf_counter() - start}

    def plain_sampler(self, settings):
        return settings["sampler_name"]

    def plain_tensors(self, tensors, settings, schedule):
        return {**tensors, "ratios": torch.ones_like(tensors["ratios"])}

    def shapes(self, steps):
        return {"ratios": (steps,)}

    def sampler(self, tensors, settings, schedule, sampler=None):
        base = sampler or comfy.samplers.sampler_object(settings["sampler_name"])
        if not hasattr(base, "sampler_function"):
            raise ValueError("TimeTuner wraps ComfyUI's k-diffusion samplers (KSAMPLER); this SAMPLER is another kind")
        return timetuner.sample_timetuner, {
            "base": base.sampler_function, "base_options": base.extra_options,
            "ratios": timetuner.TimeRatios(tensors["sigmas"][:-1], tensors["ratios"]),
            "with_time_ratio": with_time_ratio, "verify": verify_time_ratio}


# --- the time-input hook ----------------------------------------------------------------------------
WRAPPER_KEY = "calibrated_samplers.time_ratio"


class TimeRatioWrapper:
    """DIFFUSION_MODEL wrapper multiplying the timestep argument by ratios(sigma); counts its runs."""

    varies = True               # its ratios are tuned between runs: no run takes its first call from another's

    def __init__(self, ratios):
        self.ratios = ratios
        self.calls = 0

    def __call__(self, executor, *args, **kwargs):
        self.calls += 1
        options = _transformer_options(args, kwargs)
        if options is None or options.get("sigmas") is None:
            raise ValueError("TimeTuner: the diffusion model was called without transformer_options['sigmas']")
        if len(args) >= 2:
            args = list(args)
            args[1] = self.scale(args[1], options["sigmas"])
        else:
            for name in ("timesteps", "timestep", "t"):
                if name in kwargs:
                    kwargs[name] = self.scale(kwargs[name], options["sigmas"])
                    break
            else:
                raise ValueError("TimeTuner: cannot find the diffusion model's timestep argument")
        return executor(*args, **kwargs)

    def scale(self, timesteps, sigmas):
        ratio = self.ratios(sigmas).to(timesteps.device)                 # float64, one per sigma
        if bool(torch.all(ratio == 1)):
            return timesteps
        if timesteps.ndim == 0 or timesteps.shape[0] == 1:
            if bool(torch.all(ratio == ratio.reshape(-1)[0])):
                return (timesteps.double() * ratio.reshape(-1)[0]).to(timesteps.dtype)
            raise ValueError("TimeTuner: one timestep for a batch of different sigmas")
        rows = timesteps.shape[0]
        ratio = ratio.reshape(-1)
        if rows % len(ratio):
            raise ValueError(f"TimeTuner: {rows} timesteps for {len(ratio)} sigmas")
        ratio = ratio.repeat(rows // len(ratio))                         # cond and uncond chunks stacked
        ratio = ratio.reshape((rows,) + (1,) * (timesteps.ndim - 1))
        return (timesteps.double() * ratio).to(timesteps.dtype)


def _transformer_options(args, kwargs):
    options = kwargs.get("transformer_options")
    if isinstance(options, dict):
        return options
    for a in args[2:]:
        if isinstance(a, dict) and "sigmas" in a:
            return a
    return None


def with_time_ratio(extra_args, ratios):
    """A copy of extra_args whose model_options (a clone) scale the network's time input by ratios(sigma)."""
    extra_args = {} if extra_args is None else extra_args
    new = dict(extra_args)
    model_options = comfy.model_patcher.create_model_options_clone(extra_args.get("model_options", {}))
    wrappers = model_options.get("transformer_options", {}).get("wrappers", {})
    wrappers.get(pe.WrappersMP.DIFFUSION_MODEL, {}).pop(WRAPPER_KEY, None)         # never stack two of ours
    pe.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, TimeRatioWrapper(ratios), model_options,
                            is_model_options=True)
    new["model_options"] = model_options
    return new


def time_ratio_wrapper(extra_args):
    """Our wrapper in extra_args made by `with_time_ratio`, or None."""
    found = pe.get_wrappers_with_key(pe.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY,
                                     extra_args.get("model_options", {}), is_model_options=True)
    return found[-1] if found else None


def verify_time_ratio(extra_args, model_calls):
    """Raise ValueError if a run with these extra_args made model calls but the time hook never ran."""
    wrapper = time_ratio_wrapper(extra_args)
    if model_calls > 0 and (wrapper is None or wrapper.calls == 0):
        raise ValueError(
            "TimeTuner cannot change this model's time input: its diffusion model does not run ComfyUI's "
            "DIFFUSION_MODEL wrappers (e.g. SD3's MMDiT in this ComfyUI version). Use another sampler for it.")
