"""Calibrated time steps on ComfyUI: a built-in sampler (`sampler_name`) on interior sigmas fitted to the teacher,
starting from, and pulled toward, the better on the calibration batch of the trust-region schedule for that sampler
and the built-in schedule on which that sampler screened best (`optimizers/time_steps.py`)."""
import dataclasses
import time

import torch

import comfy.model_management
import comfy.samplers

from ...optimizers import time_steps
from ...optimizers.teacher import rmse
from ...optimizers.trust_region import SOLVERS, time_step_sigmas
from ..builtins import ksampler_sigmas, model_evaluations
from . import Method, NotApplicable, finite


def start_sigmas(schedule, steps, sampler_name):
    """The trust-region schedule (Xue et al.) for the sampler's order: the fit's start, and its plain form."""
    return torch.from_numpy(time_step_sigmas(schedule, steps, sampler_name, "karras", 2.0, trunc_num=3))


class TimeSteps(Method):
    name = "time_steps"
    summary = ("Calibrated time steps: the chosen built-in sampler on sigmas fitted to the teacher (from the "
               "better of the trust-region schedule and its best built-in schedule; dozens of sampling runs, so not "
               "part of 'all')")
    in_all = False              # its fit runs the sampler dozens of times: asked for by name only
    follows = ("sampler_name",)
    node = ("TimeStepsSampler", "Calibrated Time Steps Sampler",
            "Calibrated time steps: the built-in sampler the calibration was fitted for (its sampler_name), to use "
            "with the calibration's sigmas (Calibration Sigmas, method time_steps) in SamplerCustom.")

    def check(self, request, sigmas, schedule):
        if request.sampler_name not in SOLVERS:
            modelled = ", ".join(s for s in SOLVERS if s != "original")
            raise NotApplicable(f"sampler_name {request.sampler_name}: calibrated time steps start from the "
                                f"trust-region schedule, which models {modelled}")

    def settings(self, request):
        return {"sampler_name": request.sampler_name}

    def evaluations(self, steps, settings):
        return model_evaluations(settings["sampler_name"], steps)

    def fit(self, run):
        request = run.request
        base = comfy.samplers.sampler_object(request.sampler_name)
        final = run.trajectory.final
        start = time.perf_counter()

        def error(sigmas):
            x = run.sample(base.sampler_function, torch.as_tensor(sigmas).float(), **base.extra_options)
            return rmse(x.cpu(), final) ** 2

        starts = {"trust region": start_sigmas(dataclasses.replace(run.schedule, sigma_max=run.plan.start),
                                               request.steps, request.sampler_name)}
        if run.builtin_screen is not None:      # (where the calibration made one)
            for scheduler in run.builtin_screen.schedulers_for(request.sampler_name, 1):
                starts[scheduler] = ksampler_sigmas(run.model.get_model_object("model_sampling"), scheduler,
                                                    request.steps, request.sampler_name, request.denoise).double()
        start_errors = {label: error(sigmas) for label, sigmas in starts.items()} if len(starts) > 1 else {}
        chosen = min(start_errors, key=start_errors.get) if start_errors else "trust region"
        interrupted = comfy.model_management.throw_exception_if_processing_interrupted
        sigmas, facts = time_steps.fit_time_steps(error, starts[chosen].numpy(), run.schedule, check=interrupted,
                                                  start_error=start_errors.get(chosen))
        tensors = finite(self.name, {"sigmas": torch.from_numpy(sigmas).float(), "start": starts[chosen].float()})
        steps = model_evaluations(request.sampler_name, request.steps)
        return tensors, {"sampler_name": request.sampler_name, "step_error": [], "rmse": facts["error"] ** 0.5,
                         "start": chosen, "start_rmse": facts["start_error"] ** 0.5,
                         "starts_rmse": {label: value ** 0.5 for label, value in start_errors.items()},
                         "evaluations": (facts["evaluations"] + len(start_errors)) * steps,
                         "fit_seconds": time.perf_counter() - start}

    def plain_tensors(self, tensors, settings, schedule):
        """The schedule the fit started from."""
        return {**tensors, "sigmas": tensors["start"]}

    def shapes(self, steps):
        return {"start": (steps + 1,)}

    def sampler(self, tensors, settings, schedule):
        base = comfy.samplers.sampler_object(settings["sampler_name"])
        return base.sampler_function, base.extra_options
