"""TimeTuner (Xia et al. 2024): time-input ratios per step, their hook into the diffusion model and the
derivative-free fit, on the closed-form mixture models (and the trained digits UNet) in real ComfyUI."""
import math

import pytest
import torch

import comfy.sample
import comfy.samplers
from calibrated_samplers.nodes.methods import timetuner as time_input
from calibrated_samplers.optimizers import timetuner as tt
from calibrated_samplers.optimizers.coordinates import NoiseSchedule
from calibrated_samplers.optimizers.teacher import Trajectory, rmse, sample_teacher, teacher_sigmas
from tinymodels import gmm

CFG = 2.0
STEPS = 5


def _run(model, sampler, sigmas, noise, module=gmm, callback=None):
    labels = torch.arange(len(noise)) % 10
    return comfy.sample.sample_custom(model, noise, CFG, sampler, sigmas.clone(), module.conditioning(labels),
                                      module.null_conditioning(len(noise)), torch.zeros_like(noise),
                                      disable_pbar=True, seed=0, callback=callback)


def _noise(batch, seed, shape=gmm.LATENT_SHAPE):
    return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed))


def _sigmas(model, steps=STEPS, scheduler="simple"):
    return comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps)


def _timetuner(name, ratios, verify=True):
    base = comfy.samplers.sampler_object(name)
    return comfy.samplers.KSAMPLER(tt.sample_timetuner, extra_options=dict(
        base=base.sampler_function, base_options=base.extra_options, ratios=ratios,
        with_time_ratio=time_input.with_time_ratio, verify=time_input.verify_time_ratio if verify else None),
        inpaint_options=base.inpaint_options)


def _tuner(name, targets, result, **options):
    base = comfy.samplers.sampler_object(name)
    return comfy.samplers.KSAMPLER(tt.tune_time_ratios, extra_options=dict(
        base=base.sampler_function, base_options=base.extra_options, targets=targets,
        with_time_ratio=time_input.with_time_ratio, callback_scale=time_input.CALLBACK_SCALES.get(name),
        verify=time_input.verify_time_ratio, result=result, **options), inpaint_options=base.inpaint_options)


class _NetSpy:
    """Replaces the mixture net's _forward (inside the DIFFUSION_MODEL wrappers): records what reaches it."""

    def __init__(self, model):
        self.net = model.model.diffusion_model
        self.original = self.net._forward
        self.calls = []

    def __enter__(self):
        def spy(xc, timesteps, *args, **kwargs):
            self.calls.append((xc.clone(), timesteps.clone()))
            return self.original(xc, timesteps, *args, **kwargs)
        self.net._forward = spy
        return self

    def __exit__(self, *exc):
        del self.net._forward


# ratios as a function of sigma --------------------------------------------------------------------------
def test_time_ratios_interpolate_in_log_sigma():
    knots = torch.tensor([10.0, 1.0, 0.1])
    ratios = tt.TimeRatios(torch.cat([knots, torch.zeros(1)]), [1.2, 0.9, 1.05])
    assert ratios.values.dtype == torch.float64 and len(ratios) == 3
    torch.testing.assert_close(ratios(knots), torch.tensor([1.2, 0.9, 1.05], dtype=torch.float64), rtol=0, atol=0)
    mid = ratios(torch.tensor([10 ** 0.5, 0.1 ** 0.5, 10 ** 0.75]))
    torch.testing.assert_close(mid, torch.tensor([1.05, 0.975, 1.125], dtype=torch.float64))
    torch.testing.assert_close(ratios(torch.tensor([[50.0, 0.05], [0.0, 1e-9]])),
                               torch.tensor([[1.2, 1.05], [1.05, 1.05]], dtype=torch.float64), rtol=0, atol=0)
    assert float(tt.TimeRatios([3.0, 0.0], [0.8])(torch.tensor(7.0))) == 0.8
    with pytest.raises(ValueError):
        tt.TimeRatios([1.0, 2.0, 0.0])


# with all ratios 1: the base sampler, bit for bit -------------------------------------------------------
@pytest.mark.parametrize("family", ["eps", "flow"])
def test_unit_ratios_reproduce_the_base_sampler_exactly(family):
    model = gmm.build_model(family)
    noise = _noise(2, 3)
    for name in ("euler", "ddim", "dpmpp_2m", "uni_pc", "heun"):
        sigmas = _sigmas(model, 4, "karras")
        ours = _run(model, _timetuner(name, tt.TimeRatios(sigmas)), sigmas, noise)
        theirs = _run(model, comfy.samplers.sampler_object(name), sigmas, noise)
        assert torch.equal(ours, theirs), name


# the hook changes the time input and nothing else -------------------------------------------------------
@pytest.mark.parametrize("family", ["eps", "flow"])
def test_ratio_scales_only_the_time_input(family):
    model = gmm.build_model(family)
    noise = _noise(2, 4)
    sigmas = _sigmas(model, 1)[:2] * 0.1            # one step from a low noise level, where t * 1.2 is no clamp
    sigmas[-1] = 0
    ratios = tt.TimeRatios(sigmas, [1.2])
    with _NetSpy(model) as nominal:
        plain = _run(model, _timetuner("euler", tt.TimeRatios(sigmas)), sigmas, noise)
    with _NetSpy(model) as tuned:
        scaled = _run(model, _timetuner("euler", ratios), sigmas, noise)
    assert len(nominal.calls) == len(tuned.calls) >= 1
    (xc0, t0), (xc1, t1) = nominal.calls[0], tuned.calls[0]
    assert torch.equal(xc0, xc1)                                                  # c_in keeps the nominal sigma
    torch.testing.assert_close(t1.double(), t0.double() * 1.2, rtol=1e-6, atol=0)
    assert not torch.equal(t0, t1)
    assert rmse(plain, scaled) > 1e-4                                            # the net believes another noise level


def test_hook_leaves_the_callers_model_options_alone():
    ratios = tt.TimeRatios(torch.tensor([2.0, 1.0, 0.0]), [1.1, 0.9])
    options = {"transformer_options": {"wrappers": {}}, "other": 1}
    extra = {"model_options": options, "seed": 5}
    new = time_input.with_time_ratio(extra, ratios)
    assert new["seed"] == 5 and new["model_options"] is not options
    assert options == {"transformer_options": {"wrappers": {}}, "other": 1}
    again = time_input.with_time_ratio(new, ratios)                       # never two of ours
    wrappers = again["model_options"]["transformer_options"]["wrappers"]["diffusion_model"]
    assert len(wrappers[time_input.WRAPPER_KEY]) == 1


# the fit ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["eps", "flow"])
def calibration(request):
    """Student sigmas (5 steps), calibration noise, and the targets: a 100-step teacher at the student sigmas."""
    model = gmm.build_model(request.param)
    schedule = NoiseSchedule.from_model_sampling(model.get_model_object("model_sampling"))
    student = _sigmas(model)
    grid = teacher_sigmas(schedule, 100, through=student)
    noise = _noise(8, 0)
    trajectory = Trajectory(grid)
    _run(model, comfy.samplers.KSAMPLER(sample_teacher, extra_options={"schedule": schedule, "trajectory": trajectory}),
         grid, noise)
    targets = []
    for s in student[1:]:
        targets.append(trajectory.final if s == 0 else trajectory.states[int(torch.nonzero(grid == s)[0, 0])])
    return request.param, model, student, noise, targets


@pytest.mark.parametrize("name", ["ddim"])      # euler: the same sampler function (the memo test runs it)
def test_sequential_tuning_lowers_every_step_error(calibration, name):
    family, model, sigmas, noise, targets = calibration
    result = {}
    final = _run(model, _tuner(name, targets, result), sigmas, noise)
    base = _run(model, comfy.samplers.sampler_object(name), sigmas, noise)
    ratios = result["ratios"]
    assert ratios.dtype == torch.float64 and ratios.shape == (STEPS,)
    assert torch.all((ratios >= 0.7) & (ratios <= 1.3))
    assert bool(torch.any(ratios != 1))
    assert rmse(base, targets[-1]) == pytest.approx(result["errors_nominal"][-1], rel=1e-5)
    assert rmse(final, targets[-1]) == pytest.approx(result["errors_final"][-1], rel=1e-5)
    assert rmse(final, targets[-1]) < rmse(base, targets[-1])
    assert sum(result["errors_final"]) < sum(result["errors_nominal"])
    # where a ratio moved, it lowers its own step's error: measured on states of independent sampling runs (the
    # callback's), with that one ratio tuned or set back to 1, so wrong bookkeeping in the tuner shows here
    moved = [i for i in range(STEPS) if ratios[i] != 1]
    assert moved
    for i in moved:
        errors = []
        for r in (float(ratios[i]), 1.0):
            trial = ratios.clone()
            trial[i] = r
            states = []
            _run(model, _timetuner(name, tt.TimeRatios(sigmas, trial)), sigmas, noise,
                 callback=lambda step, d, x, total: states.append(x.clone()))
            errors.append(rmse(states[i + 1], targets[i]) if i + 1 < STEPS else None)
        if errors[0] is not None:
            assert errors[0] == pytest.approx(result["errors_final"][i], rel=1e-5)
            assert errors[0] < errors[1], (i, errors)
    # the fitted ratios, sampled again: the tuner's own result
    again = _run(model, _timetuner(name, tt.TimeRatios(sigmas, ratios)), sigmas, noise)
    assert torch.equal(again, final)
    assert result["evaluations"] < 30 * STEPS


@pytest.mark.parametrize("best", [0.62, 0.8, 0.97, 1.0, 1.12, 1.25, 1.4])
def test_secant_search_lands_on_the_best_ratio_of_a_linear_state_in_three_trials(best):
    """Where the state is linear in the ratio, the search lands on the ratio closest to the target (or the
    nearer bound) after 1, 1 + delta and one secant step: three trials."""
    direction = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    offset = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    target = best * direction + 1e-3 * offset
    trials = []

    def trial(r):
        trials.append(r)
        state = r * direction
        return rmse(state, target), state

    found = tt.secant_search(trial, target, (0.7, 1.3), delta=0.05, probes=1, xatol=2e-3)
    assert found == pytest.approx(min(1.3, max(0.7, best)), abs=2e-3)
    assert len(trials) <= 3 and trials[0] == 1.0


def test_memo_skips_earlier_steps_and_counts_honestly(calibration):
    """Each trial of step i costs the evaluations of step i only (euler: one), whatever i is; the count
    of evaluations is the number of network calls."""
    family, model, sigmas, noise, targets = calibration
    with _NetSpy(model) as spy:
        _run(model, comfy.samplers.sampler_object("euler"), sigmas, noise)
    net_calls_per_eval = len(spy.calls) / STEPS
    result = {}
    probes = 1
    with _NetSpy(model) as spy:
        _run(model, _tuner("euler", targets, result, probes=probes), sigmas, noise)
    assert len(spy.calls) == result["evaluations"] * net_calls_per_eval
    # the nominal run, then per step at most r = 1, 1 + delta and the search's probes, one evaluation each:
    # re-running steps 0..i-1 for every trial of step i would cost about (STEPS + 1) / 2 times as much
    assert STEPS < result["evaluations"] <= STEPS + STEPS * (probes + 2)


def test_callback_once_per_step(calibration):
    _, model, sigmas, noise, targets = calibration
    seen = []
    _run(model, _tuner("euler", targets, {}, probes=2), sigmas, noise,
         callback=lambda i, denoised, x, total: seen.append((i, total)))
    assert seen == [(i, STEPS) for i in range(STEPS)]


# models whose diffusion model ignores DIFFUSION_MODEL wrappers --------------------------------------------
def test_unsupported_diffusion_model_is_refused(monkeypatch):
    model = gmm.build_model("eps")
    net = model.model.diffusion_model
    monkeypatch.setattr(net, "forward", lambda xc, t, context=None, transformer_options={}, **kw:
                        net._forward(xc, t, context, transformer_options, **kw))     # no wrappers run
    sigmas, noise = _sigmas(model, 3), _noise(2, 5)
    with pytest.raises(ValueError, match="DIFFUSION_MODEL wrappers"):
        _run(model, _timetuner("euler", tt.TimeRatios(sigmas, [1.1, 1.0, 0.9])), sigmas, noise)
    with pytest.raises(ValueError, match="DIFFUSION_MODEL wrappers"):
        _run(model, _tuner("euler", [torch.zeros_like(noise)] * 3, {}), sigmas, noise)


def test_other_samplers_tune_without_raising_errors():
    """heun (two evaluations, the second at the next knot) and uni_pc (states reported in VP scale, a
    corrector) through the same machinery: heun closer to the targets, uni_pc's first state closer (its later
    states are moved again by the corrector of the step after, whose ratio is tuned later: greedy tuning does not
    bound them, and validation judges the whole run), results reproducible."""
    model = gmm.build_model("flow")
    sigmas, noise = _sigmas(model, 4), _noise(4, 6)
    fine = torch.cat([torch.linspace(float(a), float(b), 31)[:-1] for a, b in zip(sigmas[:-1], sigmas[1:])]
                     + [torch.zeros(1)])
    states = []
    teacher = _run(model, comfy.samplers.sampler_object("dpmpp_2m"), fine, noise,
                   callback=lambda i, d, x, total: states.append(x.clone()))
    targets = [states[30 * k] for k in range(1, 4)] + [teacher]
    for name in ("heun", "uni_pc"):
        result = {}
        final = _run(model, _tuner(name, targets, result), sigmas, noise)
        if name == "heun":
            assert sum(result["errors_final"]) < sum(result["errors_nominal"])
        assert result["errors_final"][0] < result["errors_nominal"][0], name
        again = _run(model, _timetuner(name, tt.TimeRatios(sigmas, result["ratios"])), sigmas, noise)
        assert torch.equal(again, final), name


# the trained UNet: ComfyUI's real openaimodel runs the hook ---------------------------------------------
def test_digits_unet_takes_the_time_input():
    from tinymodels import digits
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = digits.build_model("eps")
        sigmas = _sigmas(model, 3, "karras")
        noise = _noise(2, 7, digits.LATENT_SHAPE)
        base = _run(model, comfy.samplers.sampler_object("euler"), sigmas, noise, module=digits)
        same = _run(model, _timetuner("euler", tt.TimeRatios(sigmas)), sigmas, noise, module=digits)
        other = _run(model, _timetuner("euler", tt.TimeRatios(sigmas, [1.0, 0.8, 1.0])), sigmas, noise, module=digits)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(base, same)
    assert rmse(base, other) > 1e-4
