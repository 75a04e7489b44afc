"""What the benchmarks and the demo share: the tiny models, held-out noise, teacher runs, counted sampling.

Seeds: calibration batches use seeds below HELD_OUT_SEED; every quality figure is measured on noise
drawn from HELD_OUT_SEED upwards, which no calibration ever sees.
"""
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import host  # noqa: E402

host.setup()

import torch  # noqa: E402

import comfy.sample  # noqa: E402
import comfy.samplers  # noqa: E402
import tinymodels  # noqa: E402
from calibrated_samplers.nodes.builtins import DETERMINISTIC_SAMPLERS, ksampler_sigmas  # noqa: E402
from calibrated_samplers.nodes.request import Request, plan  # noqa: E402
from calibrated_samplers.nodes.run import CalibrationRun  # noqa: E402
from calibrated_samplers.optimizers.coordinates import NoiseSchedule  # noqa: E402
from calibrated_samplers.optimizers.teacher import rmse, sample_teacher, teacher_sigmas  # noqa: E402, F401

HELD_OUT_SEED = 10_000
RESULTS = Path(__file__).resolve().parent / "results"

# Deterministic ComfyUI samplers (ancestral and SDE samplers are stochastic: no single teacher answer).
SAMPLERS = DETERMINISTIC_SAMPLERS
SCHEDULERS = list(comfy.samplers.SCHEDULER_NAMES)


def noise_batch(batch, seed, shape=(4, 8, 8)):
    return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed))


@dataclass
class Case:
    """One model with one conditioning batch and guidance scale: everything a sampler run needs."""

    name: str
    model: object
    module: object
    schedule: NoiseSchedule
    cfg: float
    noise: torch.Tensor
    labels: torch.Tensor

    @classmethod
    def make(cls, name, cfg, batch, seed=HELD_OUT_SEED, labels=None):
        model, module = tinymodels.load(name)
        ms = model.get_model_object("model_sampling")
        labels = torch.arange(batch) % 10 if labels is None else torch.as_tensor(labels)
        shape = (model.model.latent_format.latent_channels, 8, 8)
        return cls(name, model, module, NoiseSchedule.from_model_sampling(ms), cfg,
                   noise_batch(batch, seed, shape), labels)

    @property
    def model_sampling(self):
        return self.model.get_model_object("model_sampling")

    def sample(self, sampler, sigmas, model=None):
        """Final x of ComfyUI's own sampling call (SamplerCustom's path) with this case's noise, under
        inference mode as ComfyUI runs its nodes, in the model's own space (errors are comparable across
        latent formats: ComfyUI's LATENT output is divided by the format's scale and shifted)."""
        with torch.inference_mode():
            return self.model.model.process_latent_in(self._sample(sampler, sigmas.clone(), model))

    def _sample(self, sampler, sigmas, model):
        return comfy.sample.sample_custom(
            model or self.model, self.noise, self.cfg, sampler, sigmas,
            self.module.conditioning(self.labels), self.module.null_conditioning(len(self.labels)),
            torch.zeros_like(self.noise), disable_pbar=True, seed=0)

    def counted_sample(self, sampler, sigmas):
        """(final latent, guided model evaluations, seconds)."""
        if getattr(self, "_counted", None) is None:
            self._calls = []
            self._counted = self.model.clone()
            self._counted.set_model_sampler_post_cfg_function(lambda args: self._calls.append(1) or args["denoised"])
        self._calls.clear()
        start = time.perf_counter()
        x = self.sample(sampler, sigmas, self._counted)
        return x, len(self._calls), time.perf_counter() - start

    def teacher(self, steps=500):
        sampler = comfy.samplers.KSAMPLER(sample_teacher, extra_options={"schedule": self.schedule})
        return self.sample(sampler, teacher_sigmas(self.schedule, steps))


def builtin_sigmas(case, scheduler, steps, sampler_name):
    """Sigmas as ComfyUI's KSampler makes them (the nodes' own rule: `ksampler_sigmas`)."""
    return ksampler_sigmas(case.model_sampling, scheduler, steps, sampler_name)


def calibration_run(case, batch, steps, teacher_steps=500, labels=None, method="all", seed=0, **inputs):
    """The nodes' own CalibrationRun for this case: calibration seed 0 unless given (never the held-out seeds),
    labels 0..9 repeated unless given; `inputs`: Calibrate Sampler's other inputs (scheduler, sampler_name,
    iia_target, ...)."""
    labels = torch.arange(batch) % 10 if labels is None else torch.as_tensor(labels)
    request = Request.from_inputs(method, seed=seed, cfg=case.cfg, steps=steps, teacher_steps=teacher_steps,
                                  calibration_batch=batch, **inputs)
    latent = torch.zeros(1, *case.noise.shape[1:])
    return CalibrationRun(model=case.model, plan=plan(case.model, tuple(latent.shape[1:]), request),
                          positive=case.module.conditioning(labels), negative=case.module.null_conditioning(batch),
                          latent=latent)


def candidate_sampler(calibration, label, schedule):
    """(SAMPLER, sigmas) of one of a calibration's validated candidates: a fitted method or a built-in sampler."""
    from calibrated_samplers.nodes.methods import METHODS
    entry = calibration.diagnostics["validated"][label]
    if "method" in entry:
        function, options = METHODS[label].sampler(calibration.fits[label], calibration.settings, schedule)
        return comfy.samplers.KSAMPLER(function, extra_options=options), calibration.fits[label]["sigmas"]
    return comfy.samplers.sampler_object(entry["sampler"]), torch.tensor(entry["sigmas"], dtype=torch.float32)
