"""OLSS (Duan et al. 2023): Gram-matrix least squares, path search and the sampler, on the closed-form
mixture models run through real ComfyUI."""
import math

import pytest
import torch

import comfy.sample
import comfy.samplers
from calibrated_samplers.optimizers import olss
from calibrated_samplers.optimizers.coordinates import NoiseSchedule
from calibrated_samplers.optimizers.teacher import (Trajectory, rmse, sample_teacher, state_combinations,
                                                    teacher_sigmas)
from tinymodels import gmm

CFG = 2.0


def _run(model, sampler, sigmas, noise, callback=None, labels=None):
    labels = torch.arange(len(noise)) % 10 if labels is None else labels
    return comfy.sample.sample_custom(model, noise, CFG, sampler, sigmas, gmm.conditioning(labels),
                                      gmm.null_conditioning(len(noise)), torch.zeros_like(noise),
                                      disable_pbar=True, seed=0, callback=callback)


def _noise(batch, seed):
    return torch.randn(batch, *gmm.LATENT_SHAPE, generator=torch.Generator().manual_seed(seed))


def _teacher(model, schedule, steps, noise, labels=None):
    sigmas = teacher_sigmas(schedule, steps)
    trajectory = Trajectory(sigmas)
    _run(model, comfy.samplers.KSAMPLER(sample_teacher, extra_options={"schedule": schedule, "trajectory": trajectory}),
         sigmas, noise, labels=labels)
    return trajectory


def _olss_sampler(coefficients, resolve=None):
    return comfy.samplers.KSAMPLER(olss.sample_olss, extra_options={"coefficients": coefficients, "resolve": resolve})


TEACHER_STEPS = 120
CALIBRATION, HELD_OUT = 8, 16


@pytest.fixture(scope="module", params=["eps", "v_prediction", "flow"])
def calibrated(request):
    """One teacher run on calibration noise and held-out noise together (ComfyUI's per-step cost
    barely depends on the batch): the fits see only the calibration rows."""
    model = gmm.build_model(request.param)
    schedule = NoiseSchedule.from_model_sampling(model.get_model_object("model_sampling"))
    noise = torch.cat([_noise(CALIBRATION, 0), _noise(HELD_OUT, 10_000)])
    labels = torch.cat([torch.arange(CALIBRATION), torch.arange(HELD_OUT)]) % 10
    both = _teacher(model, schedule, TEACHER_STEPS, noise, labels)
    trajectory = Trajectory(both.sigmas, both.store_dtype, [x[:CALIBRATION] for x in both.states],
                            [d[:CALIBRATION] for d in both.denoised], both.final[:CALIBRATION])
    held_out = (noise[CALIBRATION:], both.final[CALIBRATION:])
    return request.param, model, schedule, trajectory, olss.trajectory_gram(trajectory, schedule), held_out


def _assert_valid_path(path, steps, teacher_steps):
    assert len(path) == steps and path[0] == 0 and path[-1] < teacher_steps
    assert all(b > a for a, b in zip(path, path[1:])), path


# (a) -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["eps", "flow"])
def test_identity_path_reproduces_the_teacher(family):
    model = gmm.build_model(family)
    schedule = NoiseSchedule.from_model_sampling(model.get_model_object("model_sampling"))
    noise = _noise(4, 1)
    trajectory = _teacher(model, schedule, 60, noise)
    coefficients = olss.fit_olss(olss.trajectory_gram(trajectory, schedule), range(60))
    assert float(coefficients.errors.max()) < 1e-5
    torch.testing.assert_close(coefficients.sigmas, trajectory.sigmas)

    states = []
    final = _run(model, _olss_sampler(coefficients), coefficients.sigmas, noise,
                 callback=lambda i, denoised, x, total: states.append(x.clone()))
    for mine, teachers in zip(states, trajectory.states):
        torch.testing.assert_close(mine, teachers, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(final, trajectory.final, rtol=1e-4, atol=1e-4)


# (b) -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("steps", [4, 5, 8])
def test_fit_never_loses_to_ddim_on_the_same_path(calibrated, steps):
    _, _, schedule, _, gram, _ = calibrated
    for path in (olss.uniform_path(TEACHER_STEPS, steps), olss.search_path(gram, steps)):
        fit = olss.fit_olss(gram, path)
        ddim = olss.step_errors(gram, path, *olss.ddim_coefficients(schedule, fit.sigmas))
        assert torch.all(fit.errors <= ddim * (1 + 1e-9) + 1e-12), (path, fit.errors, ddim)
        assert float(fit.errors.sum()) < float(ddim.sum())


def test_ddim_coefficients_are_comfyui_ddim():
    """In the OLSS basis, the first-order coefficients sample exactly like ComfyUI's ddim."""
    model = gmm.build_model("eps")
    schedule = NoiseSchedule.from_model_sampling(model.get_model_object("model_sampling"))
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "karras", 6)
    weights_x, weights_d = olss.ddim_coefficients(schedule, sigmas)
    coefficients = olss.OLSSCoefficients(tuple(range(6)), sigmas, weights_x, weights_d, torch.zeros(6))
    noise = _noise(4, 2)
    ours = _run(model, _olss_sampler(coefficients), sigmas, noise)
    theirs = _run(model, comfy.samplers.sampler_object("ddim"), sigmas, noise)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


# (c) -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("steps", [4, 5, 8])
def test_path_search_beats_the_uniform_path(calibrated, steps):
    _, _, _, _, gram, _ = calibrated
    uniform = olss.fit_olss(gram, olss.uniform_path(TEACHER_STEPS, steps))
    path = olss.search_path(gram, steps, keep_uniform_if_better=False)   # the search alone
    _assert_valid_path(path, steps, TEACHER_STEPS)
    assert float(olss.fit_olss(gram, path).errors.max()) <= float(uniform.errors.max())


def test_short_greedy_paths_are_filled_to_the_requested_steps(calibrated):
    _, _, _, _, gram, _ = calibrated
    bound = float(olss.fit_olss(gram, [0]).errors.max()) * (1 + 1e-6)
    short = olss._greedy_path(gram, 6, bound)
    assert short == [0]                                  # one step reaches the end within this bound
    filled = olss._fill_path(gram, short, 6)
    _assert_valid_path(filled, 6, TEACHER_STEPS)
    assert float(olss.fit_olss(gram, filled).errors.max()) <= bound
    assert olss._greedy_path(gram, 6, 0.0) is None       # an infeasible bound


def test_search_with_as_many_steps_as_the_teacher_is_the_identity(calibrated):
    _, _, _, _, gram, _ = calibrated
    assert olss.search_path(gram, TEACHER_STEPS) == list(range(TEACHER_STEPS))
    with pytest.raises(ValueError, match="steps"):
        olss.search_path(gram, TEACHER_STEPS + 1)


def test_path_validation(calibrated):
    _, _, _, _, gram, _ = calibrated
    for bad in ([], [1, 5], [0, 5, 5], [0, TEACHER_STEPS]):
        with pytest.raises(ValueError, match="path"):
            olss.fit_olss(gram, bad)


# (d) -------------------------------------------------------------------------------------------------
def test_gram_least_squares_is_direct_least_squares(calibrated):
    family, _, schedule, trajectory, gram, _ = calibrated
    basis = torch.stack([trajectory.states[0]] + trajectory.denoised).double().flatten(1)     # [T + 1, L]
    torch.testing.assert_close(gram.gram, basis @ basis.T, rtol=1e-10, atol=1e-8)
    states = state_combinations(schedule, trajectory.sigmas) @ basis
    final_norm = states[-1].norm()
    for path, i in (([0, 30, 70, 110], 2), ([0, 30, 70, 110], 3), ([0, 3, 9], 0)):
        columns, target = olss._step_problem(path, i, TEACHER_STEPS)
        direct = torch.linalg.lstsq(basis[columns].T, states[target][:, None], driver="gelsd").solution[:, 0]
        w, error = gram.least_squares(columns, [target])
        torch.testing.assert_close(w[:, 0], direct, rtol=1e-6, atol=1e-6 * float(direct.abs().max()))
        residual = (states[target] - direct @ basis[columns]).norm()
        scale = float(schedule.native_scale(trajectory.sigmas[target].double()))
        assert float(error[0]) == pytest.approx(float(residual * scale / final_norm), rel=1e-5, abs=1e-9)


def test_float32_blocks_match_the_float64_gram():
    g = torch.Generator().manual_seed(3)
    vectors = [torch.randn(3, 40, 40, generator=g).half() for _ in range(300)]    # 2 blocks, 5 chunks
    exact = olss.gram_matrix(vectors, compute_dtype=torch.float64)
    blocked = olss.gram_matrix(vectors, chunk_bytes=300 * 4 * 1000, compute_dtype=torch.float32)
    flat = torch.stack(vectors).double().flatten(1)
    torch.testing.assert_close(exact, flat @ flat.T, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(blocked, exact, rtol=0, atol=1e-5 * float(exact.diagonal().max()))
    assert torch.equal(blocked, blocked.T)


# (e) -------------------------------------------------------------------------------------------------
def test_batch_of_one_with_more_steps_than_pixels_gives_finite_coefficients(calibrated):
    """One sample, one channel: 121 basis vectors of length 64. The teacher's recurrence acts on each
    element alone, so any slice of a teacher run is a teacher run."""
    _, _, schedule, trajectory, _, _ = calibrated
    one = Trajectory(trajectory.sigmas, trajectory.store_dtype, [x[:1, :1] for x in trajectory.states],
                     [d[:1, :1] for d in trajectory.denoised], trajectory.final[:1, :1])
    gram = olss.trajectory_gram(one, schedule)
    assert torch.linalg.matrix_rank(gram.gram) <= 64
    for coefficients in (olss.fit_olss(gram, range(TEACHER_STEPS)), olss.fit_olss(gram, olss.search_path(gram, 6))):
        for tensor in (coefficients.weights_x, coefficients.weights_d, coefficients.errors):
            assert torch.isfinite(tensor).all()
        assert float(coefficients.errors.max()) < 0.1


def test_duplicated_and_zero_vectors_give_finite_coefficients():
    schedule = NoiseSchedule("eps", 0.03, 14.6)
    sigmas = teacher_sigmas(schedule, 10)
    trajectory = Trajectory(sigmas)
    x = _noise(2, 5) * float(sigmas[0])
    same = torch.tanh(_noise(2, 6))
    outputs = [same] * 5 + [torch.zeros_like(same)] * 2 + [same * 0.5] * 3
    for d in outputs:
        trajectory.record(x, d)
    trajectory.final = outputs[-1]
    gram = olss.trajectory_gram(trajectory, schedule)
    for path in (range(10), [0, 5, 6], olss.search_path(gram, 4)):
        coefficients = olss.fit_olss(gram, path)
        assert all(torch.isfinite(t).all() for t in (coefficients.weights_x, coefficients.weights_d, coefficients.errors))
        assert float(coefficients.weights_d.abs().max()) < 1e6


# (f) -------------------------------------------------------------------------------------------------
def test_olss_beats_dpmpp_2m_karras_at_five_evaluations(calibrated):
    family, model, _, _, gram, (held_out, reference) = calibrated
    coefficients = olss.fit_olss(gram, olss.search_path(gram, 5))
    calls = []
    counted = model.clone()
    counted.set_model_sampler_post_cfg_function(lambda args: calls.append(1) or args["denoised"])
    ours = rmse(_run(counted, _olss_sampler(coefficients), coefficients.sigmas, held_out), reference)
    assert len(calls) == 5
    karras = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "karras", 5)
    theirs = rmse(_run(model, comfy.samplers.sampler_object("dpmpp_2m"), karras, held_out), reference)
    assert math.isfinite(ours) and ours < 0.5 * theirs, (family, ours, theirs)


def test_sampler_refuses_other_sigmas(calibrated):
    _, model, _, _, gram, _ = calibrated
    coefficients = olss.fit_olss(gram, olss.uniform_path(TEACHER_STEPS, 4))
    sigmas = coefficients.sigmas.clone()
    sigmas[1] *= 1.1
    with pytest.raises(ValueError, match="sigmas"):
        _run(model, _olss_sampler(coefficients), sigmas, _noise(2, 7))
    with pytest.raises(ValueError, match="coefficients"):
        olss.sample_olss(None, torch.zeros(1), sigmas)


# (g) -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("steps", [4, 6])
def test_sequential_resolve_lowers_every_step_and_the_calibration_error(calibrated, steps):
    """Re-solving each step on the student's own outputs (SequentialResolve) never raises a step's error from
    the same state, does not raise the final error on the calibration batch, and the coefficients it writes back
    replay its run. (Whether that generalises is for cross-validation to say: see the next test.)"""
    _, model, schedule, trajectory, gram, _ = calibrated
    prior = olss.fit_olss(gram, olss.search_path(gram, steps))
    ours = prior.copy()
    resolve = _resolve(schedule, trajectory, prior)
    noise = _noise(CALIBRATION, 0)
    fitted = _run(model, _olss_sampler(ours, resolve), prior.sigmas, noise)
    assert len(resolve.errors) == len(resolve.prior_errors) == steps
    assert all(after <= before * (1 + 1e-9) for before, after in zip(resolve.prior_errors, resolve.errors))
    assert not torch.equal(ours.weights_d, prior.weights_d)
    assert torch.allclose(_run(model, _olss_sampler(ours), ours.sigmas, noise), fitted, atol=1e-5)
    assert rmse(fitted, trajectory.final) <= rmse(_run(model, _olss_sampler(prior), prior.sigmas, noise),
                                                    trajectory.final) * (1 + 1e-6)


def test_resolve_on_some_rows_ignores_the_others(calibrated):
    """With `rows`, only those samples enter the fit, so the other half can measure it held out; with
    `keep_prior` nothing is re-solved."""
    _, model, schedule, trajectory, gram, _ = calibrated
    prior = olss.fit_olss(gram, olss.search_path(gram, 4))
    rows = list(range(0, CALIBRATION, 2))
    fits = []
    for seed in (0, 1):
        noise = _noise(CALIBRATION, 0)
        noise[1::2] = _noise(CALIBRATION // 2, 100 + seed)       # other samples off the fitted rows
        ours = prior.copy()
        _run(model, _olss_sampler(ours, _resolve(schedule, trajectory, prior, rows=rows)), prior.sigmas, noise)
        fits.append(ours.weights_d)
    assert torch.allclose(fits[0], fits[1], rtol=1e-9, atol=1e-12) and not torch.equal(fits[0], prior.weights_d)
    kept = prior.copy()
    measured = _resolve(schedule, trajectory, prior, keep_prior=True)
    _run(model, _olss_sampler(kept, measured), prior.sigmas, _noise(CALIBRATION, 0))
    assert torch.equal(kept.weights_d, prior.weights_d) and len(measured.errors) == 4


def _resolve(schedule, trajectory, c, **options):
    sigmas = c.sigmas.double()[1:].tolist()
    return olss.SequentialResolve([trajectory.state_at(schedule, s) for s in sigmas], [1.0] * len(sigmas), **options)
