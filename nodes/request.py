"""A calibration request: the node's inputs, read and checked once, before any model call.

`Request` is frozen: every function below the nodes takes it whole and reads what it needs by name.
`plan` checks it against the model (its family and noise schedule) and gives the student sigmas, the
settings the fits depend on (`settings`, stored with the calibration) and the key under which the result
is stored and found again.
"""
import logging
import math
from dataclasses import dataclass, fields

import torch

import comfy.samplers

from ..optimizers.calibration import calibration_key, check_schedule
from ..optimizers.coordinates import NoiseSchedule
from .builtins import ksampler_sigmas, partial_pass
from .fingerprint import model_fingerprint
from .methods import ALL, AUTO, METHODS, NotApplicable

TEACHER_SOLVER = "dpmpp_3m_lambda"
AUTO_SCHEDULER = "auto"         # scheduler auto: each method that keeps a schedule tries the best built-in ones
PROVISIONAL_SCHEDULER = "karras"    # scheduler auto's sigmas before the built-ins are screened (or if none fits)
PARTIAL_SCHEDULER = "simple"    # scheduler auto in a partial pass starts where KSampler's default scheduler does
SCHEDULERS = [AUTO_SCHEDULER, *comfy.samplers.SCHEDULER_NAMES]
AUTO_TEACHER = 0                # teacher_steps 0: as long as the student needs (`CalibrationRun.settle_teacher`)


@dataclass(frozen=True)
class Request:
    methods: tuple                  # names in METHODS
    steps: int                      # KSampler's steps
    cfg: float
    seed: int                       # of the calibration noises
    teacher_steps: int
    calibration_batch: int
    scheduler: str = "karras"       # the student sigmas, unless `sigmas` are given
    sampler_name: str = "euler"     # the sampler a method tunes, where one does
    sigmas: tuple | None = None     # student sigmas the user gave, or None
    denoise: float = 1.0            # below 1: a partial pass (img2img, hires fix) from KSampler's start for it
    options: tuple = ()             # (name, value) of the inputs a method declares for itself (`Method.inputs`)

    @classmethod
    def from_inputs(cls, method, sigmas=None, **inputs):
        """From a node's inputs; `method` is one name of METHODS, "all", or "auto" (those of AUTO that sample
        within `steps` model evaluations: what KSampler (Calibrated)'s auto can choose); inputs that are not
        fields of the request are the methods' own options."""
        if method not in ("all", "auto") and method not in METHODS:
            raise ValueError(f"method {method!r}: expected 'all' or one of {', '.join(METHODS)}")
        given = None if sigmas is None else tuple(float(v) for v in torch.as_tensor(sigmas).detach().cpu().double())
        names = {f.name for f in fields(cls)}
        options = tuple(sorted((k, v) for k, v in inputs.items() if k not in names and v is not None))
        methods = (method,) if method in METHODS else tuple(ALL)
        if method == "auto":
            steps, settings = inputs.get("steps"), {"sampler_name": inputs.get("sampler_name", "euler")}
            methods = tuple(m for m in AUTO if METHODS[m].evaluations(steps, settings) <= steps)
        return cls(methods=methods, sigmas=given, options=options, **{k: v for k, v in inputs.items() if k in names})

    @property
    def partial(self) -> bool:
        """A pass from a picture re-noised to the student's first sigma (denoise below 1, by KSampler's rule)."""
        return partial_pass(self.denoise)

    @property
    def provisional_scheduler(self) -> str:
        """The scheduler, or for scheduler auto the one whose sigmas stand in until the built-ins are screened (in a
        partial pass, the one whose start it keeps: another start is another noise level)."""
        if self.scheduler != AUTO_SCHEDULER:
            return self.scheduler
        return PARTIAL_SCHEDULER if self.partial else PROVISIONAL_SCHEDULER

    def option(self, name, default=None):
        return dict(self.options).get(name, default)

    @property
    def needs_teacher(self) -> bool:
        return any(METHODS[m].needs_teacher(self) for m in self.methods)


@dataclass(frozen=True)
class Plan:
    request: Request
    methods: tuple                  # the requested methods that apply (`NotApplicable` ones left out)
    schedule: NoiseSchedule
    sigmas: torch.Tensor            # the student sigmas of the methods that keep a schedule (float64)
    settings: dict                  # JSON-able: everything besides the model that the fits depend on
    fingerprint: str
    key: str

    @property
    def partial(self) -> bool:
        """A pass from a picture re-noised to the student's first sigma (`Request.partial`)."""
        return self.request.partial

    @property
    def start(self) -> float:
        """The sigma the teacher and the built-ins compared start from: sigma_max, or a partial pass's start."""
        return float(self.sigmas[0]) if self.partial else self.schedule.sigma_max


def check_number(name, value, low=None, high=None, integer=False):
    """Raise ValueError naming the input unless `value` is a finite number (an integer) within [low, high]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or (integer and value != int(value)):
        raise ValueError(f"{name} {value!r}: expected a finite {'whole ' if integer else ''}number")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"from {low} to {high}" if low is not None and high is not None else \
            f"at least {low}" if low is not None else f"at most {high}"
        raise ValueError(f"{name} {value!r}: expected {bounds}")


def plan(model, latent_shape, request: Request, starts="noise") -> Plan:
    """Check the request against the model; raises ValueError naming the input that is wrong. `starts`: what a
    partial pass (denoise below 1) starts from: "latent_image" (the one given) or "teacher" (the teacher's own
    pictures; `CalibrationRun.starting_pictures`)."""
    check_number("cfg", request.cfg, 0)
    check_number("denoise", request.denoise, 0, 1)
    if request.denoise <= 0:
        raise ValueError("denoise 0: nothing to sample (KSampler returns the latent as it is)")
    check_number("steps", request.steps, 1, integer=True)
    if request.teacher_steps != AUTO_TEACHER:
        check_number("teacher_steps", request.teacher_steps, 2, integer=True)
    check_number("calibration_batch", request.calibration_batch, 1, integer=True)
    check_number("seed", request.seed, 0, integer=True)
    ms = model.get_model_object("model_sampling")
    schedule = NoiseSchedule.from_model_sampling(ms)
    if request.sigmas is not None:
        student = torch.tensor(request.sigmas, dtype=torch.float64)
        check_schedule(student, "sigmas")
        if float(student[0]) > schedule.sigma_max * (1 + 1e-4):
            raise ValueError(f"sigmas: starts at {float(student[0]):.4g}, above the model's sigma_max "
                             f"{schedule.sigma_max:.4g}")
        if len(student) - 1 != request.steps:
            raise ValueError(f"sigmas: {len(student) - 1} steps given, but steps is {request.steps}; make them agree")
    else:
        if request.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler {request.scheduler!r}: expected one of {', '.join(SCHEDULERS)}")
        student = ksampler_sigmas(ms, request.provisional_scheduler, request.steps, denoise=request.denoise).double()
        if len(student) - 1 != request.steps:
            raise ValueError(f"scheduler {request.scheduler} gives {len(student) - 1} steps for steps "
                             f"{request.steps}{f' at denoise {request.denoise:g}' if request.partial else ''}: "
                             "choose another steps or scheduler, or connect sigmas")
    if request.partial and not schedule.sigma_min < float(student[0]) < schedule.sigma_max:
        raise ValueError(f"denoise {request.denoise:g}: the pass would start at sigma {float(student[0]):.4g}, "
                         f"outside the model's ({schedule.sigma_min:.4g}, {schedule.sigma_max:.4g}); raise denoise")
    if request.needs_teacher and request.teacher_steps != AUTO_TEACHER and request.steps > request.teacher_steps // 2:
        raise ValueError(f"steps {request.steps} is too many for a {request.teacher_steps}-step teacher: use at most "
                         f"{request.teacher_steps // 2} steps, or raise teacher_steps to {2 * request.steps} or more")
    methods = []
    for name in request.methods:
        try:
            METHODS[name].check(request, student, schedule)
        except NotApplicable as e:
            if len(request.methods) == 1:
                raise
            logging.info("Calibrated Samplers: %s left out: %s", name, e)
            continue
        methods.append(name)
    teacher_steps = "auto" if request.teacher_steps == AUTO_TEACHER else int(request.teacher_steps)
    settings = {"teacher": {"steps": teacher_steps, "solver": TEACHER_SOLVER},
                "seed": int(request.seed), "batch": int(request.calibration_batch), "methods": methods,
                "given_sigmas": None if request.sigmas is None else [round(v, 6) for v in request.sigmas]}
    if request.partial:             # (absent at denoise 1: the keys of full-pass calibrations stay as they were)
        settings["denoise"] = {"denoise": round(float(request.denoise), 4), "starts": starts,
                               "start_sigma": round(float(student[0]), 6)}
    for name in methods:
        settings.update(METHODS[name].settings(request))
    fingerprint = model_fingerprint(model)
    key = calibration_key(schedule.family, fingerprint, request.steps, request.cfg, latent_shape, settings)
    return Plan(request, tuple(methods), schedule, student, settings, fingerprint, key)


def denoise_of(settings) -> float:
    """The denoise a calibration was fitted for (1 where its settings name none)."""
    return settings.get("denoise", {}).get("denoise", 1.0)
