"""Partial passes (denoise below 1: img2img, a hires fix's second pass) in KSampler (Calibrated) and Calibrate
Sampler, on the closed-form model built like SD1.5 and Flux checkpoints: the sigmas KSampler uses, the starting
pictures, the key, what is refused, and that the calibrated pass lands closer to the truth on new pictures than the
built-ins on the same sigmas."""
import pytest
import torch

import comfy.model_management
import comfy.sample
import comfy.samplers
import folder_paths
from calibrated_samplers.nodes.builtins import ONE_EVALUATION, ksampler_sigmas, schedules
from calibrated_samplers.nodes.calibration import CalibrateSampler
from calibrated_samplers.nodes.ksampler import CalibratedKSampler
from calibrated_samplers.nodes.request import PARTIAL_SCHEDULER
from calibrated_samplers.optimizers.calibration import CalibrationMismatch
from calibrated_samplers.optimizers.coordinates import NoiseSchedule
from calibrated_samplers.optimizers.teacher import rmse, sample_teacher, teacher_sigmas
from tinymodels import gmm

CFG = 3.0


@pytest.fixture(autouse=True)
def calibration_folder(tmp_path, monkeypatch):
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "calibrations", ([str(tmp_path)], {".safetensors"}))
    return tmp_path


@pytest.fixture(scope="module", params=["sd15", "flux"])
def model(request):
    return gmm.build_like(request.param)


def _shape(model):
    return (model.model.latent_format.latent_channels, 8, 8)


def _pictures(model, batch, seed):
    """Exact samples of the model's data (class 3), in LATENT space: what a VAE encoder would give."""
    x = model.model.diffusion_model.mixture.sample(batch, torch.full((batch,), 3),
                                                    generator=torch.Generator().manual_seed(seed))
    return model.model.process_latent_out(x.float())


def _ksampler(model, latent, denoise=0.5, method="auto", scheduler="karras", calibration=None, steps=4, seed=5):
    return CalibratedKSampler.execute(model=model, seed=seed, steps=steps, cfg=CFG, sampler_name="euler",
                                      scheduler=scheduler, positive=gmm.conditioning([3]),
                                      negative=gmm.null_conditioning(), latent_image=latent, denoise=denoise,
                                      method=method, teacher_steps=0, calibration_batch=8,
                                      calibration=calibration).result[0]["samples"]


def _calibrate(model, latent, denoise=0.5, method="iia_ddim", scheduler="karras"):
    return CalibrateSampler.execute(model, gmm.conditioning([3]), gmm.null_conditioning(), latent, 0, CFG, 4, 0, 8,
                                    method, scheduler=scheduler, denoise=denoise).result


def test_sigmas_are_ksamplers_for_a_denoise():
    model = gmm.build_like("sd15")
    ms = model.get_model_object("model_sampling")
    for scheduler in ("karras", "normal", "simple", "beta"):
        for sampler in ("euler", "uni_pc"):            # (uni_pc: KSampler drops the penultimate sigma)
            for denoise in (0.3, 0.5, 0.75, 0.99995, 1.0):
                expected = comfy.samplers.KSampler(model, steps=5, device="cpu", sampler=sampler, scheduler=scheduler,
                                                   denoise=denoise).sigmas
                assert torch.equal(ksampler_sigmas(ms, scheduler, 5, sampler, denoise), expected), \
                    (scheduler, sampler, denoise)
    start = float(ksampler_sigmas(ms, "karras", 5, denoise=0.5)[0])
    assert set(schedules(ms, 5, "euler", 0.5, start)) == {"karras"}, "only schedules from the same start compare"


def test_a_teacher_from_a_partial_start():
    schedule = NoiseSchedule("eps", 0.03, 14.6)
    grid = teacher_sigmas(schedule, 40, top=1.5)
    assert float(grid[0]) == pytest.approx(1.5) and float(grid[-1]) == 0 and bool(torch.all(grid[1:] < grid[:-1]))
    steps = schedule.lambda_(grid[:-1].double()).diff()
    assert float(steps.std() / steps.mean()) < 1e-3, "uniform in lambda"
    with pytest.raises(ValueError, match="between sigma_min and sigma_max"):
        teacher_sigmas(schedule, 40, top=20.0)


def test_a_partial_calibration_is_made_for_its_pass(model, calibration_folder):
    empty = {"samples": torch.zeros(1, *_shape(model))}
    calibration, teacher_latent, sigmas = _calibrate(model, empty)
    ms = model.get_model_object("model_sampling")
    assert torch.equal(sigmas, ksampler_sigmas(ms, "karras", 4, denoise=0.5)), "KSampler's sigmas for denoise 0.5"
    assert calibration.settings["denoise"] == {"denoise": 0.5, "starts": "teacher",
                                               "start_sigma": pytest.approx(float(sigmas[0]), abs=1e-6)}
    starts = calibration.diagnostics["starts"]
    assert starts["from"] == "teacher" and starts["evaluations"] == starts["steps"] >= 48
    stored = [p.name for p in calibration_folder.iterdir()]
    assert len(stored) == 1 and "denoise0.5" in stored[0]
    # a picture given: its pictures are the starts, and it is another calibration (another key)
    picture = {"samples": _pictures(model, 2, seed=1)}
    other = _calibrate(model, picture)[0]
    assert other.diagnostics["starts"] == {"from": "latent_image", "evaluations": 0}
    assert other.key() != calibration.key() and len(list(calibration_folder.iterdir())) == 2
    # denoise 1 keeps the key it had: no denoise in its settings; above 0.9999 KSampler samples the whole schedule too
    full = _calibrate(model, empty, denoise=1.0)[0]
    assert "denoise" not in full.settings and "starts" not in full.diagnostics
    assert _calibrate(model, empty, denoise=0.99995)[0].key() == full.key()


def test_a_second_pass_lands_closer_than_the_builtins(model, calibration_folder):
    """New pictures, new noise: KSampler (Calibrated) at denoise 0.5, calibrated on 8 other pictures (its first run)
    and reused, against a 400-step teacher from the same start, beside every one-evaluation built-in sampler on the
    schedules that start there."""
    _ksampler(model, {"samples": _pictures(model, 8, seed=99)}, scheduler="auto")         # calibrates and stores
    pictures = _pictures(model, 16, seed=100)
    out = _ksampler(model, {"samples": pictures}, scheduler="auto", seed=7)               # reuses it
    assert len(list(calibration_folder.iterdir())) == 1
    calibrated = model.model.process_latent_in(out)
    ms = model.get_model_object("model_sampling")
    schedule = NoiseSchedule.from_model_sampling(ms)
    start = float(ksampler_sigmas(ms, PARTIAL_SCHEDULER, 4, denoise=0.5)[0])    # (where scheduler auto starts)
    noise = comfy.sample.prepare_noise(pictures, 7)

    def run(sampler, sigmas):
        out = comfy.sample.sample_custom(model, noise, CFG, sampler, sigmas.clone(), gmm.conditioning([3]),
                                         gmm.null_conditioning(), pictures, disable_pbar=True, seed=7)
        return model.model.process_latent_in(out)

    reference = run(comfy.samplers.KSAMPLER(sample_teacher, extra_options={"schedule": schedule}),
                    teacher_sigmas(schedule, 400, top=start))
    builtins = {f"{name} / {scheduler}": rmse(run(comfy.samplers.sampler_object(name), sigmas.float()), reference)
                for name in ONE_EVALUATION for scheduler, sigmas in schedules(ms, 4, name, 0.5, start).items()}
    best = min(builtins.values())
    assert rmse(calibrated, reference) <= 0.7 * best, (rmse(calibrated, reference), sorted(builtins.items())[:3])
    assert rmse(pictures, model.model.process_latent_out(reference)) > 0, "the pass changes the pictures"


def test_a_calibration_is_refused_for_another_denoise(model):
    picture = {"samples": _pictures(model, 2, seed=1)}
    half = _calibrate(model, picture, method="olss")[0]
    with pytest.raises(CalibrationMismatch, match="denoise 0.5, not 0.6"):
        _ksampler(model, picture, denoise=0.6, method="olss", calibration=half)
    with pytest.raises(CalibrationMismatch, match="denoise 0.5, not 1"):
        _ksampler(model, picture, denoise=1.0, method="olss", calibration=half)
    full = _calibrate(model, {"samples": torch.zeros(1, *_shape(model))}, denoise=1.0, method="olss")[0]
    with pytest.raises(CalibrationMismatch, match="denoise 1, not 0.5"):
        _ksampler(model, picture, method="olss", calibration=full)
    with pytest.raises(ValueError, match="denoise 0"):
        _ksampler(model, picture, denoise=0.0)
    out = _ksampler(model, picture, method="olss", calibration=half)
    assert out.shape == picture["samples"].shape and torch.isfinite(out).all()


def test_inpainting_at_a_denoise_keeps_the_unmasked_region(model):
    picture = _pictures(model, 2, seed=2)
    mask = torch.zeros(2, 1, 8, 8)
    mask[..., :4] = 1
    latent = {"samples": picture, "noise_mask": mask}
    out = _ksampler(model, latent, method="auto")
    kept = mask.expand_as(picture) == 0
    assert float((out - picture)[kept].abs().max()) <= 1e-4 * float(picture.abs().max())
    assert float((out - picture)[~kept].abs().max()) > 1e-3, "the masked half is sampled"
    comfy.model_management.soft_empty_cache()


def test_sampler_nodes_run_a_partial_calibration_in_sampler_custom(model):
    """Calibrate Sampler at denoise 0.5 -> OLSS Sampler + Calibration Sigmas in SamplerCustom from a picture: the
    same latent as KSampler (Calibrated) with that calibration; other sigmas (a full schedule) are refused."""
    from calibrated_samplers.nodes.calibration import CalibrationSigmas
    from calibrated_samplers.nodes.samplers import node_for
    from comfy_extras.nodes_custom_sampler import SamplerCustom
    picture = {"samples": _pictures(model, 2, seed=3)}
    calibration = _calibrate(model, picture, method="olss")[0]
    sampler = node_for("olss").execute(calibration, "olss").result[0]
    sigmas = CalibrationSigmas.execute(calibration, "olss").result[0]
    ours = SamplerCustom.execute(model, True, 5, CFG, gmm.conditioning([3]), gmm.null_conditioning(), sampler, sigmas,
                                 picture).result[0]["samples"]
    torch.testing.assert_close(ours, _ksampler(model, picture, method="olss", calibration=calibration))
    full = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "karras", 4)
    with pytest.raises(ValueError, match="fitted for the 4-step sigmas"):
        SamplerCustom.execute(model, True, 5, CFG, gmm.conditioning([3]), gmm.null_conditioning(), sampler, full,
                              picture)
