"""IIA (Zhang, Niwa, Kleijn, ICLR 2024) on ComfyUI: IIA-DDIM, BIIA-Heun and IIA-Heun, each step fitted to the
teacher's state at its next sigma (default) or to M finer sub-steps of the same solver (the paper's target)."""
import time

import torch
from comfy_api.latest import io

from ...optimizers import iia
from ...optimizers.teacher import rmse
from ..builtins import model_evaluations
from . import Method, finite, scheduler_setting

SUBSTEPS = 3                    # M, the paper's default
HISTORY = 1                     # r, the paper's default
TARGETS = ["teacher", "substeps"]


class IIA(Method):
    follows = ("scheduler",)
    node = ("IIASampler", "IIA Sampler",
            "Improved Integration Approximation (Zhang, Niwa, Kleijn): DDIM or Heun with a few fitted coefficients per "
            "step. Use with the calibration's sigmas (Calibration Sigmas).")

    def __init__(self, name):
        self.name = name
        self.default_variant = name == "iia_heun"
        self.plain = "ddim" if name == "iia_ddim" else "heun"
        self.summary = {
            "iia_ddim": "IIA-DDIM: DDIM plus two fitted correction terms per step (the scheduler's sigmas)",
            "biia_heun": "BIIA-Heun: a fitted mix of the current and previous Heun directions (2 evaluations per step)",
            "iia_heun": "IIA-Heun: Heun with fitted coefficients on its terms and on the previous step (2 evaluations "
                        "per step)"}[name]

    @staticmethod
    def inputs():
        return [io.Int.Input("iia_substeps", default=SUBSTEPS, min=2, max=50, optional=True,
                             tooltip="M, for iia_target 'substeps': finer sub-steps per step that IIA fits to "
                                     "(the paper: 3; 10 fits more closely at a higher one-off cost)."),
                io.Combo.Input("iia_target", options=TARGETS, default=TARGETS[0], optional=True,
                               tooltip="What each IIA step is fitted to: 'teacher', the teacher run's state at "
                                       "the step's next sigma (shares the teacher with the other methods; much "
                                       "lower error); 'substeps', M finer sub-steps of the same solver (the "
                                       "paper's target, no teacher run).")]

    @staticmethod
    def target(request):
        return request.option("iia_target", TARGETS[0])

    def needs_teacher(self, request):
        return self.target(request) == "teacher"

    def check(self, request, sigmas, schedule):
        if self.target(request) not in TARGETS:
            raise ValueError(f"iia_target {self.target(request)!r}: expected one of {', '.join(TARGETS)}")
        if request.option("iia_substeps", SUBSTEPS) < 2:
            raise ValueError(f"iia_substeps {request.option('iia_substeps')}: the fine target needs at least 2 "
                             "sub-steps")

    def settings(self, request):
        out = {**scheduler_setting(request), "iia_target": self.target(request)}
        if self.target(request) == "substeps":
            out["iia_substeps"] = int(request.option("iia_substeps", SUBSTEPS))
        return out

    def evaluations(self, steps, settings):
        return model_evaluations(self.plain, steps)

    def fit(self, run):
        """Fitted step by step to the teacher's state at each next sigma (`iia_target` "teacher": the teacher
        run is shared with the other methods, and fits what sampling is judged by), or to M finer sub-steps of
        the same solver from the IIA sampler's own state (the paper's target; no teacher run)."""
        fit = iia.IIAFit(m=run.request.option("iia_substeps", SUBSTEPS))
        start, calls = time.perf_counter(), run.calls[0]
        if self.target(run.request) == "teacher":
            fit.targets = run.teacher_states(run.sigmas[1:])
        x = run.sample(iia.sample_iia, run.sigmas.float(), schedule=run.schedule, variant=self.name, r=HISTORY,
                       fit=fit)
        tensors = finite(self.name, {"sigmas": run.sigmas.float(), "coefficients": torch.stack(fit.coefficients)})
        # (each step is fitted before it is taken: the fitting run's final x is the fit's own sample)
        in_sample = {"rmse": rmse(x.cpu(), run.trajectory.final)} if fit.targets is not None else {}
        return tensors, {**in_sample, "step_error": fit.fit_error, "plain_step_error": fit.plain_error,
                         "target": self.target(run.request), "scheduler": run.scheduler_name,
                         "evaluations": run.calls[0] - calls,
                         "fit_seconds": time.perf_counter() - start}

    def plain_sampler(self, settings):
        return self.plain

    def plain_tensors(self, tensors, settings, schedule):
        return {**tensors, "coefficients": iia.plain_coefficients(self.name, tensors["sigmas"], HISTORY)}

    def shapes(self, steps):
        return {"coefficients": (steps, iia.coefficient_count(self.name, HISTORY))}

    def sampler(self, tensors, settings, schedule):
        coefficients = tensors["coefficients"]
        r = coefficients.shape[1] - iia.coefficient_count(self.name, 0)
        return iia.sample_iia, {"schedule": schedule, "variant": self.name, "r": r, "coefficients": coefficients}
