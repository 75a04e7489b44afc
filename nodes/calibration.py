"""Calibrate once, sample in few steps: CalibrateSampler, LoadCalibration, CalibrationSigmas, and the
checked samplers every calibrated node uses.

The teacher and every fit run inside ComfyUI's own sampling call (see `methods.CalibrationRun`), so
conditioning, CFG, model patches, model management, the progress bar, latent previews and Cancel
behave exactly as in normal sampling.
"""
import hashlib
import logging
import os

import torch

import comfy.model_management
import comfy.sample
import comfy.samplers
import folder_paths
from comfy_api.latest import io

from .. import calibration_cache as store
from ..optimizers import iia
from ..optimizers.calibration import Calibration, calibration_key
from ..optimizers.coordinates import NoiseSchedule
from . import CATEGORY
from .methods import (IIA_SUBSTEPS, IIA_TARGETS, METHODS, TIMETUNER_BASES, CalibrationRun, calibration_batch_errors,
                      ksampler_sigmas, needs_teacher)

FOLDER = "calibrations"
CalibrationType = io.Custom("CALIBRATION")
TEACHER_SOLVER = "dpmpp_2m_lambda"
FIXED_SCHEDULE = (*iia.VARIANTS, "timetuner")     # the methods that sample on the scheduler's sigmas


def _register_folder():
    default = os.path.join(folder_paths.models_dir, FOLDER)
    if FOLDER in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(FOLDER, default, is_default=True)
    else:
        folder_paths.folder_names_and_paths[FOLDER] = ([default], {store.SUFFIX})


_register_folder()


def write_folder() -> str:
    return folder_paths.get_folder_paths(FOLDER)[0]


# --- what a calibration is fitted for --------------------------------------------------------------
def _digest_value(digest, value, depth=0):
    if depth > 6:
        return
    if torch.is_tensor(value):
        flat = value.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        sample = flat[::step].to("cpu", torch.float64)
        digest.update(f"{tuple(value.shape)}{value.dtype}".encode())
        digest.update(sample.numpy().tobytes())
    elif isinstance(value, (list, tuple)):
        for v in value:
            _digest_value(digest, v, depth + 1)
    elif isinstance(value, dict):
        for k in sorted(value, key=str):
            digest.update(str(k).encode())
            _digest_value(digest, value[k], depth + 1)
    elif isinstance(value, (int, float, str, bool)) or value is None:
        digest.update(repr(value).encode())
    else:
        digest.update(getattr(value, "__qualname__", type(value).__qualname__).encode())


_WEIGHTS_DIGEST = "_calibrated_samplers_weights_digest"


def _weights_digest(model) -> bytes:
    """A hash of the diffusion model's own weights (a strided sample of every tensor), made once per model.

    ComfyUI applies LoRA and other weight patches in place while a model is loaded, keeping the original
    tensors in the patcher's `backup` (shared by its clones); those originals are hashed, so the hash is
    the same loaded or not, and the patches are hashed on their own (`model_fingerprint`)."""
    base = model.model
    cached = base.__dict__.get(_WEIGHTS_DIGEST)
    if cached is None:
        digest = hashlib.sha256()
        backup = getattr(model, "backup", {})
        for name, t in base.diffusion_model.state_dict().items():
            original = backup.get(f"diffusion_model.{name}")
            digest.update(name.encode())
            _digest_value(digest, t if original is None else original.weight)
        cached = digest.digest()
        base.__dict__[_WEIGHTS_DIGEST] = cached
    return cached


def model_fingerprint(model) -> str:
    """A hash of what changes the model's output: weights (`_weights_digest`), LoRA and other weight patches
    with their strengths, the model_sampling object (shift nodes replace it), and the names of installed
    wrappers and CFG functions."""
    digest = hashlib.sha256()
    base = model.model
    digest.update(f"{type(base).__name__}:{base.model_type.name}".encode())
    digest.update(_weights_digest(model))
    _digest_value(digest, model.patches)
    ms = model.get_model_object("model_sampling")
    digest.update(type(ms).__mro__[1].__name__.encode())
    _digest_value(digest, dict(ms.state_dict()))
    for attr in ("shift", "multiplier", "sigma_data"):
        _digest_value(digest, getattr(ms, attr, None))
    _digest_value(digest, {k: v for k, v in model.model_options.items() if k != "transformer_options"})
    _digest_value(digest, model.model_options.get("transformer_options", {}).get("patches", {}))
    return digest.hexdigest()[:20]


# --- the work ---------------------------------------------------------------------------------------
def _check_sigmas(sigmas, schedule):
    s = sigmas.detach().cpu().double()
    if s.ndim != 1 or len(s) < 2 or not torch.isfinite(s).all():
        raise ValueError("sigmas: need a finite 1-D schedule of at least 2 values")
    if s[-1] != 0 or torch.any(s[1:] >= s[:-1]):
        raise ValueError("sigmas: must decrease strictly and end in 0 (as a scheduler node gives them)")
    if s[0] > schedule.sigma_max * (1 + 1e-4):
        raise ValueError(f"sigmas: starts at {float(s[0]):.4g}, above the model's sigma_max {schedule.sigma_max:.4g}")
    return s


def request(model, latent, cfg, steps, teacher_steps, calibration_batch, method, seed, sigmas=None,
            scheduler="karras", sampler_name="euler", iia_substeps=IIA_SUBSTEPS, iia_target=IIA_TARGETS[0]):
    """(key, fingerprint, settings, CalibrationRun) of a calibration request, validated; `latent` is
    [B, C, H, W]. `settings` (JSON-able) is everything besides the model that the fits depend on."""
    ms = model.get_model_object("model_sampling")
    schedule = NoiseSchedule.from_model_sampling(ms)
    methods = list(METHODS) if method == "all" else [method]
    if any(m not in METHODS for m in methods):
        raise ValueError(f"method {method!r}: expected 'all' or one of {', '.join(METHODS)}")
    if steps < 1:
        raise ValueError("steps must be at least 1")
    fixed = sigmas is not None
    if fixed:
        student = _check_sigmas(sigmas, schedule)
        if len(student) - 1 != steps:
            raise ValueError(f"sigmas: {len(student) - 1} steps given, but steps is {steps}; make them agree")
    else:
        if scheduler not in comfy.samplers.SCHEDULER_NAMES:
            raise ValueError(f"scheduler {scheduler!r}: expected one of {', '.join(comfy.samplers.SCHEDULER_NAMES)}")
        student = ksampler_sigmas(ms, scheduler, steps).double()
        if len(student) - 1 != steps:
            raise ValueError(f"scheduler {scheduler} gives {len(student) - 1} steps for steps {steps}: choose another "
                             "steps or scheduler, or connect sigmas")
        if "timetuner" in methods and float(student[0]) < schedule.sigma_max * (1 - 1e-3):
            raise ValueError(f"scheduler {scheduler} starts at sigma {float(student[0]):.4g}, below the model's "
                             f"{schedule.sigma_max:.4g}: TimeTuner needs a schedule from sigma_max (or connect sigmas)")
    if iia_target not in IIA_TARGETS:
        raise ValueError(f"iia_target {iia_target!r}: expected one of {', '.join(IIA_TARGETS)}")
    if any(needs_teacher(m, iia_target) for m in methods) and steps > teacher_steps // 2:
        raise ValueError(f"steps {steps} is too many for a {teacher_steps}-step teacher: use at most "
                         f"{teacher_steps // 2} steps, or raise teacher_steps to {2 * steps} or more")
    if "timetuner" in methods and sampler_name not in TIMETUNER_BASES:
        raise ValueError(f"sampler_name {sampler_name!r}: TimeTuner needs a deterministic sampler, one of "
                         f"{', '.join(TIMETUNER_BASES)}")
    if iia_substeps < 2:
        raise ValueError(f"iia_substeps {iia_substeps}: the fine target needs at least 2 sub-steps")
    settings = {"steps": int(teacher_steps), "solver": TEACHER_SOLVER, "seed": int(seed),
                "batch": int(calibration_batch), "methods": methods,
                "fixed_sigmas": [round(float(v), 6) for v in student] if fixed else None}
    if not fixed and any(m in FIXED_SCHEDULE or m == "olss" for m in methods):     # OLSS tries the scheduler's too
        settings["scheduler"] = scheduler
    if "timetuner" in methods:
        settings["sampler_name"] = sampler_name
    if any(m in iia.VARIANTS for m in methods):
        settings["iia_target"] = iia_target
        if iia_target == "substeps":
            settings["iia_substeps"] = int(iia_substeps)
    fingerprint = model_fingerprint(model)
    key = calibration_key(schedule.family, fingerprint, steps, cfg, latent.shape[1:], settings)
    run = CalibrationRun(model=model, positive=None, negative=None, latent=latent[:1], seed=int(seed), cfg=float(cfg),
                         batch=int(calibration_batch), schedule=schedule, steps=int(steps), sigmas=student,
                         fixed=fixed, scheduler=scheduler, sampler_name=sampler_name,
                         teacher_steps=int(teacher_steps), iia_substeps=int(iia_substeps),
                         iia_target=iia_target)
    return key, fingerprint, settings, run


def stored(key):
    """The stored calibration with this key in any calibrations folder, or None."""
    for path in folder_paths.get_folder_paths(FOLDER):
        found = store.find(path, key)
        if found is not None:
            return found
    return None


def calibrate(model, positive, negative, latent_image, seed, cfg, steps, teacher_steps, calibration_batch,
              method="all", sigmas=None, refit=False, scheduler="karras", sampler_name="euler",
              iia_substeps=IIA_SUBSTEPS, iia_target=IIA_TARGETS[0]):
    """(Calibration, teacher final latent or None when there was no teacher run or it was reused)."""
    latent = comfy.sample.fix_empty_latent_channels(model, latent_image["samples"])
    key, fingerprint, settings, run = request(model, latent, cfg, steps, teacher_steps, calibration_batch, method,
                                              seed, sigmas, scheduler, sampler_name, iia_substeps,
                                              iia_target)
    if not refit:
        found = stored(key)
        if found is not None:
            logging.info("Calibrated Samplers: reusing stored calibration %s", key)
            return found, None
    run.positive, run.negative = positive, negative
    fits, diagnostics = {}, {}
    for name in settings["methods"]:
        comfy.model_management.throw_exception_if_processing_interrupted()
        fits[name], diagnostics[name] = METHODS[name].fit(run, name)
    if run.has_teacher:
        diagnostics["teacher_seconds"] = round(run.teacher_seconds, 3)
        diagnostics["calibration_batch_rmse"] = calibration_batch_errors(run, fits, settings)
    calibration = Calibration(family=run.schedule.family, fingerprint=fingerprint, sigmas=run.sigmas.float(),
                              cfg=float(cfg), latent_shape=tuple(latent.shape[1:]), teacher=settings, fits=fits,
                              diagnostics=diagnostics)
    store.save(calibration, write_folder(), f"{run.schedule.family}-{steps}steps-cfg{cfg:g}-{key}")
    return calibration, run.trajectory.final if run.has_teacher else None


def method_sigmas(calibration, method):
    """The sigmas a calibration's method samples on."""
    if method not in calibration.fits:
        raise ValueError(f"this calibration holds {', '.join(calibration.methods)}, not {method}: "
                         f"calibrate with method '{method}' or 'all'")
    return calibration.fits[method]["sigmas"].float().clone()     # a copy: some samplers write into sigmas


def checked_sampler(calibration, method, base=None):
    """A KSAMPLER for the calibration's method that refuses a model, cfg, latent or sigmas it was not fitted
    for. `base`: for TimeTuner, a KSAMPLER to wrap instead of the one it was tuned with."""
    fitted = method_sigmas(calibration, method)
    tensors = calibration.fits[method]
    settings = {**calibration.teacher, "base": base}

    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None):
        inner = model.inner_model
        patcher = inner.model_patcher
        schedule = NoiseSchedule.from_model_sampling(patcher.get_model_object("model_sampling"))
        calibration.check_compatible(family=schedule.family, fingerprint=model_fingerprint(patcher),
                                     latent_shape=tuple(x.shape[1:]), cfg=float(inner.cfg))
        given = sigmas.detach().cpu().float()       # (the last, 0, is not compared: uni_pc rewrites it in place)
        if len(given) != len(fitted) or not torch.allclose(given[:-1], fitted[:-1], rtol=1e-4, atol=1e-6):
            raise ValueError(f"this {method} calibration was fitted for the {len(fitted) - 1}-step sigmas "
                             f"{[round(float(s), 4) for s in fitted]}: connect Calibration Sigmas "
                             f"(method {method}) as the sigmas")
        function, options = METHODS[method].sampler(tensors, settings, schedule)
        return function(model, x, sigmas, extra_args, callback, disable, **options)

    return comfy.samplers.KSAMPLER(sample)


# --- nodes ---------------------------------------------------------------------------------------
def method_tooltip(prefix=""):
    return prefix + " ".join(f"{m.name}: {m.summary}." for m in METHODS.values())


class CalibrateSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CalibrateSampler",
            display_name="Calibrate Sampler",
            category=CATEGORY,
            description="Fits few-step samplers to your model once (OLSS and OLSS-P against a long teacher run; "
                        "IIA against finer sub-steps; TimeTuner against the teacher) and stores the result in "
                        "models/calibrations; later runs with the same model and settings reuse it instantly.",
            inputs=[
                io.Model.Input("model", tooltip="The model to calibrate, with its LoRAs and sampling patches."),
                io.Conditioning.Input("positive", tooltip="A typical prompt for what you will generate."),
                io.Conditioning.Input("negative", tooltip="The negative prompt you will use (guidance)."),
                io.Latent.Input("latent_image", tooltip="Sets the latent size the calibration is for."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                             tooltip="Seed of the calibration noises."),
                io.Float.Input("cfg", default=7.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Guidance scale to calibrate for: sample with the same cfg."),
                io.Int.Input("steps", default=5, min=1, max=100,
                             tooltip="Student steps, as KSampler's steps (Heun methods evaluate the model twice "
                                     "per step but the last)."),
                io.Int.Input("teacher_steps", default=500, min=20, max=4000,
                             tooltip="Steps of the accurate teacher run (second order) that OLSS and TimeTuner fit "
                                     "to. More is more accurate and slower; 200-1000 is typical."),
                io.Int.Input("calibration_batch", default=8, min=1, max=256,
                             tooltip="Noise samples the fit sees. More generalizes better; memory grows with it."),
                io.Combo.Input("method", options=["all", *METHODS], default="all",
                               tooltip=method_tooltip("Which methods to fit; 'all' fits every one. ")),
                io.Combo.Input("scheduler", options=list(comfy.samplers.SCHEDULER_NAMES), default="karras",
                               tooltip="Student sigmas for IIA and TimeTuner; OLSS tries them beside its searched "
                                       "teacher steps and keeps whichever fits better."),
                io.Combo.Input("sampler_name", options=TIMETUNER_BASES, default="euler",
                               tooltip="The sampler TimeTuner tunes the time input of."),
                io.Sigmas.Input("sigmas", optional=True,
                                tooltip="Optional fixed student schedule, instead of the scheduler (OLSS then fits "
                                        "coefficients for these sigmas instead of searching)."),
                io.Boolean.Input("refit", default=False, optional=True,
                                 tooltip="Calibrate again even if a matching stored calibration exists."),
                io.Int.Input("iia_substeps", default=IIA_SUBSTEPS, min=2, max=50, optional=True,
                             tooltip="M, for iia_target 'substeps': finer sub-steps per step that IIA fits to "
                                     "(the paper: 3; 10 fits more closely at a higher one-off cost)."),
                io.Combo.Input("iia_target", options=IIA_TARGETS, default=IIA_TARGETS[0], optional=True,
                               tooltip="What each IIA step is fitted to: 'teacher', the teacher run's state at "
                                       "the step's next sigma (shares the teacher with the other methods; much "
                                       "lower error); 'substeps', M finer sub-steps of the same solver (the "
                                       "paper's target, no teacher run)."),
            ],
            outputs=[CalibrationType.Output(display_name="calibration"),
                     io.Latent.Output(display_name="teacher_latent",
                                      tooltip="The teacher's pictures (the empty latent when no teacher ran)."),
                     io.Sigmas.Output(display_name="sigmas",
                                      tooltip="The sigmas of the (first) fitted method: connect with its sampler.")],
        )

    @classmethod
    def execute(cls, model, positive, negative, latent_image, seed, cfg, steps, teacher_steps, calibration_batch,
                method, scheduler="karras", sampler_name="euler", sigmas=None, refit=False,
                iia_substeps=IIA_SUBSTEPS, iia_target=IIA_TARGETS[0]) -> io.NodeOutput:
        calibration, final = calibrate(model, positive, negative, latent_image, seed, cfg, steps, teacher_steps,
                                       calibration_batch, method, sigmas, refit, scheduler, sampler_name,
                                       iia_substeps, iia_target)
        if final is None:       # reused, or no teacher: give the empty latent back
            latent = {"samples": latent_image["samples"]}
        else:                   # the teacher's final x is in the model's own space
            latent = {"samples": model.model.process_latent_out(final.to(torch.float32))}
        first = next(m for m in METHODS if m in calibration.fits)
        return io.NodeOutput(calibration, latent, method_sigmas(calibration, first))


class LoadCalibration(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LoadCalibration",
            display_name="Load Calibration",
            category=CATEGORY,
            description="A calibration stored by Calibrate Sampler (models/calibrations).",
            inputs=[io.Combo.Input("calibration_name", options=folder_paths.get_filename_list(FOLDER),
                                   tooltip="File in models/calibrations.")],
            outputs=[CalibrationType.Output(display_name="calibration")],
        )

    @classmethod
    def execute(cls, calibration_name) -> io.NodeOutput:
        path = folder_paths.get_full_path(FOLDER, calibration_name)
        if path is None:
            raise ValueError(f"calibration {calibration_name!r} not found in models/{FOLDER}")
        return io.NodeOutput(store.load(path))


class CalibrationSigmas(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CalibrationSigmas",
            display_name="Calibration Sigmas",
            category=f"{CATEGORY}/schedulers",
            description="The student sigmas a calibration's method was fitted for (for OLSS: its searched steps). "
                        "A calibrated sampler refuses other sigmas.",
            inputs=[CalibrationType.Input("calibration", tooltip="From Calibrate Sampler or Load Calibration."),
                    io.Combo.Input("method", options=list(METHODS), default="olss",
                                   tooltip=method_tooltip())],
            outputs=[io.Sigmas.Output()],
        )

    @classmethod
    def execute(cls, calibration, method) -> io.NodeOutput:
        return io.NodeOutput(method_sigmas(calibration, method))
