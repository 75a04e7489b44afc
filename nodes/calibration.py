"""Calibrate Sampler, Load Calibration and Calibration Sigmas: thin nodes over `calibrate` and the store."""
import torch

import comfy.sample
import comfy.samplers
from comfy_api.latest import io

from . import CATEGORY, CalibrationType, store
from .builtins import DETERMINISTIC_SAMPLERS
from .calibrate import calibrate, method_sigmas
from .methods import METHODS
from .request import AUTO_SCHEDULER, SCHEDULERS, Request


TEACHER_STEPS_TOOLTIP = ("Steps of the accurate teacher run (third order) that the methods fit to. 0 (auto): as "
                         "few as make its estimated error at most 1/20 of the best built-in sampler's at these steps "
                         "(the calibration's diagnostics and report show the length and the estimate).")


SCHEDULER_TOOLTIP = ("Student sigmas. auto: every scheduler is tried with the built-in samplers on calibration "
                     "noises, and each method that keeps a schedule is fitted on the two where its plain sampler "
                     "did best and keeps the one closer to the teacher (in KSampler (Calibrated), auto takes the "
                     "calibration's choice). At denoise below 1, auto starts where KSampler's simple scheduler "
                     "starts for that denoise and compares only schedules from there. Sigmas")


CALIBRATION_BATCH_TOOLTIP = ("Noise samples the fits and their validation see. More generalizes better and is "
                             "judged more reliably; time and memory grow with it. On sharp content 8 can miss rare "
                             "failures (a sample landing on another picture than the teacher's) that 32 shows.")


def method_tooltip(prefix=""):
    return prefix + " ".join(f"{m.name}: {m.summary}." for m in METHODS.values())


def follows_tooltip(setting, what):
    """A tooltip for a KSampler input that some methods keep (`Method.follows`), naming them from the registry."""
    names = ", ".join(m.name for m in METHODS.values() if setting in m.follows)
    return (f"{what} that {names} keep: sample with the same one. Other methods bring their own (some try it beside "
            "their own and keep whichever fits better).")


def method_inputs():
    """Each method's own inputs (`Method.inputs`), once each, after the common ones."""
    found = {}
    for m in METHODS.values():
        for item in m.inputs():
            found.setdefault(item.id, item)
    return list(found.values())


def latent_samples(model, latent_image):
    """The LATENT's samples with the model's channel count (ComfyUI's rule for an empty latent)."""
    return comfy.sample.fix_empty_latent_channels(model, latent_image["samples"])


class CalibrateSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CalibrateSampler",
            display_name="Calibrate Sampler",
            category=CATEGORY,
            description="Fits few-step samplers to your model once, against a long accurate teacher run, and stores "
                        "the result in models/calibrations; later runs with the same model and settings reuse it "
                        "instantly.",
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
                io.Int.Input("teacher_steps", default=0, min=0, max=4000, tooltip=TEACHER_STEPS_TOOLTIP),
                io.Int.Input("calibration_batch", default=8, min=1, max=256,
                             tooltip=CALIBRATION_BATCH_TOOLTIP),
                io.Combo.Input("method", options=["all", *METHODS], default="all",
                               tooltip=method_tooltip("Which methods to fit; 'all' fits every one. ")),
                io.Combo.Input("scheduler", options=SCHEDULERS, default=AUTO_SCHEDULER,
                               tooltip=follows_tooltip("scheduler", SCHEDULER_TOOLTIP)),
                io.Combo.Input("sampler_name", options=DETERMINISTIC_SAMPLERS, default="euler",
                               tooltip=follows_tooltip("sampler_name", "The built-in sampler")),
                io.Sigmas.Input("sigmas", optional=True,
                                tooltip="Optional fixed student schedule, instead of the scheduler (methods that "
                                        "search their steps then fit these sigmas instead)."),
                io.Boolean.Input("refit", default=False, optional=True,
                                 tooltip="Calibrate again even if a matching stored calibration exists."),
                *method_inputs(),
                io.Float.Input("denoise", default=1.0, min=0.01, max=1.0, step=0.01, optional=True,
                               tooltip="As KSampler's: below 1, calibrate a partial pass (img2img, a hires fix's "
                                       "second pass) from the sigma KSampler starts at for this denoise, on "
                                       "latent_image's pictures re-noised there, or the teacher's own pictures when "
                                       "latent_image is empty. With sigmas connected, their first sigma is the "
                                       "start and denoise below 1 only says that the pass starts from a picture."),
            ],
            outputs=[CalibrationType.Output(display_name="calibration"),
                     io.Latent.Output(display_name="teacher_latent",
                                      tooltip="The teacher's pictures (the empty latent when no teacher ran)."),
                     io.Sigmas.Output(display_name="sigmas",
                                      tooltip="The sigmas of the (first) fitted method: connect with its sampler.")],
        )

    @classmethod
    def execute(cls, model, positive, negative, latent_image, seed, cfg, steps, teacher_steps, calibration_batch,
                method, scheduler=AUTO_SCHEDULER, sampler_name="euler", sigmas=None, refit=False, denoise=1.0,
                **options) -> io.NodeOutput:
        request = Request.from_inputs(method, sigmas, seed=seed, cfg=cfg, steps=steps, denoise=denoise,
                                      teacher_steps=teacher_steps,
                                      calibration_batch=calibration_batch, scheduler=scheduler,
                                      sampler_name=sampler_name, **options)
        calibration, final = calibrate(model, positive, negative, latent_samples(model, latent_image), request, refit)
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
            inputs=[io.Combo.Input("calibration_name", options=store.names(),
                                   tooltip="File in models/calibrations.")],
            outputs=[CalibrationType.Output(display_name="calibration")],
        )

    @classmethod
    def fingerprint_inputs(cls, calibration_name):
        """The file's identity (size, modification time, inode): a replaced or deleted file loads anew."""
        return store.file_identity(calibration_name)

    @classmethod
    def execute(cls, calibration_name) -> io.NodeOutput:
        return io.NodeOutput(store.load(calibration_name))


class CalibrationSigmas(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CalibrationSigmas",
            display_name="Calibration Sigmas",
            category=f"{CATEGORY}/schedulers",
            description="The student sigmas a calibration's method was fitted for (its searched steps, for a method "
                        "that searches them). "
                        "A calibrated sampler refuses other sigmas.",
            inputs=[CalibrationType.Input("calibration", tooltip="From Calibrate Sampler or Load Calibration."),
                    io.Combo.Input("method", options=list(METHODS), default=next(iter(METHODS)),
                                   tooltip=method_tooltip())],
            outputs=[io.Sigmas.Output()],
        )

    @classmethod
    def execute(cls, calibration, method) -> io.NodeOutput:
        return io.NodeOutput(method_sigmas(calibration, method))
