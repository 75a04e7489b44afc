"""The calibrated methods: how each is fitted from one calibration run, and made into a sampler.

A `CalibrationRun` is one request on the user's model: the calibration noises, conditioning and
guidance, the student schedule, and (made on first use) the teacher trajectory. Every run of the
model goes through ComfyUI's own sampling call, so conditioning, CFG, patches, model management, the
progress bar, previews and Cancel behave as in normal sampling. Each `Method` fits tensors from a run
(always with the `sigmas` it samples on) plus JSON-able diagnostics, and turns stored tensors back
into a k-diffusion sampler function.
"""
import time
from dataclasses import dataclass
from typing import Callable

import torch

import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview

from ..optimizers import iia, olss, timetuner
from ..optimizers.coordinates import NoiseSchedule
from ..optimizers.teacher import Trajectory, sample_teacher, teacher_sigmas
from . import time_input

# Deterministic ComfyUI samplers (TimeTuner tunes a fixed, noise-free trajectory).
TIMETUNER_BASES = ["euler", "ddim", "heun", "heunpp2", "dpm_2", "lms", "dpmpp_2m", "ipndm", "ipndm_v", "deis",
                   "res_multistep", "gradient_estimation", "uni_pc", "uni_pc_bh2"]
IIA_SUBSTEPS = 3            # M, the paper's default
IIA_HISTORY = 1             # r, the paper's default
IIA_TARGETS = ["teacher", "substeps"]   # what each IIA step is fitted to (see `_fit_iia`)
# Built-ins every calibration with a teacher is compared with, on the calibration batch (the report)
SHORTLIST = ["euler", "dpmpp_2m", "uni_pc", "deis", "ipndm"]


def ksampler_sigmas(model_sampling, scheduler, steps, sampler_name=None):
    """Sigmas as ComfyUI's KSampler makes them (it drops the penultimate sigma for some samplers)."""
    discard = sampler_name in comfy.samplers.KSampler.DISCARD_PENULTIMATE_SIGMA_SAMPLERS
    sigmas = comfy.samplers.calculate_sigmas(model_sampling, scheduler, steps + discard)
    return torch.cat([sigmas[:-2], sigmas[-1:]]) if discard else sigmas


@dataclass
class CalibrationRun:
    model: object                   # ModelPatcher
    positive: list
    negative: list
    latent: torch.Tensor            # one sample's empty latent, [1, C, H, W]
    seed: int
    cfg: float
    batch: int
    schedule: NoiseSchedule
    steps: int
    sigmas: torch.Tensor            # the student schedule of fixed-schedule methods (float64)
    fixed: bool                     # the user gave the sigmas
    scheduler: str
    sampler_name: str               # TimeTuner's base sampler
    teacher_steps: int
    iia_substeps: int = IIA_SUBSTEPS
    iia_target: str = IIA_TARGETS[0]
    _trajectory: Trajectory | None = None
    _gram: tuple | None = None
    teacher_seconds: float = 0.0

    def sample(self, function, sigmas, **options):
        """Final x of `function` run as a KSAMPLER inside ComfyUI's sampling call, on the calibration
        noises (the same noises for every method and the teacher), in the model's own space: the x that
        `function` returns, where the teacher's states are recorded too, not the LATENT that ComfyUI
        makes of it (`process_latent_out`). `sigmas` are copied: some ComfyUI samplers write into them."""
        latent = self.latent[:1].repeat(self.batch, *[1] * (self.latent.ndim - 1))
        noise = comfy.sample.prepare_noise(latent, self.seed)
        final = []

        def recorded(*args, **kwargs):
            final.append(function(*args, **kwargs))
            return final[-1]

        sampler = comfy.samplers.KSAMPLER(recorded, extra_options=options)
        callback = latent_preview.prepare_callback(self.model, len(sigmas) - 1)
        comfy.sample.sample_custom(self.model, noise, self.cfg, sampler, sigmas.clone(), self.positive, self.negative,
                                   latent, callback=callback, seed=self.seed,
                                   disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED)
        return final[-1]

    @property
    def has_teacher(self) -> bool:
        return self._trajectory is not None

    @property
    def trajectory(self) -> Trajectory:
        """The teacher run (uniform in lambda, or through the given student sigmas), made once."""
        if self._trajectory is None:
            grid = teacher_sigmas(self.schedule, self.teacher_steps, through=self.sigmas if self.fixed else None)
            trajectory = Trajectory.for_budget(grid, self.batch * self.latent[0].numel())
            start = time.perf_counter()
            self.sample(sample_teacher, grid, schedule=self.schedule, trajectory=trajectory)
            self.teacher_seconds = time.perf_counter() - start
            for i, d in enumerate(trajectory.denoised):
                if not torch.isfinite(d).all():
                    raise ValueError(f"the model returned NaN or inf during calibration (teacher step {i}, sigma "
                                     f"{float(grid[i]):.4g}): nothing was stored; check the model and its patches")
            self._trajectory = trajectory
        return self._trajectory

    def teacher_states(self, sigmas) -> list:
        """The teacher's state at each of `sigmas` (a fit's targets)."""
        return [self.trajectory.state_at(self.schedule, float(s)) for s in sigmas]

    def nearest_teacher_steps(self, sigmas) -> list:
        """The index of the teacher sigma nearest to each of `sigmas`."""
        grid = self.trajectory.sigmas.double()
        return [int(torch.argmin((grid - float(s)).abs())) for s in sigmas]

    @property
    def gram(self):
        """(OLSS Gram matrices of the teacher trajectory, seconds), made once."""
        if self._gram is None:
            trajectory = self.trajectory            # (the teacher run is not the Gram matrix's time)
            start = time.perf_counter()
            gram = olss.trajectory_gram(trajectory, self.schedule)
            self._gram = gram, time.perf_counter() - start
        return self._gram


@dataclass(frozen=True)
class Method:
    name: str
    summary: str                                   # one line for tooltips
    needs_teacher: bool                            # IIA: only with iia_target "teacher" (`needs_teacher`)
    fit: Callable                                  # (run, name) -> (tensors, diagnostics)
    sampler: Callable                              # (tensors, settings, schedule) -> (function, options)
                                                   # settings: the calibration's, plus "base" (TimeTuner)


def needs_teacher(name, iia_target=IIA_TARGETS[0]):
    return METHODS[name].needs_teacher or (name in iia.VARIANTS and iia_target == "teacher")


def _finite(name, tensors):
    for key, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"{name}: the fit gave NaN or inf ({key}); the model's outputs are not finite or the "
                             "calibration batch is degenerate: nothing was stored")
    return tensors


# --- OLSS ------------------------------------------------------------------------------------------
def _olss_candidates(run, name, gram):
    """{label: OLSSCoefficients fitted to the teacher's own outputs (eq. 12)}: the given sigmas' nearest
    teacher steps; else, for OLSS, the searched path (Algorithm 3), the uniform path and the scheduler's
    sigmas (DDIM's coefficients as the prior there: they are not teacher steps); for OLSS-P the uniform path."""
    if run.fixed:
        return {"given sigmas": olss.fit_olss(gram, run.nearest_teacher_steps(run.sigmas[:-1]))}
    candidates = {"uniform path": olss.fit_olss(gram, olss.uniform_path(gram.teacher_steps, run.steps))}
    if name == "olss":
        candidates["searched path"] = olss.fit_olss(gram, olss.search_path(gram, run.steps))
        sigmas = run.sigmas.double()
        weights_x, weights_d = olss.ddim_coefficients(run.schedule, sigmas)
        candidates[f"{run.scheduler} sigmas"] = olss.OLSSCoefficients(
            tuple(run.nearest_teacher_steps(sigmas[:-1])), sigmas.float(), weights_x, weights_d, torch.zeros(run.steps, dtype=torch.float64))
    return candidates


def _fit_olss(run, name):
    """For each candidate schedule, the teacher-fitted coefficients and the same re-solved on the student's own
    outputs (`olss.SequentialRefit`); keeps the one whose final x comes closest to the teacher's on the
    calibration batch. A refit is judged by two-fold cross-validation (fitted on half the batch, measured on
    the other half), so that it replaces the teacher fit only where it generalises."""
    gram, gram_seconds = run.gram
    start = time.perf_counter()
    final = run.trajectory.final.double()
    norm = float(gram.target_sq[-1].sqrt()) or 1.0
    halves = [list(range(0, run.batch, 2)), list(range(1, run.batch, 2))]
    scores, best, evaluations = {}, None, 0

    def sample(c, targets, rows=None, refit=True):
        """(final x, coefficients, SequentialRefit) of one run: re-solving on `rows` (None: all), or measuring."""
        nonlocal evaluations
        evaluations += c.steps
        ours = c.copy()
        scales = [run.schedule.native_scale(float(s)) / norm for s in c.sigmas[1:]]
        solver = olss.SequentialRefit(targets, scales, rows=rows, keep_prior=not refit)
        x = run.sample(olss.sample_olss, c.sigmas.float(), coefficients=ours, refit=solver).cpu().double()
        return x, ours, solver

    for label, c in _olss_candidates(run, name, gram).items():
        targets = run.teacher_states(c.sigmas[1:])
        x, measured, solver = sample(c, targets, refit=False)
        scores[label] = {"teacher fit": float((x - final).pow(2).mean().sqrt())}
        if best is None or scores[label]["teacher fit"] < best[0]:
            best = scores[label]["teacher fit"], label, measured, solver, targets
        if run.batch >= 2:
            held = [sample(c, targets, rows=half)[0][other] - final[other] for half, other in zip(halves, halves[::-1])]
            scores[label]["refit, cross-validated"] = float(torch.cat(held).pow(2).mean().sqrt())
            if scores[label]["refit, cross-validated"] < best[0]:
                best = scores[label]["refit, cross-validated"], label, c, None, targets
    _, label, c, solver, targets = best
    refitted = solver is None
    if refitted:
        _, c, solver = sample(c, targets)
    tensors = _finite(name, {"path": torch.tensor(c.path, dtype=torch.int64), "sigmas": c.sigmas.float(),
                             "weights_x": c.weights_x.double(), "weights_d": c.weights_d.double(),
                             "errors": c.errors.double()})
    return tensors, {"step_error": solver.errors, "schedule": label, "refit": refitted, "candidate_rmse": scores,
                     "evaluations": evaluations, "fit_seconds": time.perf_counter() - start + gram_seconds}


def _olss_sampler(tensors, settings, schedule):
    coefficients = olss.OLSSCoefficients(tuple(int(i) for i in tensors["path"]), tensors["sigmas"],
                                         tensors["weights_x"], tensors["weights_d"], tensors["errors"])
    return olss.sample_olss, {"coefficients": coefficients}


# --- IIA -------------------------------------------------------------------------------------------
def _fit_iia(run, name):
    """Fitted step by step to the teacher's state at each next sigma (`iia_target` "teacher": the teacher
    run is shared with the other methods, and fits what sampling is judged by), or to M finer sub-steps of
    the same solver from the IIA sampler's own state (the paper's target; no teacher run)."""
    fit = iia.IIAFit(m=run.iia_substeps)
    start = time.perf_counter()
    if run.iia_target == "teacher":
        fit.targets = run.teacher_states(run.sigmas[1:])
    run.sample(iia.sample_iia, run.sigmas.float(), schedule=run.schedule, variant=name, r=IIA_HISTORY, fit=fit)
    tensors = _finite(name, {"sigmas": run.sigmas.float(), "coefficients": torch.stack(fit.coefficients)})
    return tensors, {"step_error": fit.fit_error, "plain_step_error": fit.plain_error, "target": run.iia_target,
                     "evaluations": fit.evaluations, "fit_seconds": time.perf_counter() - start}


def _iia_sampler_for(name):
    def make(tensors, settings, schedule):
        coefficients = tensors["coefficients"]
        r = coefficients.shape[1] - iia.coefficient_count(name, 0)
        return iia.sample_iia, {"schedule": schedule, "variant": name, "r": r, "coefficients": coefficients}
    return make


# --- TimeTuner -------------------------------------------------------------------------------------
def _fit_timetuner(run, name):
    sigmas = run.sigmas if run.fixed else ksampler_sigmas(
        run.model.get_model_object("model_sampling"), run.scheduler, run.steps, run.sampler_name).double()
    targets = run.teacher_states(sigmas[1:])
    base = comfy.samplers.sampler_object(run.sampler_name)
    result = {}
    start = time.perf_counter()
    run.sample(timetuner.tune_time_ratios, sigmas.float(), base=base.sampler_function,
               base_options=base.extra_options, targets=targets, with_time_ratio=time_input.with_time_ratio,
               verify=time_input.verify_time_ratio, result=result)
    tensors = _finite(name, {"sigmas": sigmas.float(), "ratios": result["ratios"].double()})
    steps = len(sigmas) - 1
    return tensors, {"sampler_name": run.sampler_name, "step_error": result["errors_final"],
                     "plain_step_error": result["errors_nominal"], "evaluations": result["total_evaluations"],
                     "evaluations_per_step": result["total_evaluations"] / steps,
                     "fit_seconds": time.perf_counter() - start}


def timetuner_options(tensors, base):
    """Options of `timetuner.sample_timetuner` wrapping `base` (a KSAMPLER) with the stored ratios."""
    if not hasattr(base, "sampler_function"):
        raise ValueError("TimeTuner wraps ComfyUI's k-diffusion samplers (KSAMPLER); this SAMPLER is another kind")
    return {"base": base.sampler_function, "base_options": base.extra_options,
            "ratios": timetuner.TimeRatios(tensors["sigmas"][:-1], tensors["ratios"]),
            "with_time_ratio": time_input.with_time_ratio, "verify": time_input.verify_time_ratio}


def _timetuner_sampler(tensors, settings, schedule):
    """settings["base"]: a KSAMPLER to wrap instead of the sampler the ratios were tuned with."""
    base = settings.get("base") or comfy.samplers.sampler_object(settings["sampler_name"])
    return timetuner.sample_timetuner, timetuner_options(tensors, base)


METHODS = {m.name: m for m in [
    Method("olss", "OLSS: each step a fitted combination of the start noise and all earlier outputs, on searched "
                   "teacher steps", True, _fit_olss, _olss_sampler),
    Method("olss_p", "OLSS-P: OLSS on uniformly spaced teacher steps", True, _fit_olss, _olss_sampler),
    Method("iia_ddim", "IIA-DDIM: DDIM plus two fitted correction terms per step (the scheduler's sigmas)", False,
           _fit_iia, _iia_sampler_for("iia_ddim")),
    Method("biia_heun", "BIIA-Heun: a fitted mix of the current and previous Heun directions (2 evaluations per "
                        "step)", False, _fit_iia, _iia_sampler_for("biia_heun")),
    Method("iia_heun", "IIA-Heun: Heun with fitted coefficients on its terms and on the previous step (2 "
                       "evaluations per step)", False, _fit_iia, _iia_sampler_for("iia_heun")),
    Method("timetuner", "TimeTuner: the chosen sampler with a tuned time input per step (the scheduler's sigmas)",
           True, _fit_timetuner, _timetuner_sampler),
]}


def calibration_batch_errors(run, fits, settings):
    """{label: RMSE against the teacher's final latent} on the calibration noises, for each fitted method and
    the SHORTLIST built-ins on the run's scheduler at the same steps: what calibration bought, in sample."""
    final = run.trajectory.final
    ms = run.model.get_model_object("model_sampling")
    errors = {}
    for name, tensors in fits.items():
        function, options = METHODS[name].sampler(tensors, settings, run.schedule)
        x = run.sample(function, tensors["sigmas"].float(), **options)
        errors[name] = float((x.cpu().double() - final.double()).pow(2).mean().sqrt())
    where = "given sigmas" if run.fixed else run.scheduler
    for name in SHORTLIST:
        sigmas = run.sigmas if run.fixed else ksampler_sigmas(ms, run.scheduler, run.steps, name)
        sampler = comfy.samplers.sampler_object(name)
        x = run.sample(sampler.sampler_function, sigmas.float(), **sampler.extra_options)
        errors[f"{name} / {where}"] = float((x.cpu().double() - final.double()).pow(2).mean().sqrt())
    return errors
