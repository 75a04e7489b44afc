"""DM-NonUniform time-step optimization (optimizers/trust_region.py): the surrogate objective against
the released code's numbers on the SD1.5/SDXL schedule, its analytic gradient, parity and speed of
the optimizer, every model family, and the samplers' order patterns."""
import time

import numpy as np
import pytest
import torch

import comfy.model_sampling as cms
from calibrated_samplers.optimizers import trust_region as tr
from calibrated_samplers.optimizers.coordinates import NoiseSchedule
from host import SD15_BETAS

BETAS = SD15_BETAS
_ALPHAS_CUMPROD = np.cumprod(1 - BETAS)
_SIGMAS = np.sqrt((1 - _ALPHAS_CUMPROD) / _ALPHAS_CUMPROD)
SD = NoiseSchedule("eps", float(_SIGMAS[0]), float(_SIGMAS[-1]))

# The released code run as shipped (truncNum = 3, p = 2, 'unif_t' start), METHODS.md 1.3:
# objective at its result, and at its uniform-t start.
ORIGINAL = {4: 15.0579, 5: 13.4804, 6: 11.3782, 7: 8.5707, 8: 6.7151, 9: 4.8186, 10: 4.7460,
            12: 4.4743, 15: 4.1139}
UNIFORM_T_START = {4: 21.1146, 5: 18.8033, 6: 16.4040, 7: 12.8113, 8: 11.5163, 9: 10.4849,
                   10: 9.6681, 12: 8.4694, 15: 7.3117}
# its schedules (4 decimals; the last entry is sigma_min)
ORIGINAL_SIGMAS = {
    5: [14.6146, 2.2890, 1.0732, 0.5889, 0.2952],
    10: [14.6146, 6.7767, 4.5534, 3.6468, 2.6589, 1.7478, 1.0359, 0.5759, 0.3377, 0.1645],
}


def uniform_t(steps):
    return tr.discrete_vp_uniform_t_sigmas(BETAS, steps)


def parity_lambdas(steps, **kwargs):
    return tr.optimize_lambdas(SD, steps, "original", uniform_t(steps), error_exponent=2,
                               trunc_num=3, **kwargs)


def parity_objective(lam):
    return tr.objective(lam, SD, "original", p=2, trunc_num=3)


# ----------------------------------------------------------------------------------------------
def test_sd_schedule_matches_comfyui():
    assert SD.sigma_min == pytest.approx(0.0291675, abs=1e-6)
    assert SD.sigma_max == pytest.approx(14.614642, abs=1e-5)
    sigmas = uniform_t(10)
    assert sigmas[0] == pytest.approx(SD.sigma_max, rel=1e-12)       # t = 1 is training step 999
    assert sigmas[-1] == pytest.approx(SD.sigma_min, rel=1e-12)      # t = 1e-3 is step 0
    assert np.all(np.diff(sigmas) < 0)


@pytest.mark.parametrize("steps", sorted(UNIFORM_T_START))
def test_objective_at_uniform_t_start(steps):
    lam = tr.initial_lambdas(SD, steps, uniform_t(steps))
    assert parity_objective(lam) == pytest.approx(UNIFORM_T_START[steps], abs=1e-4)


@pytest.mark.parametrize("steps, value, tol", [(5, 13.4804, 1e-3), (10, 4.7460, 5e-3)])
def test_objective_at_original_schedules(steps, value, tol):
    # the schedules are given to 4 decimals: at N = 10 that moves the objective by up to 5e-3
    sigmas = np.array(ORIGINAL_SIGMAS[steps] + [SD.sigma_min])
    sigmas[0] = SD.sigma_max
    assert parity_objective(SD.lambda_(sigmas)) == pytest.approx(value, abs=tol)


SCHEDULES = {
    "eps": NoiseSchedule("eps", SD.sigma_min, SD.sigma_max),
    "v_prediction": NoiseSchedule("v_prediction", 0.0292, 14.6146),
    "edm": NoiseSchedule("edm", 0.002, 80.0),
    "flow": NoiseSchedule("flow", 0.003, 0.997),
}


@pytest.mark.parametrize("family", sorted(SCHEDULES))
@pytest.mark.parametrize("solver, steps, trunc_num", [
    ("original", 5, 3), ("uni_pc", 9, 0), ("uni_pc", 12, 3), ("dpmpp_2m", 7, 3), ("dpmpp_2m", 10, 0),
    ("euler", 6, 3), ([1, 2, 2, 3, 3, 1], 6, 2)])
def test_gradient_matches_finite_differences(family, solver, steps, trunc_num):
    schedule = SCHEDULES[family]
    rng = np.random.default_rng(steps)
    lam = np.sort(rng.uniform(schedule.lambda_min, schedule.lambda_max, steps + 1))
    lam[0], lam[-1] = schedule.lambda_min, schedule.lambda_max
    for p, smoothing in [(2, 0.0), (1, 1e-2)]:
        f, grad = tr.objective_and_gradient(lam, schedule, solver, p, trunc_num, smoothing)
        if smoothing == 0:
            assert f == pytest.approx(tr.objective(lam, schedule, solver, p, trunc_num), rel=1e-12)
        fd = np.empty_like(lam)
        for i in range(lam.size):
            e = np.zeros_like(lam)
            e[i] = 1e-6
            fd[i] = (tr.objective_and_gradient(lam + e, schedule, solver, p, trunc_num, smoothing)[0]
                     - tr.objective_and_gradient(lam - e, schedule, solver, p, trunc_num, smoothing)[0]) / 2e-6
        assert np.max(np.abs(fd - grad)) <= 1e-6 * np.max(np.abs(grad))


def test_objective_rejects_bad_grids():
    lam = tr.initial_lambdas(SD, 5, "uniform_lambda")
    with pytest.raises(ValueError):
        tr.objective(lam[::-1], SD, "uni_pc")
    with pytest.raises(ValueError):
        tr.objective(lam[:-1], SD, [1, 2, 3, 2, 1])
    with pytest.raises(ValueError):
        tr.objective(lam, SD, [2, 2, 3, 2, 1])                      # step 0 has no history


# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def parity_runs():
    """N -> (lambdas, fastest of two timings) in the parity setting, N = 4..15. Timed in this process's
    CPU seconds, so that other jobs on a loaded machine do not count against the optimizer."""
    runs = {}
    parity_lambdas(6)                                               # imports, caches
    for steps in range(4, 16):
        times = []
        for _ in range(2):
            start = time.process_time()
            lam = parity_lambdas(steps)
            times.append(time.process_time() - start)
        runs[steps] = (lam, min(times))
    return runs


def test_parity_with_original(parity_runs):
    for steps, value in ORIGINAL.items():
        lam = parity_runs[steps][0]
        assert lam[0] == SD.lambda_min and lam[-1] == SD.lambda_max
        assert np.all(np.diff(lam) > 0)
        assert parity_objective(lam) <= 1.005 * value, steps
    for steps, (lam, _) in parity_runs.items():                    # never worse than the start
        assert parity_objective(lam) <= parity_objective(tr.initial_lambdas(SD, steps, uniform_t(steps)))


def test_speed(parity_runs):
    times = [t for _, t in parity_runs.values()]
    assert np.median(times) < 0.25, times
    assert max(times) < 1.0, times


@pytest.mark.parametrize("steps", [5, 7, 10])
def test_trust_constr_alone_reaches_parity(steps):
    lam = parity_lambdas(steps, warm_start=False)
    assert parity_objective(lam) <= 1.005 * ORIGINAL[steps]


# ----------------------------------------------------------------------------------------------
def _comfy_schedule(prediction, sampling, **settings):
    class ModelSampling(sampling, prediction):
        pass

    class Config:
        sampling_settings = settings
    return NoiseSchedule.from_model_sampling(ModelSampling(Config()))


COMFY_SCHEDULES = {
    "eps": lambda: _comfy_schedule(cms.EPS, cms.ModelSamplingDiscrete),
    "v_prediction": lambda: _comfy_schedule(cms.V_PREDICTION, cms.ModelSamplingDiscrete),
    "edm": lambda: _comfy_schedule(cms.EDM, cms.ModelSamplingContinuousEDM, sigma_min=0.002,
                                   sigma_max=80.0),
    "flow": lambda: _comfy_schedule(cms.CONST, cms.ModelSamplingDiscreteFlow, shift=3.0,
                                    multiplier=1000),
    "flux": lambda: _comfy_schedule(cms.CONST, cms.ModelSamplingFlux, shift=1.15),
}


@pytest.mark.parametrize("family", sorted(COMFY_SCHEDULES))
def test_every_family_gives_a_valid_schedule(family):
    schedule = COMFY_SCHEDULES[family]()
    for solver, steps, init in [("uni_pc", 1, "uniform_lambda"), ("uni_pc", 2, "karras"),
                                ("uni_pc", 5, "uniform_lambda"), ("dpmpp_2m", 8, "karras"),
                                ("euler", 12, "uniform_lambda"), ("uni_pc_bh2", 12, "karras")]:
        for final_zero in (True, False):
            sigmas = tr.time_step_sigmas(schedule, steps, solver, init, final_sigma_zero=final_zero)
            assert sigmas.shape == (steps + 1,)
            assert np.all(np.isfinite(sigmas)) and np.all(np.diff(sigmas) < 0), (solver, steps, sigmas)
            assert sigmas[0] == schedule.sigma_max
            assert sigmas[-1] == (0.0 if final_zero else schedule.sigma_min)
            if steps > 1:
                assert np.all(sigmas[1:-1] < schedule.sigma_max)
                assert np.all(sigmas[1:-1] > schedule.sigma_min)


def test_optimization_improves_every_family():
    for family, make in COMFY_SCHEDULES.items():
        schedule = make()
        for solver, steps in [("uni_pc", 6), ("dpmpp_2m", 10), ("euler", 10)]:
            lam = tr.optimize_lambdas(schedule, steps, solver)
            start = tr.initial_lambdas(schedule, steps, "uniform_lambda")
            if not np.isfinite(lam[0]):                              # flow from sigma = 1
                lam = lam.copy()
                lam[0] = start[0]
            assert tr.objective(lam, schedule, solver) < tr.objective(start, schedule, solver), family


# ----------------------------------------------------------------------------------------------
def test_initial_grids():
    for init in ("uniform_lambda", "karras", uniform_t(8), uniform_t):
        lam = tr.initial_lambdas(SD, 8, init)
        assert lam.shape == (9,) and np.all(np.diff(lam) > 0)
        assert lam[0] == SD.lambda_min and lam[-1] == SD.lambda_max
    karras = SD.sigma_of_lambda(tr.initial_lambdas(SD, 4, "karras"))
    ramp = np.linspace(0, 1, 5)
    want = (SD.sigma_max ** (1 / 7) + ramp * (SD.sigma_min ** (1 / 7) - SD.sigma_max ** (1 / 7))) ** 7
    np.testing.assert_allclose(karras, want, rtol=1e-12)
    with_zero = uniform_t(6)
    with_zero[-1] = 0.0                                             # ComfyUI schedules end at 0
    np.testing.assert_allclose(tr.initial_lambdas(SD, 6, with_zero), tr.initial_lambdas(SD, 6, uniform_t(6)))
    with pytest.raises(ValueError, match="uniform_t"):
        tr.initial_lambdas(SD, 6, "uniform_t")
    with pytest.raises(ValueError):
        tr.initial_lambdas(SD, 6, uniform_t(5))
    with pytest.raises(ValueError):
        tr.initial_lambdas(SD, 6, uniform_t(6)[::-1])


def test_trunc_num_rule():
    assert [tr.default_trunc_num(n) for n in (2, 7, 8, 20)] == [3, 3, 0, 0]
    lam = parity_lambdas(5)
    np.testing.assert_allclose(                                     # None -> 3 at N <= 7
        tr.optimize_lambdas(SD, 5, "original", uniform_t(5)), lam)


# ----------------------------------------------------------------------------------------------
def test_order_patterns():
    assert tr.solver_orders("uni_pc", 1) == [1]
    assert tr.solver_orders("uni_pc", 2) == [1, 1]
    assert tr.solver_orders("uni_pc", 3) == [1, 2, 1]
    assert tr.solver_orders("uni_pc", 4) == [1, 2, 2, 1]
    assert tr.solver_orders("uni_pc_bh2", 7) == [1, 2, 3, 3, 3, 2, 1]
    for steps in range(2, 20):
        assert tr.solver_orders("original", steps) == tr.solver_orders("uni_pc", steps)
    assert tr.solver_orders("dpmpp_2m", 5) == [1, 2, 2, 2, 1]
    assert tr.solver_orders("dpmpp_2m", 5, final_sigma_zero=False) == [1, 2, 2, 2, 2]
    assert tr.solver_orders("dpmpp_2m", 1) == [1]
    assert tr.solver_orders("euler", 4) == tr.solver_orders("ddim", 4) == [1, 1, 1, 1]
    for solver in ("heun", "dpmpp_2m_sde", "lms", "ipndm"):
        with pytest.raises(ValueError, match="does not model"):
            tr.solver_orders(solver, 8)
        with pytest.raises(ValueError):
            tr.optimize_lambdas(SD, 8, solver)


@pytest.mark.parametrize("variant", ["bh1", "bh2"])
def test_uni_pc_orders_match_comfyui(monkeypatch, variant):
    """Run ComfyUI's own UniPC and record the order of every update it makes."""
    from comfy.extra_samplers import uni_pc
    seen = []
    update = uni_pc.UniPC.multistep_uni_pc_update

    def recording(self, x, model_prev_list, t_prev_list, t, order, **kwargs):
        seen.append(order)
        return update(self, x, model_prev_list, t_prev_list, t, order, **kwargs)

    monkeypatch.setattr(uni_pc.UniPC, "multistep_uni_pc_update", recording)
    for steps in range(2, 12):
        seen.clear()
        sigmas = torch.tensor(np.append(np.geomspace(SD.sigma_max, SD.sigma_min, steps), 0.0),
                              dtype=torch.float32)                  # the orders ignore the values
        uni_pc.sample_unipc(lambda x, s, **kw: torch.zeros_like(x), torch.randn(1, 1, 2, 2), sigmas,
                            extra_args={}, disable=True, variant=variant)
        assert seen == tr.solver_orders("uni_pc", steps), steps
