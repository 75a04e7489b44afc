"""Calibrate once, sample with checks: `calibrate` gives the stored calibration for a request or fits a new
one (every method from one CalibrationRun, the teacher shared), and `checked_sampler` makes a calibrated
method into a KSAMPLER that refuses a model, guidance, latent or sigmas it was not fitted for."""
import logging
import math


import torch

import comfy.model_management
import comfy.samplers

from ..optimizers.calibration import Calibration, CalibrationMismatch, check_same_sigmas
from ..optimizers.coordinates import NoiseSchedule
from ..optimizers.teacher import rmse
from . import memory, nearby, store
from .fingerprint import model_fingerprint
from .methods import METHODS
from .request import AUTO_SCHEDULER, AUTO_TEACHER, Request, denoise_of, plan
from .run import CalibrationRun
from .validation import choose, screen_builtins, validate

TEACHER_MARGIN = 20            # teacher_steps auto: the teacher's error at most the best built-in's / 20
SCHEDULER_TRIES = 2            # scheduler auto: the schedules a method that keeps one is fitted on


def calibrate(model, positive, negative, latent, request: Request, refit=False, borrow=None):
    """(Calibration, the teacher's final x in the model's space, or None when there was no teacher run or a
    stored calibration was reused). `latent`: [B, C, H, W], its first sample sets the shape. `borrow`: the method
    (or "auto") to be sampled with, where a stored calibration made for a nearby cfg or latent size may be used if
    its measured range for it covers these (`store.find_nearby`); None: only one made for exactly these."""
    starts = "noise" if not request.partial else "latent_image" if bool(latent.abs().amax() > 0) else "teacher"
    p = plan(model, tuple(latent.shape[1:]), request, starts)
    if not refit:
        found = store.find(p.key)
        if found is not None:
            logging.info("Calibrated Samplers: reusing stored calibration %s", p.key)
            return found, None
        found = None if borrow is None else store.find_nearby(p, request.cfg, tuple(latent.shape[1:]), borrow)
        if found is not None:
            log_borrowed(*found)
            return found[0], None
    label = f"{p.schedule.family}-{request.steps}steps-cfg{request.cfg:g}" + \
        (f"-denoise{request.denoise:g}" if p.partial else "")
    store.check_writable(label, p.key, store.size_bound(request.steps, p.methods))
    memory.check(model, request, tuple(latent.shape[1:]))
    run = CalibrationRun(model=model, plan=p, positive=positive, negative=negative, latent=latent[:1])
    if p.partial and request.needs_teacher:
        run.starts = run.starting_pictures(latent)
    calibration = fit(run, tuple(latent.shape[1:]),
                      lambda steps: memory.check(model, request, tuple(latent.shape[1:]), teacher_steps=steps))
    d = calibration.diagnostics
    parts = {"teacher": (d.get("teacher") or {}).get("evaluations", 0), "built-ins": d.get("builtins_evaluations", 0),
             **{m: d[m]["calls"] for m in calibration.fits}}
    logging.info("Calibrated Samplers: the calibration made %.0f model calls on its batch of %d (%s)", d["calls"],
                 request.calibration_batch, ", ".join(f"{k} {v:.0f}" for k, v in parts.items()))
    try:
        store.save(calibration, label)
    except OSError as e:            # checked before the run, yet failed: the fitted calibration is still used
        calibration.diagnostics["not_stored"] = f"{type(e).__name__}: {e}"
        logging.warning("Calibrated Samplers: the calibration was fitted and is used by this workflow, but it was "
                        "NOT stored in %s (%s): the next run will calibrate again", store.write_folder(), e)
    return calibration, run.trajectory.final if run.has_teacher else None


def fit(run, latent_shape, check_memory=None) -> Calibration:
    """Every requested method fitted on the run, validated on the noises it was not fitted on (falling back to its
    plain solver where that validates better), beside the built-in samplers on the calibration batch
    (`diagnostics["validated"]`: what `validation.choose` picks from).

    With teacher_steps auto, the teacher is first made long enough that its estimated error is at most
    1/TEACHER_MARGIN of the best built-in's (`diagnostics["teacher"]`); `check_memory(teacher_steps)` is called
    before a longer teacher run. With scheduler auto, a method that keeps a schedule is fitted on each of the
    SCHEDULER_TRIES schedulers where its plain sampler screened best, and keeps the one that comes closest to the
    teacher on the calibration batch in its fitting run ("rmse"; TimeTuner's first run is its plain sampler's,
    "plain_rmse", and counts too), `diagnostics[method]["schedulers_tried"]`: IIA's and TimeTuner's few
    coefficients per step barely overfit (their errors on the batch were within 2-10% of their validated ones).
    Only the one kept is validated (`diagnostics[method]["scheduler"]`). The others sample on the scheduler where
    euler screened best.

    Model calls (in calls on the whole calibration batch): `diagnostics["calls"]` all of them, of which the
    teacher's (`diagnostics["teacher"]["evaluations"]`), the built-ins' ("builtins_evaluations") and each method's
    fits and validation over every scheduler tried (`diagnostics[method]["calls"]`); the errors on the calibration
    batch ("calibration_batch") take no run of their own."""
    request, p = run.request, run.plan
    diagnostics, screen = {}, None
    if run.starts is not None:
        diagnostics["starts"] = run.starts
    if request.needs_teacher:
        screen = run.builtin_screen = screen_builtins(run)
        if request.teacher_steps == AUTO_TEACHER:
            best = min(entry["rmse"] for entry in screen.candidates.values())
            diagnostics["teacher"] = run.settle_teacher(best / TEACHER_MARGIN, check_memory)
            for label, x in screen.finals.items():         # measured again against the teacher kept
                screen.candidates[label]["rmse"] = rmse(x, run.trajectory.final)
        else:
            diagnostics["teacher"] = {"steps": request.teacher_steps, "evaluations": run.teacher_evaluations}
        diagnostics["builtins_evaluations"] = screen.evaluations
    auto = screen is not None and request.sigmas is None and request.scheduler == AUTO_SCHEDULER
    if auto:            # (the provisional one, where no scheduler that starts at the start gives these steps)
        best = screen.schedulers_for("euler", 1, p.start)
        run = run.with_scheduler(best[0] if best else request.provisional_scheduler)
    fits, evaluations, validated = {}, {}, {}
    for name in p.methods:
        method = METHODS[name]
        evaluations[name] = method.evaluations(request.steps, p.settings)
        tries = [run]
        if auto and "scheduler" in method.follows:
            tries = [run.with_scheduler(scheduler) for scheduler in screen.schedulers_for(
                method.plain_sampler(p.settings), SCHEDULER_TRIES, p.start)] or tries
        calls, fitted = run.calls[0], []
        for attempt in tries:
            comfy.model_management.throw_exception_if_processing_interrupted()
            fitted.append((attempt, *method.fit(attempt)))
        attempt, tensors, facts = fitted[0]
        if len(fitted) > 1:         # the closest to the teacher on the batch: the fit's own run, or its plain solver's
            for attempt, tensors, facts in fitted:      # (a fit to another target than the teacher is run once)
                if "rmse" not in facts:
                    facts["rmse"] = rmse(attempt.sample_fit(method, tensors), attempt.trajectory.final)
            tried = {attempt.scheduler_name: min(facts["rmse"], facts.get("plain_rmse", math.inf))
                     for attempt, tensors, facts in fitted}
            attempt, tensors, facts = min(fitted, key=lambda f: tried[f[0].scheduler_name])
            facts["schedulers_tried"] = tried
        if attempt.has_teacher:
            tensors, facts["validation"] = validate(name, attempt, tensors, facts)
        fits[name], diagnostics[name] = tensors, facts
        diagnostics[name]["calls"] = run.calls[0] - calls
        check = diagnostics[name].get("validation")
        if check is not None:
            validated[name] = {"rmse": check["kept_rmse"], "evaluations": evaluations[name], "method": name}
    if run.has_teacher:
        diagnostics["teacher_seconds"] = round(run.teacher_seconds, 3)
        diagnostics["calibration_batch"] = calibration_batch_errors(fits, evaluations, screen.candidates, diagnostics)
        diagnostics["validated"] = {**validated, **screen.candidates}
        diagnostics["borrowable"] = nearby.ranges_for([*fits, "auto"])
    diagnostics["calls"] = run.calls[0]
    return Calibration(family=p.schedule.family, fingerprint=p.fingerprint, cfg=float(request.cfg),
                       latent_shape=latent_shape, steps=request.steps, settings=p.settings, fits=fits,
                       evaluations=evaluations, diagnostics=diagnostics)


def log_borrowed(calibration, borrowed):
    if borrowed:
        logging.info("Calibrated Samplers: borrowing the calibration made for cfg %g, latent %s at %s: within the "
                     "range measured for it (benchmarks/transfer.py)", calibration.cfg, calibration.latent_shape,
                     ", ".join(borrowed))


def chosen_sampler(calibration, steps):
    """(KSAMPLER, sigmas, label) of what validated best within KSampler's `steps` model evaluations: a calibrated
    method (checked as every calibrated sampler) or a built-in sampler on the sigmas it was validated on."""
    candidates = calibration.diagnostics.get("validated")
    if not candidates:
        raise ValueError("this calibration holds no validated errors (it had no teacher run): calibrate with method "
                         "'all' for method 'auto'")
    label = choose(candidates, steps)
    entry = candidates[label]
    if "method" in entry:
        return checked_sampler(calibration, entry["method"], borrow="auto"), method_sigmas(calibration,
                                                                                       entry["method"]), label
    return comfy.samplers.sampler_object(entry["sampler"]), torch.tensor(entry["sigmas"], dtype=torch.float32), label


def calibration_batch_errors(fits, evaluations, builtins, diagnostics):
    """{label: {"rmse": against the teacher's final x, "evaluations": per sample}} on the calibration noises, for the
    fitted methods and the built-ins (`validation.screen_builtins`): what calibration bought, in sample, from the
    runs made already (no model call): a fit stored as its plain solver has validation's error of that solver on the
    batch, a fit whose fitting run was its own sample on the batch ("rmse") keeps it, and a fit with neither (an
    OLSS teacher fit kept as it is) is left out (the report shows validated errors)."""
    errors = {}
    for name in fits:
        check = diagnostics[name].get("validation") or {}
        if check.get("kept") == "plain":
            errors[name] = {"rmse": check["plain_rmse"], "evaluations": evaluations[name]}
        elif "rmse" in diagnostics[name]:
            errors[name] = {"rmse": diagnostics[name]["rmse"], "evaluations": evaluations[name]}
    return {**errors, **builtins}


def check_denoise(calibration, denoise):
    """CalibrationMismatch unless the calibration was fitted for this denoise (a partial pass starts elsewhere)."""
    fitted = denoise_of(calibration.settings)
    if abs(fitted - denoise) > 1e-4:
        raise CalibrationMismatch(f"this calibration was fitted for denoise {fitted:g}, not {denoise:g}: set denoise "
                                  f"to {fitted:g}, or calibrate for denoise {denoise:g} (leave the calibration input "
                                  "unconnected and KSampler (Calibrated) makes one)")


def method_sigmas(calibration, method):
    """The sigmas a calibration's method samples on (a copy: some samplers write into their sigmas)."""
    if method not in calibration.fits:
        raise ValueError(f"this calibration holds {', '.join(calibration.methods)}, not {method}: "
                         f"calibrate with method '{method}' or 'all'")
    return calibration.fits[method]["sigmas"].float().clone()


def checked_sampler(calibration, method, borrow=None, **inputs):
    """A KSAMPLER for the calibration's method that refuses a model, cfg, latent or sigmas it was not fitted
    for (a cfg or latent size within the range measured for `borrow`, default the method, is borrowed, and
    logged). `inputs`: those of the method's sampler node (`Method.sampler_inputs`)."""
    fitted = method_sigmas(calibration, method)
    tensors = calibration.fits[method]

    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None):
        inner = model.inner_model
        patcher = inner.model_patcher
        schedule = NoiseSchedule.from_model_sampling(patcher.get_model_object("model_sampling"))
        log_borrowed(calibration, calibration.check_compatible(
            family=schedule.family, fingerprint=model_fingerprint(patcher), latent_shape=tuple(x.shape[1:]),
            cfg=guidance_scale(inner), borrow=calibration.borrow_range(borrow or method)))
        check_same_sigmas(sigmas, fitted, f"this {method} calibration")
        function, options = METHODS[method].sampler(tensors, calibration.settings, schedule, **inputs)
        to_zero = sigmas.clone()        # (ComfyUI's uni_pc writes 0.001 over the final 0 of the sigmas it runs on)
        return keep_masked(model, function(model, x, sigmas, extra_args, callback, disable, **options), to_zero,
                           extra_args)

    return comfy.samplers.KSAMPLER(sample)


# Guiders whose guidance is their one `cfg` (SamplerCustom's and KSampler's CFGGuider, BasicGuider's: cfg 1)
READABLE_GUIDERS = ("CFGGuider", "Guider_Basic")


def guidance_scale(guider) -> float:
    """The guidance scale a guider samples with; ValueError for a guider whose guidance is not its one cfg
    (DualCFGGuider's two scales, PerpNeg's negative scale, other packs' guiders): the calibration's cfg check
    cannot read it."""
    if type(guider).__name__ not in READABLE_GUIDERS:
        raise ValueError(f"calibrated samplers check the guidance they were fitted for, and the guider "
                         f"{type(guider).__name__} does not guide with one cfg: use SamplerCustom (or CFGGuider / "
                         "BasicGuider) with this calibration")
    cfg = float(guider.cfg)
    if not math.isfinite(cfg):
        raise ValueError(f"cfg {cfg}: expected a finite number")
    return cfg


def keep_masked(model, x, sigmas, extra_args):
    """x with the region an inpainting noise mask keeps (mask 0) set back to the input latent, as ComfyUI's own
    samplers end: their last step returns the model's denoised output, which ComfyUI's inpainting wrapper
    (KSamplerX0Inpaint) has blended with the input latent by the mask (transformed, where a node installed a
    denoise_mask_function, as at the last model call's sigma). A calibrated method's final x is a fitted
    combination of such outputs and of the start noise, so the kept region is restored here, once, for every
    method; elsewhere (a soft mask's partly kept pixels too) x stays the method's, whose outputs were blended.
    Where the mask is 0 the latent is kept even if a denoise_mask_function regenerates everything at the last
    call (Differential Diffusion does at sigma_min): ComfyUI's own samplers then end on D(latent + sigma_min
    noise), within the model's last denoising of the latent, whereas a fitted combination would not."""
    mask = (extra_args or {}).get("denoise_mask")
    if mask is None or float(sigmas[-1]) != 0:
        return x
    kept = mask <= 0
    function = extra_args.get("model_options", {}).get("denoise_mask_function")
    if function is not None:
        sigma = sigmas[-2] * x.new_ones([x.shape[0]])
        kept = kept | (function(sigma, mask, extra_options={"model": model.inner_model, "sigmas": sigmas}) <= 0)
    return torch.where(kept, model.latent_image, x)
