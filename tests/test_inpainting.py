"""Inpainting: a latent with a noise mask (Set Latent Noise Mask, VAE Encode for Inpainting) keeps, where the
mask is 0, exactly the latent it came with, through every calibrated method, as ComfyUI's own samplers do."""
import pytest
import torch

import comfy.samplers
import folder_paths
from calibrated_samplers.nodes.calibration import CalibrateSampler, CalibrationSigmas
from calibrated_samplers.nodes.ksampler import CalibratedKSampler
from calibrated_samplers.nodes.methods import ALL, METHODS
from calibrated_samplers.nodes.samplers import node_for
from comfy_extras.nodes_custom_sampler import SamplerCustom
from comfy_extras.nodes_differential_diffusion import DifferentialDiffusion
from tinymodels import gmm

CFG = 3.0


@pytest.fixture(autouse=True)
def calibration_folder(tmp_path, monkeypatch):
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "calibrations", ([str(tmp_path)], {".safetensors"}))


@pytest.fixture(scope="module")
def model():
    return gmm.build_like("sd15")          # a real latent format: LATENT is 1 / 0.18215 of the model's space


def _masked_latent(batch=2):
    """An image latent (LATENT space of SD1.5) with a noise mask regenerating the left half only."""
    samples = torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(3)) * 5
    mask = torch.zeros(batch, 1, 8, 8)
    mask[..., :4] = 1
    return {"samples": samples, "noise_mask": mask}


def _kept_change(out, latent):
    kept = latent["noise_mask"].expand_as(latent["samples"]) == 0
    return float((out - latent["samples"])[kept].abs().max() / latent["samples"].abs().max())


def _calibrate(model, steps):
    return CalibrateSampler.execute(model, gmm.conditioning([3]), gmm.null_conditioning(),
                                    {"samples": torch.zeros(1, 4, 8, 8)}, 0, CFG, steps, 60, 4, "all").result[0]


@pytest.mark.parametrize("steps", [3, 5, 8])
def test_every_method_keeps_the_unmasked_region(model, steps):
    calibration = _calibrate(model, steps)
    latent = _masked_latent()
    for method in ALL:
        node = node_for(method)
        sampler = node.execute(calibration, method if len(node.METHODS) > 1 else None).result[0]
        sigmas = CalibrationSigmas.execute(calibration, method).result[0]
        out = SamplerCustom.execute(model, True, 7, CFG, gmm.conditioning([3]), gmm.null_conditioning(), sampler,
                                    sigmas, latent).result[0]["samples"]
        assert _kept_change(out, latent) <= 1e-4, (method, steps, _kept_change(out, latent))
        regenerated = latent["noise_mask"].expand_as(out) == 1
        assert float((out - latent["samples"])[regenerated].abs().max()) > 0.1, method     # the rest is sampled


@pytest.mark.parametrize("method", sorted(METHODS))
def test_calibrated_ksampler_keeps_the_unmasked_region(model, method):
    latent = _masked_latent()
    out = CalibratedKSampler.execute(model=model, seed=5, steps=3, cfg=CFG, sampler_name="euler", scheduler="karras",
                                     positive=gmm.conditioning([3]), negative=gmm.null_conditioning(),
                                     latent_image=latent, denoise=1.0, method=method, teacher_steps=60,
                                     calibration_batch=4).result[0]["samples"]
    assert _kept_change(out, latent) <= 1e-4, method


def test_a_denoise_mask_function_is_honoured(model):
    """Differential Diffusion replaces the mask by a threshold of it per step: at the last step every pixel whose
    mask is below the final threshold is kept."""
    patched = DifferentialDiffusion.execute(model).result[0]
    calibration = _calibrate(patched, 3)
    latent = _masked_latent()
    latent["noise_mask"] = latent["noise_mask"] * 0.6          # soft: 0 kept, 0.6 regenerated late
    sampler = node_for("olss").execute(calibration, "olss").result[0]
    out = SamplerCustom.execute(patched, True, 7, CFG, gmm.conditioning([3]), gmm.null_conditioning(), sampler,
                                CalibrationSigmas.execute(calibration, "olss").result[0], latent).result[0]["samples"]
    assert _kept_change(out, latent) <= 1e-4


@pytest.mark.parametrize("base", ["euler", "uni_pc"])
def test_a_soft_mask_matches_comfyuis_own_sampler(model, base):
    """TimeTuner with every ratio 1 is its base sampler: with a soft mask (0, 0.5, 1) the calibrated path gives
    exactly ComfyUI's own result on the partly kept and regenerated pixels (nothing blended twice), and keeps
    the kept ones, also on uni_pc (which writes 0.001 over the final sigma it runs on, and whose own final step
    is not the denoised output, so ComfyUI's uni_pc itself moves the kept region slightly)."""
    calibration = CalibrateSampler.execute(model, gmm.conditioning([3]), gmm.null_conditioning(),
                                           {"samples": torch.zeros(1, 4, 8, 8)}, 0, CFG, 4, 60, 4, "timetuner",
                                           "karras", base).result[0]
    calibration.fits["timetuner"]["ratios"] = torch.ones_like(calibration.fits["timetuner"]["ratios"])
    latent = _masked_latent()
    latent["noise_mask"][..., 2:4] = 0.5
    sigmas = CalibrationSigmas.execute(calibration, "timetuner").result[0]
    ours = SamplerCustom.execute(model, True, 7, CFG, gmm.conditioning([3]), gmm.null_conditioning(),
                                 node_for("timetuner").execute(calibration).result[0], sigmas, latent).result[0]
    theirs = SamplerCustom.execute(model, True, 7, CFG, gmm.conditioning([3]), gmm.null_conditioning(),
                                   comfy.samplers.sampler_object(base), sigmas.clone(), latent).result[0]
    sampled = latent["noise_mask"].expand_as(latent["samples"]) > 0
    torch.testing.assert_close(ours["samples"][sampled], theirs["samples"][sampled])
    assert _kept_change(ours["samples"], latent) <= 1e-4
