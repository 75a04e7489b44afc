"""Calibrate once, sample in few steps: CalibrateSampler, LoadCalibration, OLSSSampler, CalibrationSigmas.

The teacher runs inside ComfyUI's own sampling call (comfy.sample.sample_custom with our teacher as a
KSAMPLER), so conditioning, CFG, model patches, model management, the progress bar, latent previews
and Cancel behave exactly as in normal sampling.
"""
import hashlib
import logging
import os
import time

import torch

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import folder_paths
import latent_preview
from comfy_api.latest import io

from .. import calibration_cache as store
from ..optimizers import olss
from ..optimizers.calibration import Calibration, calibration_key
from ..optimizers.coordinates import NoiseSchedule
from ..optimizers.teacher import Trajectory, sample_teacher, teacher_sigmas
from . import CATEGORY

FOLDER = "calibrations"
METHODS = ("olss", "olss_p")
CalibrationType = io.Custom("CALIBRATION")
TEACHER_SOLVER = "dpmpp_2m_lambda"


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


def model_fingerprint(model) -> str:
    """A hash of what changes the model's output: weights (a strided sample of every tensor), LoRA and
    other weight patches with their strengths, the model_sampling object (shift nodes replace it),
    and the names of installed wrappers and CFG functions."""
    digest = hashlib.sha256()
    base = model.model
    digest.update(f"{type(base).__name__}:{base.model_type.name}".encode())
    for name, t in base.diffusion_model.state_dict().items():
        digest.update(name.encode())
        _digest_value(digest, t)
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


def request(model, latent, cfg, steps, teacher_steps, calibration_batch, method, seed, sigmas=None):
    """(key, fingerprint, schedule, teacher settings, fixed sigmas) of a calibration request, validated."""
    ms = model.get_model_object("model_sampling")
    schedule = NoiseSchedule.from_model_sampling(ms)
    methods = list(METHODS) if method == "all" else [method]
    if any(m not in METHODS for m in methods):
        raise ValueError(f"method {method!r}: expected 'all' or one of {', '.join(METHODS)}")
    fixed = None
    if sigmas is not None:
        fixed = _check_sigmas(sigmas, schedule)
        if len(fixed) - 1 != steps:
            raise ValueError(f"sigmas: {len(fixed) - 1} steps given, but steps is {steps}; make them agree")
    if steps < 1:
        raise ValueError("steps must be at least 1")
    if steps > teacher_steps // 2:
        raise ValueError(f"steps {steps} is too many for a {teacher_steps}-step teacher: use at most "
                         f"{teacher_steps // 2} steps, or raise teacher_steps to {2 * steps} or more")
    teacher = {"steps": int(teacher_steps), "solver": TEACHER_SOLVER, "seed": int(seed),
               "batch": int(calibration_batch), "methods": methods,
               "fixed_sigmas": None if fixed is None else [round(float(v), 6) for v in fixed]}
    fingerprint = model_fingerprint(model)
    key = calibration_key(schedule.family, fingerprint, steps, cfg, latent.shape[1:], teacher)
    return key, fingerprint, schedule, teacher, fixed


def run_teacher(model, positive, negative, latent, seed, cfg, schedule, sigmas, calibration_batch):
    """The teacher from `calibration_batch` noises drawn from `seed`, inside ComfyUI's sampling call."""
    latent = latent[:1].repeat(calibration_batch, *[1] * (latent.ndim - 1))
    noise = comfy.sample.prepare_noise(latent, seed)
    trajectory = Trajectory.for_budget(sigmas, latent.numel())
    sampler = comfy.samplers.KSAMPLER(sample_teacher, extra_options={"schedule": schedule, "trajectory": trajectory})
    callback = latent_preview.prepare_callback(model, len(sigmas) - 1)
    comfy.sample.sample_custom(model, noise, cfg, sampler, sigmas, positive, negative, latent, callback=callback,
                               disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
    for i, d in enumerate(trajectory.denoised):
        if not torch.isfinite(d).all():
            raise ValueError(f"the model returned NaN or inf during calibration (teacher step {i}, sigma "
                             f"{float(sigmas[i]):.4g}): nothing was stored; check the model and its patches")
    return trajectory


def fit(trajectory, schedule, steps, methods, fixed):
    """{method: fit tensors}, {method: diagnostics} from one teacher run."""
    fits, diagnostics = {}, {}
    start = time.perf_counter()
    gram = olss.trajectory_gram(trajectory, schedule)
    gram_seconds = time.perf_counter() - start
    for method in methods:
        comfy.model_management.throw_exception_if_processing_interrupted()
        start = time.perf_counter()
        if fixed is not None:
            path = [int(torch.argmin((trajectory.sigmas.double() - s).abs())) for s in fixed[:-1]]
        elif method == "olss":
            path = olss.search_path(gram, steps)
        else:
            path = olss.uniform_path(gram.teacher_steps, steps)
        coefficients = olss.fit_olss(gram, path)
        fits[method] = olss_tensors(coefficients)
        diagnostics[method] = {"step_error": [float(e) for e in coefficients.errors],
                               "fit_seconds": time.perf_counter() - start + gram_seconds}
    return fits, diagnostics


def olss_tensors(c):
    return {"path": torch.tensor(c.path, dtype=torch.int64), "sigmas": c.sigmas.float(),
            "weights_x": c.weights_x.double(), "weights_d": c.weights_d.double(), "errors": c.errors.double()}


def olss_coefficients(calibration, method):
    if method not in calibration.fits:
        raise ValueError(f"this calibration holds {', '.join(calibration.methods)}, not {method}: "
                         f"calibrate with method '{method}' or 'all'")
    t = calibration.fits[method]
    return olss.OLSSCoefficients(tuple(int(i) for i in t["path"]), t["sigmas"], t["weights_x"], t["weights_d"],
                                 t["errors"])


def calibrate(model, positive, negative, latent_image, seed, cfg, steps, teacher_steps, calibration_batch,
              method="all", sigmas=None, refit=False):
    """(Calibration, teacher final latent or None when reused from the cache)."""
    latent = comfy.sample.fix_empty_latent_channels(model, latent_image["samples"])
    key, fingerprint, schedule, teacher, fixed = request(model, latent, cfg, steps, teacher_steps, calibration_batch,
                                            method, seed, sigmas)
    folder = write_folder()
    if not refit:
        for path in folder_paths.get_folder_paths(FOLDER):
            found = store.find(path, key)
            if found is not None:
                logging.info("Calibrated Samplers: reusing stored calibration %s", key)
                return found, None
    grid = teacher_sigmas(schedule, teacher_steps, through=fixed)
    start = time.perf_counter()
    trajectory = run_teacher(model, positive, negative, latent, seed, cfg, schedule, grid, calibration_batch)
    teacher["seconds"] = round(time.perf_counter() - start, 3)
    fits, diagnostics = fit(trajectory, schedule, steps, teacher["methods"], fixed)
    student = fixed if fixed is not None else fits["olss" if "olss" in fits else teacher["methods"][0]]["sigmas"]
    calibration = Calibration(family=schedule.family, fingerprint=fingerprint,
                              sigmas=student.float(), cfg=float(cfg), latent_shape=tuple(latent.shape[1:]),
                              teacher={k: v for k, v in teacher.items() if k != "seconds"}, fits=fits,
                              diagnostics={**diagnostics, "teacher_seconds": teacher["seconds"]})
    store.save(calibration, folder, f"{schedule.family}-{steps}steps-cfg{cfg:g}-{key}")
    return calibration, trajectory.final


# --- nodes ------------------------------------------------------------------------------------------
class CalibrateSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CalibrateSampler",
            display_name="Calibrate Sampler",
            category=CATEGORY,
            description="Runs a long teacher sampling on your model once, fits few-step samplers to it "
                        "(OLSS, OLSS-P) and stores the result in models/calibrations; later runs with the "
                        "same model and settings reuse it instantly.",
            inputs=[
                io.Model.Input("model"),
                io.Conditioning.Input("positive", tooltip="A typical prompt for what you will generate."),
                io.Conditioning.Input("negative"),
                io.Latent.Input("latent_image", tooltip="Sets the latent size the calibration is for."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                             tooltip="Seed of the calibration noises."),
                io.Float.Input("cfg", default=7.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Guidance scale to calibrate for: sample with the same cfg."),
                io.Int.Input("steps", default=5, min=1, max=100, tooltip="Student steps (model evaluations)."),
                io.Int.Input("teacher_steps", default=500, min=20, max=4000,
                             tooltip="Steps of the accurate teacher run (second order). More is more accurate "
                                     "and slower; 200-1000 is typical."),
                io.Int.Input("calibration_batch", default=8, min=1, max=256,
                             tooltip="Noise samples the fit sees. More generalizes better; memory grows with it."),
                io.Combo.Input("method", options=["all", *METHODS], default="all",
                               tooltip="olss: coefficients and a searched subset of teacher steps; olss_p: "
                                       "uniformly spaced teacher steps."),
                io.Sigmas.Input("sigmas", optional=True,
                                tooltip="Optional fixed student schedule: OLSS then fits coefficients for these "
                                        "sigmas instead of searching."),
                io.Boolean.Input("refit", default=False, optional=True,
                                 tooltip="Calibrate again even if a matching stored calibration exists."),
            ],
            outputs=[CalibrationType.Output(display_name="calibration"),
                     io.Latent.Output(display_name="teacher_latent"),
                     io.Sigmas.Output(display_name="sigmas")],
        )

    @classmethod
    def execute(cls, model, positive, negative, latent_image, seed, cfg, steps, teacher_steps, calibration_batch,
                method, sigmas=None, refit=False) -> io.NodeOutput:
        calibration, final = calibrate(model, positive, negative, latent_image, seed, cfg, steps, teacher_steps,
                                       calibration_batch, method, sigmas, refit)
        if final is None:       # reused: the teacher picture is not stored, give the empty latent back
            final = latent_image["samples"]
        latent = {"samples": model.model.process_latent_out(final.to(torch.float32))}
        return io.NodeOutput(calibration, latent, calibration.sigmas.float())


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


def checked_sampler(calibration, method):
    """A KSAMPLER for the calibration's method that refuses a model, cfg or latent it was not fitted for."""
    coefficients = olss_coefficients(calibration, method)

    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None):
        inner = model.inner_model
        patcher = inner.model_patcher
        calibration.check_compatible(
            family=NoiseSchedule.from_model_sampling(patcher.get_model_object("model_sampling")).family,
            fingerprint=model_fingerprint(patcher), latent_shape=tuple(x.shape[1:]), cfg=float(inner.cfg))
        return olss.sample_olss(model, x, sigmas, extra_args, callback, disable, coefficients=coefficients)

    return comfy.samplers.KSAMPLER(sample)


class OLSSSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="OLSSSampler",
            display_name="OLSS Sampler",
            category=f"{CATEGORY}/samplers",
            description="Optimal Linear Subspace Search (Duan et al., CIKM 2023): each step is the fitted linear "
                        "combination of the start noise and all earlier model outputs. Use with the "
                        "calibration's sigmas (Calibration Sigmas) in SamplerCustom.",
            inputs=[CalibrationType.Input("calibration"),
                    io.Combo.Input("variant", options=list(METHODS), default="olss",
                                   tooltip="olss: searched steps; olss_p: uniform teacher steps.")],
            outputs=[io.Sampler.Output()],
        )

    @classmethod
    def execute(cls, calibration, variant) -> io.NodeOutput:
        return io.NodeOutput(checked_sampler(calibration, variant))


class CalibrationSigmas(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CalibrationSigmas",
            display_name="Calibration Sigmas",
            category=f"{CATEGORY}/schedulers",
            description="The student sigmas a calibration was fitted for (for OLSS: its searched steps).",
            inputs=[CalibrationType.Input("calibration"),
                    io.Combo.Input("method", options=list(METHODS), default="olss")],
            outputs=[io.Sigmas.Output()],
        )

    @classmethod
    def execute(cls, calibration, method) -> io.NodeOutput:
        return io.NodeOutput(olss_coefficients(calibration, method).sigmas.float())
