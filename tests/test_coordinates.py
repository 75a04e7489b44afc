"""The coordinates module against ComfyUI's own model_sampling objects, for every family."""
import math

import numpy as np
import pytest
import torch

import comfy.model_sampling as cms
from calibrated_samplers.optimizers.coordinates import NoiseSchedule
from host import SD15_BETAS
from tinymodels import gmm


def _sampling(prediction, sampling, **settings):
    class ModelSampling(sampling, prediction):
        pass

    class Config:
        sampling_settings = settings
    return ModelSampling(Config())


SAMPLINGS = {
    "eps": lambda: _sampling(cms.EPS, cms.ModelSamplingDiscrete),
    "v_prediction": lambda: _sampling(cms.V_PREDICTION, cms.ModelSamplingDiscrete),
    "edm": lambda: _sampling(cms.EDM, cms.ModelSamplingContinuousEDM, sigma_min=0.002, sigma_max=80.0),
    "flow": lambda: _sampling(cms.CONST, cms.ModelSamplingDiscreteFlow, shift=3.0, multiplier=1000),
    "flux": lambda: _sampling(cms.CONST, cms.ModelSamplingFlux, shift=1.15),
}


@pytest.mark.parametrize("name", SAMPLINGS)
def test_family_and_range_come_from_model_sampling(name):
    ms = SAMPLINGS[name]()
    schedule = NoiseSchedule.from_model_sampling(ms)
    assert schedule.family == {"flux": "flow"}.get(name, name)
    assert schedule.sigma_min == pytest.approx(float(ms.sigma_min))
    assert schedule.sigma_max == pytest.approx(float(ms.sigma_max))


@pytest.mark.parametrize("name", SAMPLINGS)
def test_noise_placement_matches_comfyui(name):
    """ComfyUI's noise_scaling gives x_c; ours gives (alpha x0 + sigma n) / native_scale."""
    ms = SAMPLINGS[name]()
    schedule = NoiseSchedule.from_model_sampling(ms)
    g = torch.Generator().manual_seed(0)
    sig = ms.sigmas[torch.randint(0, len(ms.sigmas), (16,), generator=g)].double()
    x0, n = torch.randn(16, 3, generator=g, dtype=torch.float64), torch.randn(16, 3, generator=g, dtype=torch.float64)
    want = ms.noise_scaling(sig, n.clone(), x0.clone())
    alpha, sigma = schedule.alpha_sigma(sig)
    got = (alpha[:, None] * x0 + sigma[:, None] * n) / torch.as_tensor(schedule.native_scale(sig)).reshape(-1, 1)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # the invariant every method relies on: x_native / sigma_native == x_c / s
    torch.testing.assert_close((alpha[:, None] * x0 + sigma[:, None] * n) / sigma[:, None], want / sig[:, None])


def test_vp_alpha_is_comfyui_alphas_cumprod():
    ms = SAMPLINGS["eps"]()
    schedule = NoiseSchedule.from_model_sampling(ms)
    betas = torch.from_numpy(SD15_BETAS)
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    alpha, sigma = schedule.alpha_sigma(ms.sigmas.double())
    torch.testing.assert_close(alpha ** 2, alphas_cumprod, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(alpha ** 2 + sigma ** 2, torch.ones_like(alpha))


def test_flow_timestep_and_sigma_agree_with_comfyui():
    ms = SAMPLINGS["flow"]()
    schedule = NoiseSchedule.from_model_sampling(ms)
    sig = ms.sigma(torch.linspace(1, 999, 50, dtype=torch.float64))
    alpha, sigma = schedule.alpha_sigma(sig)
    torch.testing.assert_close(alpha, 1 - sig)
    torch.testing.assert_close(schedule.lambda_(sig), torch.log((1 - sig) / sig))


@pytest.mark.parametrize("name", SAMPLINGS)
def test_lambda_round_trip_and_consistency(name):
    schedule = NoiseSchedule.from_model_sampling(SAMPLINGS[name]())
    sig = np.geomspace(schedule.sigma_min, schedule.sigma_max * (0.999 if schedule.is_flow else 1), 40)
    lam = schedule.lambda_(sig)
    assert np.all(np.diff(lam) < 0), "lambda must fall as sigma grows"
    np.testing.assert_allclose(schedule.sigma_of_lambda(lam), sig, rtol=1e-12)
    alpha, sigma = schedule.alpha_sigma(sig)
    np.testing.assert_allclose(np.log(alpha / sigma), lam, rtol=1e-12, atol=1e-12)
    alpha_l, sigma_l = schedule.alpha_sigma_of_lambda(lam)
    np.testing.assert_allclose(alpha_l, alpha, rtol=1e-12)
    np.testing.assert_allclose(sigma_l, sigma, rtol=1e-12)
    # floats, numpy and torch give the same numbers
    assert schedule.lambda_(float(sig[3])) == pytest.approx(float(lam[3]))
    torch.testing.assert_close(schedule.lambda_(torch.tensor(sig)), torch.tensor(lam))


def test_alpha_sigma_of_lambda_is_stable_at_extremes():
    for family in ("eps", "flow", "edm"):
        schedule = NoiseSchedule(family, 0.01, 1.0 if family == "flow" else 10.0)
        alpha, sigma = schedule.alpha_sigma_of_lambda(np.array([-60.0, 60.0]))
        assert np.all(np.isfinite(alpha)) and np.all(np.isfinite(sigma))


@pytest.mark.parametrize("family", ["eps", "v_prediction", "flow"])
def test_schedule_from_the_tiny_models(family):
    model = gmm.build_model(family)
    schedule = NoiseSchedule.from_model_sampling(model.get_model_object("model_sampling"))
    assert schedule.family == family


def test_unknown_model_sampling_is_refused_with_a_clear_message():
    ms = _sampling(cms.COSMOS_RFLOW, cms.ModelSamplingCosmosRFlow)
    with pytest.raises(ValueError, match="unsupported model type"):
        NoiseSchedule.from_model_sampling(ms)


def test_a_mislabelled_family_is_caught_by_its_noise_placement():
    class Odd(cms.ModelSamplingDiscrete, cms.EPS):      # claims EPS but places noise like a flow model
        def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
            return sigma * noise + (1 - sigma) * latent_image
    with pytest.raises(ValueError, match="unsupported model type"):
        NoiseSchedule.from_model_sampling(Odd())


def test_invalid_ranges_are_refused():
    with pytest.raises(ValueError):
        NoiseSchedule("eps", 1.0, 0.5)
    with pytest.raises(ValueError):
        NoiseSchedule("flow", 0.01, 2.0)
    with pytest.raises(ValueError, match="unknown model family"):
        NoiseSchedule("sde", 0.01, 2.0)
    assert math.isinf(NoiseSchedule("flow", 0.01, 1.0).lambda_min)
