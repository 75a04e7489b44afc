"""The teacher solver: ComfyUI runs it as a sampler; it is third order, estimates its own error and records what
fits need."""
import pytest
import torch

import comfy.sample
import comfy.samplers
from calibrated_samplers.optimizers.coordinates import NoiseSchedule
from calibrated_samplers.optimizers import teacher
from calibrated_samplers.optimizers.teacher import Trajectory, rmse, sample_teacher, teacher_sigmas
from tinymodels import gmm


def _run(model, schedule, sigmas, noise, cfg=2.0, trajectory=None, sampler=None):
    labels = torch.arange(len(noise)) % 10
    sampler = sampler or comfy.samplers.KSAMPLER(
        sample_teacher, extra_options={"schedule": schedule, "trajectory": trajectory})
    return comfy.sample.sample_custom(model, noise, cfg, sampler, sigmas, gmm.conditioning(labels),
                                      gmm.null_conditioning(len(noise)), torch.zeros_like(noise),
                                      disable_pbar=True, seed=0)


@pytest.fixture(scope="module", params=["eps", "flow"])
def setup(request):
    model = gmm.build_model(request.param)
    schedule = NoiseSchedule.from_model_sampling(model.get_model_object("model_sampling"))
    noise = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    return model, schedule, noise


def test_teacher_grid(setup):
    _, schedule, _ = setup
    sigmas = teacher_sigmas(schedule, 100)
    assert len(sigmas) == 101 and sigmas[-1] == 0
    assert sigmas[0] == pytest.approx(schedule.sigma_max) and sigmas[-2] == pytest.approx(schedule.sigma_min)
    assert torch.all(sigmas[1:] < sigmas[:-1])
    with pytest.raises(ValueError, match="teacher_steps"):
        teacher_sigmas(schedule, 1)


def test_teacher_is_more_accurate_than_second_order_and_estimates_its_error(setup):
    """DPM-Solver++(3M) against (2M) at the same steps, and Richardson's estimate against the measured error."""
    model, schedule, noise = setup
    reference = _run(model, schedule, teacher_sigmas(schedule, 2000), noise)
    third = {n: _run(model, schedule, teacher_sigmas(schedule, n), noise) for n in (30, 60, 120)}
    capped = teacher.step_coefficients
    try:
        teacher.step_coefficients = lambda schedule, sigmas, order=3: capped(schedule, sigmas, 2)
        second = {n: _run(model, schedule, teacher_sigmas(schedule, n), noise) for n in (60, 120)}
    finally:
        teacher.step_coefficients = capped
    error = {n: rmse(x, reference) for n, x in third.items()}
    for n in (60, 120):
        assert error[n] < rmse(second[n], reference) / 1.8, n     # measured: 2.2-5x
        estimate = teacher.error_estimate(third[n], third[n // 2], n, n // 2)
        assert error[n] < estimate < 4 * error[n], (n, error[n], estimate)
    assert teacher.steps_for(error[120], error[60], 60) > 60


@pytest.mark.parametrize("family", ["eps", "flow"])
def test_teacher_is_comfyui_dpmpp_3m_without_noise(family):
    """Our step is exactly ComfyUI's dpmpp_3m_sde with eta 0 (which also steps in the family's lambda)."""
    model = gmm.build_model(family)
    schedule = NoiseSchedule.from_model_sampling(model.get_model_object("model_sampling"))
    noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    # (from below sigma 1: at a flow model's sigma 1, ComfyUI offsets the sigma where we step at first order)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "karras", 12)[1:]
    ours = _run(model, schedule, sigmas, noise)
    theirs = _run(model, schedule, sigmas, noise, sampler=comfy.samplers.ksampler("dpmpp_3m_sde", {"eta": 0.0}))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_trajectory_records_every_step(setup):
    model, schedule, noise = setup
    sigmas = teacher_sigmas(schedule, 20)
    trajectory = Trajectory(sigmas)
    final = _run(model, schedule, sigmas, noise, trajectory=trajectory)
    assert len(trajectory.states) == len(trajectory.denoised) == 20
    torch.testing.assert_close(trajectory.final, final)
    ms = model.get_model_object("model_sampling")
    start = ms.noise_scaling(sigmas[:1], noise, torch.zeros_like(noise), max_denoise=True)
    torch.testing.assert_close(trajectory.states[0], start)
    torch.testing.assert_close(trajectory.denoised[-1], final)     # the last step to 0 is x = D
    assert trajectory.nbytes() == 2 * 20 * noise.numel() * 4


def test_trajectory_storage_follows_the_budget():
    sigmas = torch.linspace(1, 0, 1001)
    sdxl = 4 * 128 * 128 * 16
    assert Trajectory.for_budget(sigmas, sdxl).store_dtype == torch.float16
    assert Trajectory.for_budget(sigmas, 4 * 8 * 8 * 16).store_dtype == torch.float32


def test_states_are_the_stated_linear_combinations(setup):
    model, schedule, noise = setup
    from calibrated_samplers.optimizers.teacher import state_combinations
    sigmas = teacher_sigmas(schedule, 30)
    trajectory = Trajectory(sigmas)
    _run(model, schedule, sigmas, noise, trajectory=trajectory)
    m = state_combinations(schedule, sigmas)
    basis = torch.stack([trajectory.states[0]] + trajectory.denoised).double().flatten(1)
    states = torch.stack(trajectory.states + [trajectory.final]).double().flatten(1)
    torch.testing.assert_close(m @ basis, states, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["eps", "flow"])
def test_teacher_grid_through_student_sigmas(family):
    model = gmm.build_model(family)
    ms = model.get_model_object("model_sampling")
    schedule = NoiseSchedule.from_model_sampling(ms)
    student = comfy.samplers.calculate_sigmas(ms, "karras", 5)
    sigmas = teacher_sigmas(schedule, 100, through=student)
    assert torch.all(sigmas[1:] < sigmas[:-1]) and sigmas[-1] == 0 and 90 <= len(sigmas) - 1 <= 105
    for s in student:
        assert torch.isclose(sigmas, s.float(), rtol=1e-6, atol=0).any(), float(s)
    with pytest.raises(ValueError, match="decreases strictly"):
        teacher_sigmas(schedule, 100, through=student.flip(0))


def test_state_at_between_teacher_steps():
    """A coarse teacher's state_at lands on a fine teacher's states: recorded, between steps, and at 0."""
    model = gmm.build_model("eps")
    schedule = NoiseSchedule.from_model_sampling(model.get_model_object("model_sampling"))
    noise = torch.randn(4, *gmm.LATENT_SHAPE, generator=torch.Generator().manual_seed(5))
    fine_sigmas = teacher_sigmas(schedule, 400)
    fine, coarse = Trajectory(fine_sigmas), Trajectory(fine_sigmas[::2].contiguous())
    for trajectory in (fine, coarse):
        sampler = comfy.samplers.KSAMPLER(sample_teacher, extra_options={"schedule": schedule,
                                                                         "trajectory": trajectory})
        comfy.sample.sample_custom(model, noise, 2.0, sampler, trajectory.sigmas, gmm.conditioning([3]),
                                   gmm.null_conditioning(), torch.zeros_like(noise), disable_pbar=True, seed=0)
    assert torch.equal(coarse.state_at(schedule, coarse.sigmas[10]), coarse.states[10].float())
    assert torch.equal(coarse.state_at(schedule, 0.0), coarse.final)
    for k in (21, 151, 301):       # odd fine indices lie between coarse steps
        between = coarse.state_at(schedule, fine.sigmas[k])
        nearest = coarse.states[(k - 1) // 2].float()
        assert (between - fine.states[k]).abs().max() < 0.1 * (nearest - fine.states[k]).abs().max()
    with pytest.raises(ValueError, match="outside"):
        coarse.state_at(schedule, float(fine_sigmas[0]) * 2)
