"""Samplers side by side (`nodes/lockstep.py`): on the closed-form models inside ComfyUI's sampling, each ends where
it would alone, their calls batched round by round, and an error or Cancel in any stops them all."""
import threading

import pytest
import torch

import comfy.model_management
import comfy.samplers
from calibrated_samplers.nodes.request import Request, plan
from calibrated_samplers.nodes.run import CalibrationRun
from tinymodels import gmm

SAMPLERS = ["euler", "dpmpp_2m", "lms", "ipndm", "uni_pc", "res_multistep"]


@pytest.fixture(scope="module", params=["eps", "flow"])
def model(request):
    return gmm.build_model(request.param)


def _run(model, counted):
    request = Request.from_inputs("olss", seed=0, cfg=2.0, steps=5, teacher_steps=20, calibration_batch=4)
    return CalibrationRun(model=counted or model, plan=plan(model, (4, 8, 8), request), positive=gmm.conditioning([3]),
                          negative=gmm.null_conditioning(), latent=torch.zeros(1, 4, 8, 8))


def _counted(model, rows):
    counted = model.clone()
    counted.set_model_sampler_post_cfg_function(lambda args: rows.append(args["denoised"].shape[0]) or args["denoised"])
    return counted


def test_samplers_side_by_side_end_where_they_would_alone(model):
    rows = []
    run = _run(model, _counted(model, rows))
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "karras", 5).float()
    samplers = [comfy.samplers.sampler_object(name) for name in SAMPLERS]
    samplers = [(s.sampler_function, s.extra_options) for s in samplers]
    run.trajectory                                      # (the teacher: every run's first call is its)
    for part in (run.subset([1], states=False), run):
        rows.clear()
        alone = [part.sample(function, sigmas, **options) for function, options in samplers]
        alone_calls, alone_rows = len(rows), sum(rows)
        rows.clear()
        before = run.calls[0]
        together = part.sample_side_by_side(samplers, sigmas)
        for name, a, b in zip(SAMPLERS, alone, together):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-5, msg=name)
        # after the first call (the teacher's), the calls of a round made together in calls no larger than the
        # calibration batch (4 rows): on one noise at most 2 a round where alone they made 6; the second call of the
        # samplers whose first step is euler's is asked alike and made once
        assert alone_calls == 4 * len(SAMPLERS) and max(rows) <= 4 and sum(rows) < alone_rows
        assert len(rows) < alone_calls and (part is run or len(rows) <= 2 * 4)
        assert run.calls[0] - before == pytest.approx(sum(rows) / 4)


def test_an_error_or_cancel_in_one_stops_them_all(model):
    run = _run(model, None)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "karras", 5).float()
    euler = comfy.samplers.sampler_object("euler")

    def failing(model, x, sigmas, **kwargs):
        model(x, sigmas[0] * x.new_ones(len(x)), **kwargs["extra_args"])
        raise ValueError("broken sampler")

    before = threading.active_count()
    with pytest.raises(ValueError, match="broken sampler"):
        run.sample_side_by_side([(euler.sampler_function, {}), (failing, {}), (euler.sampler_function, {})], sigmas)
    assert threading.active_count() == before

    def cancelling(model, x, sigmas, **kwargs):            # Cancel pressed while the samplers run
        model(x, sigmas[0] * x.new_ones(len(x)), **kwargs["extra_args"])
        comfy.model_management.interrupt_current_processing(True)
        return euler.sampler_function(model, x, sigmas, **kwargs)

    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            run.sample_side_by_side([(euler.sampler_function, {}), (cancelling, {})], sigmas)
    finally:
        comfy.model_management.interrupt_current_processing(False)
    assert threading.active_count() == before


def test_requests_alike_are_made_once_and_other_options_alone():
    """The driver's batching on its own (a plain torch function as the model): requests with the same x and sigma
    are one row of the call, and a sampler that passes other options than the rest is called on its own."""
    from calibrated_samplers.nodes.lockstep import run_side_by_side
    calls = []

    def model(x, sigma, scale=1.0):
        calls.append(len(x))
        return x * scale / (1 + sigma.reshape(-1, 1))

    def steps(model, x, sigmas, extra_args=None, callback=None, disable=None, shift=0.0):
        for i in range(len(sigmas) - 1):
            x = x + shift + model(x, sigmas[i] * x.new_ones(len(x)), **extra_args)
        return x

    x, sigmas = torch.ones(2, 3), torch.tensor([3.0, 2.0, 1.0, 0.0])
    samplers = [(steps, {}), (steps, {"shift": 1.0}), (steps, {})]
    for max_rows, made in ((4, [2, 4, 4]), (2, [2, 2, 2, 2, 2])):
        calls.clear()
        finals = run_side_by_side(model, samplers, x, sigmas, {"scale": 2.0}, max_rows=max_rows)
        # the first request alike for all three; then two x of 2 rows a round, in calls of at most max_rows rows
        assert calls == made
        for final, (_, options) in zip(finals, samplers):
            assert torch.equal(final, steps(model, x, sigmas, {"scale": 2.0}, **options))
    odd = lambda model, x, sigmas, extra_args=None, **kwargs: model(x, sigmas[0] * x.new_ones(len(x)), scale=3.0)
    calls.clear()
    run_side_by_side(model, [(odd, {}), (steps, {})], x, sigmas, {"scale": 2.0}, max_rows=4)
    assert calls[:2] == [2, 2]              # other options: one call each
