"""A calibration run: one request executed on the user's model, inside ComfyUI's own sampling.

Every run of the model goes through `comfy.sample.sample_custom`, so conditioning, CFG, patches,
model management, the progress bar, previews and Cancel behave as in normal sampling. Everything a
run records, fits and compares is in the model's own space (where ComfyUI hands a sampler its x): the
teacher's states are recorded inside the sampler function, and `sample` returns what the sampler
function returns, never the LATENT that ComfyUI makes of it.
"""
import dataclasses
import math
import time
from dataclasses import dataclass, field

import torch

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview

from ..optimizers.teacher import Trajectory, error_estimate, sample_teacher, steps_for, teacher_sigmas
from .builtins import ksampler_sigmas
from .lockstep import run_side_by_side
from .methods import folds
from .request import Plan

AUTO_MAX_STEPS = 1000           # the longest teacher that teacher_steps auto takes


def auto_start(steps) -> int:
    """The first teacher length teacher_steps auto tries for a `steps`-step student."""
    return max(48, 8 * steps)


@dataclass
class CalibrationRun:
    model: object                   # ModelPatcher
    plan: Plan
    positive: list
    negative: list
    latent: torch.Tensor            # one sample's latent [1, C, H, W]; for a partial pass (denoise below 1) the
                                    # calibration batch's starting pictures [B, C, H, W] (`starting_pictures`)
    teacher_seconds: float = 0.0
    teacher_evaluations: float = 0  # model calls of every teacher run, in calls on the whole calibration batch
    memo: dict = field(default_factory=dict, repr=False)    # what methods compute once per run and share
    rows: tuple | None = None       # a part of the calibration batch (a validation fold), or None: all of it
    scheduler: str | None = None    # the scheduler a method samples on here, for scheduler auto (`with_scheduler`)
    builtin_screen: object = None   # the built-ins on the calibration batch (`validation.screen_builtins`), if made
    starts: dict | None = None      # a partial pass: where its pictures came from (`starting_pictures`)
    calls: list = field(default_factory=lambda: [0.0])     # model calls of every run made here and in its subsets
                                    # (`subset`, `with_scheduler`), in calls on the whole calibration batch
    first_calls: "FirstCalls" = field(default_factory=lambda: FirstCalls(), repr=False)  # shared with its subsets
    _trajectory: Trajectory | None = field(default=None, repr=False)

    @property
    def batch(self) -> int:
        return self.request.calibration_batch if self.rows is None else len(self.rows)

    def subset(self, rows, states=True):
        """This run restricted to some of its calibration noises (their conditioning and teacher run too), for
        fitting on some and judging on the others; without `states`, of the teacher run only its final x (what
        judging needs; the states are copies)."""
        full = self.trajectory
        rows = list(rows)
        part = Trajectory(full.sigmas, full.store_dtype, [x[rows] for x in full.states] if states else [],
                          [d[rows] for d in full.denoised] if states else [], full.final[rows])
        return CalibrationRun(model=self.model, plan=self.plan, positive=_rows_of(self.positive, rows, self.batch),
                              negative=_rows_of(self.negative, rows, self.batch), latent=self.latent,
                              rows=tuple(rows), scheduler=self.scheduler, calls=self.calls,
                              first_calls=self.first_calls,
                              builtin_screen=self.builtin_screen, _trajectory=part)

    def with_scheduler(self, scheduler):
        """This run (its teacher, noises and shared memo) with the student sigmas of `scheduler`."""
        return dataclasses.replace(self, scheduler=scheduler)

    @property
    def request(self):
        return self.plan.request

    @property
    def schedule(self):
        return self.plan.schedule

    @property
    def scheduler_name(self) -> str:
        """The scheduler of the student sigmas: this run's (`with_scheduler`), else the request's (for scheduler
        auto before a choice, the provisional one)."""
        return self.scheduler or self.request.provisional_scheduler

    @property
    def sigmas(self) -> torch.Tensor:
        """The student sigmas (given, or the scheduler's for KSampler's steps), float64."""
        if self.request.sigmas is not None or self.scheduler is None:
            return self.plan.sigmas
        return ksampler_sigmas(self.model.get_model_object("model_sampling"), self.scheduler,
                               self.request.steps, denoise=self.request.denoise).double()

    def sample(self, function, sigmas, **options):
        """Final x of `function` run as a KSAMPLER inside ComfyUI's sampling call, on the calibration
        noises (the same noises for every method and the teacher), in the model's own space: the x that
        `function` returns, where the teacher's states are recorded too, not the LATENT that ComfyUI
        makes of it (`process_latent_out`). `sigmas` are copied: some ComfyUI samplers write into them. A partial
        pass starts from its pictures re-noised by ComfyUI to the first sigma, as KSampler's do."""
        return self._sample(self.latent, self.request.seed, function, sigmas, **options)

    def sample_side_by_side(self, samplers, sigmas) -> list:
        """[final x of each (function, options) of `samplers`] on this run's noises and `sigmas`, as `sample` gives
        them, made in one sampling call with their model calls batched round by round, in calls no larger than the
        calibration batch (`lockstep`; no previews)."""
        finals = []

        def together(model, x, sigmas, extra_args=None, callback=None, disable=None):
            finals.extend(run_side_by_side(model, samplers, x, sigmas, extra_args, self.request.calibration_batch,
                                           check=comfy.model_management.throw_exception_if_processing_interrupted))
            return finals[0]

        self.sample(together, sigmas)
        return finals

    def _sample(self, latent, seed, function, sigmas, **options):
        batch = self.request.calibration_batch
        latent = latent if len(latent) == batch else latent[:1].repeat(batch, *[1] * (latent.ndim - 1))
        noise = comfy.sample.prepare_noise(latent, seed)
        if self.rows is not None:
            latent, noise = latent[list(self.rows)], noise[list(self.rows)]
        final = []
        rows = list(self.rows) if self.rows is not None else list(range(batch))

        def recorded(model, x, sigmas, *args, **kwargs):
            first = self.first_calls.at(rows, float(sigmas[0].float()))     # (the sigma a model call is given)
            final.append(function(_Counted(model, self.calls, batch, first), x, sigmas, *args, **kwargs))
            return final[-1]

        sampler = comfy.samplers.KSAMPLER(recorded, extra_options=options)
        callback = latent_preview.prepare_callback(self.model, len(sigmas) - 1)
        comfy.sample.sample_custom(self.model, noise, self.request.cfg, sampler, sigmas.clone(), self.positive,
                                   self.negative, latent, callback=callback, seed=seed,
                                   disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED)
        return final[-1]

    def sample_fit(self, method, tensors):
        """Final x (on the host) of a method's fitted tensors sampled on this run's noises."""
        function, options = method.sampler(tensors, self.plan.settings, self.schedule)
        return self.sample(function, tensors["sigmas"].float(), **options).cpu()

    @property
    def has_teacher(self) -> bool:
        return self._trajectory is not None

    @property
    def trajectory(self) -> Trajectory:
        """The teacher run (uniform in lambda, or through the given student sigmas), made once: teacher_steps long,
        or for teacher_steps auto (0) first `auto_start` long (`settle_teacher` may make it longer)."""
        if self._trajectory is None:
            self.take_teacher(self.request.teacher_steps or auto_start(self.request.steps))
        return self._trajectory

    def take_teacher(self, steps):
        """Run the teacher for `steps` steps on the calibration noises and keep its trajectory."""
        given = self.sigmas if self.request.sigmas is not None else None
        grid = teacher_sigmas(self.schedule, steps, through=given, top=self.plan.start)
        trajectory = Trajectory.for_budget(grid, self.request.calibration_batch * self.latent[0].numel())
        start = time.perf_counter()
        self.sample(sample_teacher, grid, schedule=self.schedule, trajectory=trajectory)
        self.teacher_seconds += time.perf_counter() - start
        self.teacher_evaluations += len(grid) - 1
        for i, d in enumerate(trajectory.denoised):
            if not torch.isfinite(d).all():
                raise ValueError(f"the model returned NaN or inf during calibration (teacher step {i}, sigma "
                                 f"{float(grid[i]):.4g}): nothing was stored; check the model and its patches")
        self._trajectory = trajectory

    def settle_teacher(self, target, check_memory=None) -> dict:
        """For teacher_steps auto: estimate the teacher's own error (`error_estimate`, from a run of 2/3 of its
        steps on half the calibration noises (`folds`' first; all of a batch of one), or from the shorter teacher
        it replaces, on all of them) and lengthen it until the estimate is at most `target` (by 1.5x to 2x a time,
        up to AUTO_MAX_STEPS; `check_memory(steps)` is called before a longer run). It stops early where a longer
        run no longer lowers the estimate by 1.5x on the same noises ("floor": the model's outputs are not smooth
        enough in sigma for more steps to help; a trained network's rounding, say). Returns {"steps", "estimate",
        "target", "floor", "evaluations"} (the model calls of every teacher run, in calls on the whole batch)."""
        steps = len(self.trajectory.sigmas) - 1
        shorter = math.ceil(2 * steps / 3)       # (half the steps can be too few for a stable third-order run)
        rows = (folds(self.batch) or [list(range(self.batch))])[0]
        part = self.subset(rows, states=False)
        coarse = part.sample(sample_teacher, teacher_sigmas(self.schedule, shorter, top=self.plan.start),
                             schedule=self.schedule).cpu()
        self.teacher_evaluations += shorter * len(rows) / self.batch
        estimate = error_estimate(part.trajectory.final, coarse, steps, shorter)
        floor = False
        while estimate > target and steps < AUTO_MAX_STEPS and not floor:
            wanted = math.ceil(1.2 * steps_for(target, estimate, steps))      # between 1.5x and 2x this run
            longer = min(AUTO_MAX_STEPS, max(steps * 3 // 2, min(2 * steps, wanted)))
            if check_memory is not None:
                check_memory(longer)
            previous = self.trajectory.final
            self._trajectory = None         # (the shorter run's states are let go before the longer run)
            self.take_teacher(longer)
            final = self.trajectory.final
            # (the floor is judged on the noises the last estimate was made on: errors differ from noise to noise)
            floor = error_estimate(final[rows], previous[rows], longer, steps) > estimate / 1.5
            estimate, steps, rows = error_estimate(final, previous, longer, steps), longer, list(range(self.batch))
        return {"steps": steps, "estimate": estimate, "target": target, "floor": floor,
                "evaluations": self.teacher_evaluations}

    def plain_error(self, sampler, sigmas, measure) -> float:
        """The RMSE against the teacher, on the whole calibration batch, of the plain solver `sampler` on `sigmas`,
        made once per run: a method's plain solver is its built-in's arithmetic (IIA-DDIM's and OLSS's DDIM is
        ComfyUI's ddim, which is its euler), so the methods on the same sigmas share one run, and none is made where
        the built-in screen ran that sampler on these sigmas over the whole batch. `measure()` makes the run."""
        sampler = "euler" if sampler == "ddim" else sampler
        sigmas = tuple(torch.as_tensor(sigmas).float().tolist())
        key = ("plain", sampler, sigmas)
        if key not in self.memo:
            screened = self.builtin_screen.candidates if self.builtin_screen is not None else {}
            found = [entry["rmse"] for entry in screened.values()
                     if entry["sampler"] == sampler and tuple(torch.tensor(entry["sigmas"]).float().tolist()) == sigmas]
            self.memo[key] = found[0] if found else measure()
        return self.memo[key]

    def starting_pictures(self, latent) -> dict:
        """For a partial pass (denoise below 1): the pictures its calibration noises start from, kept as this run's
        `latent`: the node's `latent` samples in turn where it holds a picture (img2img, a hires fix's upscaled
        first pass), else the teacher's own pictures (`auto_start` steps from sigma_max, on the noises of seed + 1:
        not those they are re-noised with). Returns where they came from and the batched model calls made."""
        source = self.plan.settings["denoise"]["starts"]
        if source == "latent_image":
            self.latent = latent[torch.arange(self.request.calibration_batch) % len(latent)]
            return {"from": source, "evaluations": 0}
        steps = auto_start(self.request.steps)
        x = self._sample(torch.zeros_like(latent[:1]), self.request.seed + 1, sample_teacher,
                         teacher_sigmas(self.schedule, steps), schedule=self.schedule)
        self.teacher_evaluations += steps
        self.latent = self.model.model.process_latent_out(x.float()).cpu()
        return {"from": source, "steps": steps, "evaluations": steps}

    def teacher_states(self, sigmas) -> list:
        """The teacher's state at each of `sigmas` (a fit's targets)."""
        return [self.trajectory.state_at(self.schedule, float(s)) for s in sigmas]

    def nearest_teacher_steps(self, sigmas) -> list:
        """The index of the teacher sigma nearest to each of `sigmas`."""
        grid = self.trajectory.sigmas.double()
        return [int(torch.argmin((grid - float(s)).abs())) for s in sigmas]


class FirstCalls:
    """Every run's first model call, made once per calibration. The runs start from the same calibration noises at
    the same first sigma (sigma_max, or a partial pass's start), so whatever the sampler, a noise's first call is the
    same call: its output is kept per noise (row of the calibration batch) and model patches (the callables in the
    call's model options) and given to every later run that starts there. Same start: sigma and x equal to float32
    rounding (RTOL; a scheduler's first sigma can differ from sigma_max in its last bit). Model patches are taken to
    act on each call's x and sigma alone; a patch whose effect changes from run to run (`varies`: TimeTuner's time
    hook, tuned between runs) is never shared."""

    RTOL = 1e-6

    def __init__(self):
        self.kept = {}          # {(row, ids of the patches): [(sigma, x, output, the patches themselves)]}

    def at(self, rows, sigma):
        """The first calls of a run on `rows` of the batch starting at `sigma`: `take` and `keep` for its model."""
        return _FirstCall(self, rows, sigma)

    def find(self, key, sigma, x):
        """The output kept for this noise and patches at (sigma, x), or None."""
        for s, kept_x, output, _ in self.kept.get(key, []):
            scale = float(kept_x.abs().max())
            if abs(s - sigma) <= self.RTOL * s and float((kept_x - x).abs().max()) <= self.RTOL * scale:
                return output
        return None


@dataclass
class _FirstCall:
    first_calls: FirstCalls
    rows: list
    sigma: float

    def key(self, x, sigma, options):
        """(the kept entries' keys for this call's rows, its patches), or None where it is not shared: not its run's
        first (another sigma), or carrying a patch that `varies`. (Runs side by side (`lockstep`) ask for their rows
        one run after another in one call.)"""
        sigma = torch.as_tensor(sigma).float()
        if len(x) % len(self.rows) or not bool((sigma == self.sigma).all()):
            return None
        patches = _callables(options)
        if any(getattr(p, "varies", False) for p in patches):
            return None
        return [(row, tuple(id(p) for p in patches)) for row in self.rows * (len(x) // len(self.rows))], patches

    def take(self, key, x):
        """The kept output of the call with this `key` (None: not shared) and input x, or None."""
        outputs = [self.first_calls.find(k, self.sigma, xi) for k, xi in zip(key[0], x)] if key else [None]
        if any(output is None for output in outputs):
            return None
        return torch.stack(outputs).to(x.device, x.dtype)

    def keep(self, key, x, output):
        if key:
            for k, xi, out in zip(key[0], x, output):
                if self.first_calls.find(k, self.sigma, xi) is None:
                    self.first_calls.kept.setdefault(k, []).append((self.sigma, xi.clone(), out.clone(), key[1]))


def _callables(value) -> list:
    """The callables (patches, wrappers, CFG functions) in ComfyUI model options, in order."""
    if isinstance(value, dict):
        return [c for v in value.values() for c in _callables(v)]
    if isinstance(value, (list, tuple)):
        return [c for v in value for c in _callables(v)]
    return [value] if callable(value) and not torch.is_tensor(value) else []


class _Counted:
    """The k-diffusion model a sampler function is given: adds the call's rows' part of the calibration batch (of
    `batch` noises) to `calls[0]` at every call it makes; a run's first call is taken from `first` (`FirstCalls`)
    where an earlier run made it. Everything else is the model's."""

    def __init__(self, model, calls, batch, first):
        self._model, self._calls, self._batch, self._first = model, calls, batch, first

    def __getattr__(self, name):
        return getattr(self.__dict__["_model"], name)

    def __call__(self, x, sigma, **kwargs):
        key = self._first.key(x, sigma, kwargs.get("model_options", {}))
        output = self._first.take(key, x)
        if output is None:
            self._calls[0] += len(x) / self._batch
            output = self._model(x, sigma, **kwargs)
            self._first.keep(key, x, output)
        return output


def _rows_of(conditioning, rows, batch):
    """ComfyUI conditioning with every per-sample tensor restricted to `rows` of the calibration batch, after
    repeating it to the batch as ComfyUI does (`repeat_to_batch_size`); tensors of batch 1 stay as they are.
    (A ControlNet's hint inside a `control` object is not restricted.)"""
    def pick(value):
        if torch.is_tensor(value) and value.ndim > 0 and value.shape[0] > 1:
            return comfy.utils.repeat_to_batch_size(value, batch)[rows]
        return value
    return [[pick(tensor), {k: pick(v) for k, v in options.items()}] for tensor, options in conditioning]
