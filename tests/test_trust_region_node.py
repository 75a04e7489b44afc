"""TrustRegionStepsScheduler inside ComfyUI: SIGMAS for SamplerCustom, for every model family."""
import pytest
import torch

import comfy.samplers
from calibrated_samplers.nodes.trust_region import TrustRegionStepsScheduler, _optimized
from calibrated_samplers.optimizers import trust_region as tr
from calibrated_samplers.optimizers.coordinates import NoiseSchedule
from comfy_extras.nodes_custom_sampler import KSamplerSelect, SamplerCustom
from tinymodels import gmm


@pytest.fixture(scope="module", params=["eps", "v_prediction", "flow"])
def model(request):
    return gmm.build_model(request.param)


def _sigmas(model, steps=5, solver="uni_pc", init="uniform_t", p=2.0, denoise=1.0):
    return TrustRegionStepsScheduler.execute(model, steps, solver, init, p, denoise).result[0]


@pytest.mark.parametrize("solver", ["uni_pc", "dpmpp_2m", "euler"])
def test_sigmas_span_the_model_range(model, solver):
    ms = model.get_model_object("model_sampling")
    sigmas = _sigmas(model, 6, solver)
    assert sigmas.shape == (7,) and sigmas.dtype == torch.float32
    assert sigmas[0] == pytest.approx(float(ms.sigma_max)) and sigmas[-1] == 0
    assert torch.all(sigmas[1:] < sigmas[:-1]) and sigmas[-2] > float(ms.sigma_min) * 0.999


def test_every_init_and_exponent_lowers_the_error_bound(model):
    """The node's schedule has a lower surrogate error bound (the paper's, with the node's p and trunc_num 3)
    than the start it was given, and the exponent p changes the schedule."""
    ms = model.get_model_object("model_sampling")
    schedule = NoiseSchedule.from_model_sampling(ms)
    starts = {"uniform_t": comfy.samplers.calculate_sigmas(ms, "normal", 5).double().numpy(),
              "uniform_lambda": "uniform_lambda", "karras": "karras"}
    for init, start in starts.items():
        results = []
        for p in (1.0, 2.0):
            sigmas = _sigmas(model, 5, "uni_pc", init, p)
            before = tr.objective(tr.initial_lambdas(schedule, 5, start), schedule, "uni_pc", p, trunc_num=3)
            after = tr.objective(tr.initial_lambdas(schedule, 5, sigmas.double().numpy()), schedule, "uni_pc", p,
                                 trunc_num=3)
            assert after < before, (init, p, before, after)
            results.append(sigmas)
        assert not torch.allclose(results[0], results[1]), init


def test_denoise_below_one_covers_the_img2img_range(model):
    ms = model.get_model_object("model_sampling")
    sigmas = _sigmas(model, 4, "uni_pc", "karras", denoise=0.5)
    assert len(sigmas) == 5 and sigmas[-1] == 0
    assert sigmas[0] == pytest.approx(float(ms.percent_to_sigma(0.5)), rel=1e-5)
    assert len(_sigmas(model, 4, "uni_pc", "karras", denoise=0.0)) == 0
    with pytest.raises(ValueError, match="uniform_t"):
        _sigmas(model, 4, "uni_pc", "uniform_t", denoise=0.5)


def test_results_are_cached_by_their_inputs(model):
    _optimized.cache_clear()
    first = _sigmas(model, 7)
    again = _sigmas(model, 7)
    assert _optimized.cache_info().hits >= 1 and torch.equal(first, again)


def test_feeds_sampler_custom(model):
    sigmas = _sigmas(model, 5, "uni_pc")
    sampler = KSamplerSelect.execute("uni_pc").result[0]
    latent = {"samples": torch.zeros(2, 4, 8, 8)}
    out = SamplerCustom.execute(model, True, 3, 2.0, gmm.conditioning([1]), gmm.null_conditioning(),
                                sampler, sigmas, latent).result[0]["samples"]
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()


def test_cancel_stops_the_solve_promptly():
    """Cancel (ComfyUI's interrupt flag) ends the trust-region solve at its next iteration."""
    import time
    import comfy.model_management as mm
    model = gmm.build_model("flow")
    _optimized.cache_clear()
    mm.interrupt_current_processing(True)
    try:
        start = time.perf_counter()
        with pytest.raises(mm.InterruptProcessingException):
            _sigmas(model, 90, "uni_pc", "karras")
        assert time.perf_counter() - start < 0.5
    finally:
        mm.interrupt_current_processing(False)
    assert torch.isfinite(_sigmas(model, 90, "uni_pc", "karras")).all()      # nothing half-done was cached


def test_the_node_says_it_is_not_for_flow_models(model, caplog):
    """Measured worse than the same sampler's best built-in schedule on the test models of both families: the
    node's description says so (not for flow models), and a run on a flow model logs it."""
    description = TrustRegionStepsScheduler.define_schema().description
    assert "not for them" in description and "flow models" in description and "EPS models" in description
    _sigmas(model, 5)
    schedule = NoiseSchedule.from_model_sampling(model.get_model_object("model_sampling"))
    assert ("flow model" in caplog.text) == schedule.is_flow
