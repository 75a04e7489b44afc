"""Calibrated time steps on ComfyUI: a built-in sampler (`sampler_name`) on interior sigmas fitted to the teacher,
starting from, and pulled toward, the trust-region schedule for that sampler (`optimizers/time_steps.py`)."""
import time

import torch

import comfy.model_management
import comfy.samplers

from ...optimizers import time_steps
from ...optimizers.teacher import rmse
from ...optimizers.trust_region import SOLVERS, time_step_sigmas
from ..builtins import model_evaluations
from . import Method, NotApplicable, finite


def start_sigmas(schedule, steps, sampler_name):
    """The trust-region schedule (Xue et al.) for the sampler's order: the fit's start, and its plain form."""
    return torch.from_numpy(time_step_sigmas(schedule, steps, sampler_name, "karras", 2.0, trunc_num=3))


class TimeSteps(Method):
    name = "time_steps"
    summary = ("Calibrated time steps: the chosen built-in sampler on sigmas fitted to the teacher (from the "
               "trust-region schedule; dozens of sampling runs, so not part of 'all')")
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
            x = run.sample(base.sampler_function, torch.from_numpy(sigmas).float(), **base.extra_options)
            return rmse(x.cpu(), final) ** 2

        sigmas, facts = time_steps.fit_time_steps(
            error, start_sigmas(run.schedule, request.steps, request.sampler_name), run.schedule,
            check=comfy.model_management.throw_exception_if_processing_interrupted)
        tensors = finite(self.name, {"sigmas": torch.from_numpy(sigmas).float()})
        steps = model_evaluations(request.sampler_name, request.steps)
        return tensors, {"sampler_name": request.sampler_name, "step_error": [], "rmse": facts["error"] ** 0.5,
                         "start_rmse": facts["start_error"] ** 0.5, "evaluations": facts["evaluations"] * steps,
                         "fit_seconds": time.perf_counter() - start}

    def plain_tensors(self, tensors, settings, schedule):
        return {"sigmas": start_sigmas(schedule, len(tensors["sigmas"]) - 1, settings["sampler_name"]).float()}

    def sampler(self, tensors, settings, schedule):
        base = comfy.samplers.sampler_object(settings["sampler_name"])
        return base.sampler_function, base.extra_options
