"""Property tests (hypothesis): the optimizers under random but valid schedules, shapes and batch sizes,
on a denoiser known in closed form (data ~ N(mu, s^2 I) per pixel: D(x, sigma) is exact).

Invariants: plain coefficients reproduce ComfyUI's own solver bit for bit; fitting (IIA, OLSS) never
raises a step's error on the calibration batch above the plain solver's; everything stays finite;
TimeRatios is exact at its knots and stays between its neighbouring values."""
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from calibrated_samplers.optimizers import iia, olss
from calibrated_samplers.optimizers.coordinates import NoiseSchedule
from calibrated_samplers.optimizers.teacher import Trajectory, sample_teacher, teacher_sigmas
from calibrated_samplers.optimizers.timetuner import TimeRatios
from comfy.k_diffusion import sampling

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class GaussianDenoiser:
    """Exact E[x0 | x] for x = x0 + sigma n (ComfyUI's EPS space), x0 ~ N(mu, s^2) per pixel."""

    def __init__(self, mu, s):
        self.mu, self.s2 = mu, s * s

    def __call__(self, x, sigma, **unused):
        sigma = sigma.reshape(-1, *[1] * (x.ndim - 1))
        return self.mu + self.s2 / (self.s2 + sigma ** 2) * (x - self.mu)


@st.composite
def problems(draw):
    steps = draw(st.integers(1, 7))
    top = draw(st.floats(1.0, 14.6))
    cuts = sorted(set(draw(st.lists(st.floats(0.0, 1.0), min_size=steps - 1, max_size=steps - 1))))
    lows = [0.03 * (top / 0.03) ** (1 - c) for c in cuts]
    sigmas = sorted({top, *lows}, reverse=True)
    sigmas = torch.tensor([*sigmas, 0.0], dtype=torch.float32)
    if torch.any(sigmas[1:-1] >= sigmas[:-2]) or len(sigmas) < 2:
        sigmas = torch.tensor([top, 0.0])
    batch = draw(st.integers(1, 4))
    shape = (batch, draw(st.integers(1, 3)), draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    seed = draw(st.integers(0, 2 ** 16))
    mu = draw(st.floats(-1.0, 1.0))
    s = draw(st.floats(0.2, 2.0))
    return sigmas, shape, seed, GaussianDenoiser(mu, s)


SCHEDULE = NoiseSchedule("eps", 0.0292, 14.6146)


@SETTINGS
@given(problems(), st.sampled_from(iia.VARIANTS))
def test_plain_iia_is_the_plain_solver(problem, variant):
    sigmas, shape, seed, model = problem
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * sigmas[0]
    plain = iia.plain_coefficients(variant, sigmas)
    got = iia.sample_iia(model, x, sigmas, schedule=SCHEDULE, variant=variant, coefficients=plain)
    solver = sampling.sample_euler if variant == "iia_ddim" else sampling.sample_heun
    assert torch.equal(got, solver(model, x, sigmas, disable=True))


@SETTINGS
@given(problems(), st.sampled_from(iia.VARIANTS), st.integers(2, 5), st.integers(0, 2))
def test_iia_fits_never_raise_a_step_error_and_stay_finite(problem, variant, m, r):
    sigmas, shape, seed, model = problem
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * sigmas[0]
    fit = iia.IIAFit(m=m)
    out = iia.sample_iia(model, x, sigmas, schedule=SCHEDULE, variant=variant, r=r, fit=fit)
    assert torch.isfinite(out).all()
    coefficients = torch.stack(fit.coefficients)
    assert torch.isfinite(coefficients).all()
    assert coefficients.shape == (len(sigmas) - 1, iia.coefficient_count(variant, r))
    for before, after in zip(fit.plain_error, fit.fit_error):
        if before is not None:
            assert after <= before * (1 + 1e-5) + 1e-5


@SETTINGS
@given(st.lists(st.floats(0.01, 100.0), min_size=1, max_size=8, unique=True),
       st.lists(st.floats(0.5, 1.5), min_size=8, max_size=8), st.floats(0.0, 200.0))
def test_time_ratios_exact_at_knots_and_between_neighbours(knots, values, probe):
    knots = sorted(knots, reverse=True)
    ratios = TimeRatios(torch.tensor(knots + [0.0], dtype=torch.float64), values[:len(knots)])
    at = ratios(torch.tensor(knots, dtype=torch.float64))
    assert torch.equal(at, torch.tensor(values[:len(knots)], dtype=torch.float64))
    r = float(ratios(torch.tensor([probe], dtype=torch.float64)))
    lo, hi = min(values[:len(knots)]), max(values[:len(knots)])
    assert lo - 1e-12 <= r <= hi + 1e-12


@SETTINGS
@given(st.integers(2, 5), st.integers(1, 3), st.integers(1, 4), st.integers(20, 60), st.integers(0, 2 ** 16),
       st.floats(-1.0, 1.0), st.floats(0.2, 2.0), st.data())
def test_olss_fits_never_lose_to_ddim_on_their_path(steps, batch, width, teacher_steps, seed, mu, s, data):
    """OLSS on a random teacher run and a random path: finite coefficients, and every step's error at
    most that of DDIM written in the same basis (the least squares contain DDIM's coefficients)."""
    model = GaussianDenoiser(mu, s)
    grid = teacher_sigmas(SCHEDULE, teacher_steps)
    trajectory = Trajectory(grid)
    x = torch.randn(batch, 2, width, width, generator=torch.Generator().manual_seed(seed)) * grid[0]
    sample_teacher(model, x, grid, schedule=SCHEDULE, trajectory=trajectory)
    gram = olss.trajectory_gram(trajectory, SCHEDULE)
    inner = data.draw(st.lists(st.integers(1, teacher_steps - 1), min_size=steps - 1, max_size=steps - 1,
                               unique=True))
    path = [0, *sorted(inner)]
    fitted = olss.fit_olss(gram, path)
    assert torch.isfinite(fitted.weights_x).all() and torch.isfinite(fitted.weights_d).all()
    weights_x, weights_d = olss.ddim_coefficients(SCHEDULE, fitted.sigmas)
    ddim = olss.step_errors(gram, path, weights_x, weights_d)
    assert torch.all(fitted.errors <= ddim * (1 + 1e-4) + 1e-6)
