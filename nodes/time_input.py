"""The TimeTuner hook: scales the time input the diffusion model receives, nothing else.

`with_time_ratio(extra_args, ratios)` returns a copy of a k-diffusion sampler's extra_args whose
model_options carry a DIFFUSION_MODEL wrapper (comfy.patcher_extension). That wrapper runs after
ComfyUI has scaled the input (c_in) and converted sigma to the network's timestep, around
`diffusion_model.forward(x, timesteps, ...)`: it multiplies `timesteps` by `ratios(sigma)` of each
batch row (sigma from transformer_options["sigmas"]) and leaves the input, the conditioning and the
output conversion alone. The caller's extra_args and model_options are never modified.

Diffusion models that do not run DIFFUSION_MODEL wrappers (in ComfyUI 0.3.75 e.g. SD3's MMDiT) would
silently ignore the ratios: `verify_time_ratio` raises after such a run.
"""
import torch

import comfy.model_patcher
import comfy.patcher_extension as pe

WRAPPER_KEY = "calibrated_samplers.time_ratio"


class TimeRatioWrapper:
    """DIFFUSION_MODEL wrapper multiplying the timestep argument by ratios(sigma); counts its runs."""

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
