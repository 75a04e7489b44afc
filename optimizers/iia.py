"""IIA: improved integration approximation (Zhang, Niwa, Kleijn; arXiv 2304.11328).

Keep the solver and its schedule, add a few coefficients per step in front of terms the solver
already has, and fit them once, step by step, by least squares against M finer sub-steps of the
same solver inside the same interval. Three samplers of the paper, k-diffusion style:

- IIA-DDIM (eq. 22): z_{i+1} = DDIM(z_i) + phi_i0 (x0_i - x0_{i-1}) + phi_i1 (eps_i - eps_{i-1}),
  with x0 = D and eps = (z_native - alpha D) / sigma the family's own data and noise predictions
  (through `coordinates`), the correction made in the family's native state and converted to
  ComfyUI's. ComfyUI's `ddim` is Euler in its own space, which is DDIM in every family.
- BIIA-Heun (eq. 11-14): z_{i+1} = z_i + h_i sum_{k=0..r} gamma_ik H_{i-k}, H_j the Heun direction
  (d_j + d'_{j+1|j}) / 2 of step j; Heun is gamma_i0 = 1.
- IIA-Heun (eq. 15-19, the "advanced" form): z_{i+1} = z_i + h_i [beta_i0 (z_i - D_i)
  - beta_i1 / (2 t_{i+1}) (D'_{i+1} - D_i) + sum_{k=1..r} gamma_ik Dt_{i-k}], where Dt_j is step j's
  own bracket with its fitted betas; Heun is beta_i0 = 1 / t_i, beta_i1 = 1, gamma = 0.

ComfyUI's sampling space is EDM's (alpha = 1, d z / d t = (z - D) / t with t = sigma) for EPS,
V and EDM models, and flow models obey the same ODE in ComfyUI's coordinates, so the Heun forms
apply verbatim to every family.

Every step is computed as the plain solver's step, exactly as ComfyUI computes it, plus the
correction sum_j (c_j - c_j^plain) B_j; plain coefficients therefore reproduce ComfyUI's `ddim` and
`heun` bit for bit. Fits are float64 least squares over the calibration batch and all pixels,
regularised toward the plain coefficients by 1e-3 of the basis Gram matrix's trace, which keeps every
step's calibration error at or below the plain solver's and a rank-deficient batch (e.g. of one) at
them. The ridge matters on sharp data: near sigma 0 a term that barely moves on the calibration noises
(IIA-DDIM's x0 difference) took coefficients of -25 that sent held-out noises to other modes (closed-form
SD1.5-like model, 7 steps, exponential: held-out RMSE 0.83 with 1e-9, 0.097 with 1e-3, the same
calibration error); on the digits models the fits did not change (0.0503 / 0.0504).

First step: no history, so IIA-DDIM takes a plain DDIM step (as the paper) and the gamma terms of
the Heun forms are absent (their betas are still fitted). Last step, to sigma = 0: Heun is Euler
there (no second evaluation at sigma = 0), so the beta_i1 term is absent; the fine target splits
[sigma_{N-1}, sigma_min] into M - 1 sub-steps uniform in log sigma, then steps to 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .coordinates import NoiseSchedule
from .teacher import rmse

VARIANTS = ("iia_ddim", "biia_heun", "iia_heun")


def coefficient_count(variant: str, r: int = 1) -> int:
    return {"iia_ddim": 2, "biia_heun": 1 + r, "iia_heun": 2 + r}[variant]


def plain_coefficients(variant: str, sigmas, r: int = 1) -> torch.Tensor:
    """[N, k] float64 coefficients that make the sampler the plain solver (DDIM or Heun)."""
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    c = torch.zeros(len(sigmas) - 1, coefficient_count(variant, r), dtype=torch.float64)
    if variant == "biia_heun":
        c[:, 0] = 1
    elif variant == "iia_heun":
        c[:, 0] = 1 / sigmas[:-1]
        c[:, 1] = 1
    return c


def fine_sigmas(a: float, b: float, m: int, sigma_min: float) -> list[float]:
    """m sub-steps from a to b, uniform in log sigma; to b = 0: m - 1 down to sigma_min, then to 0."""
    if b > 0:
        inner = torch.logspace(math.log10(a), math.log10(b), m + 1, dtype=torch.float64).tolist()
        return [a, *inner[1:-1], b]
    if m == 1 or a <= sigma_min:
        return [a, 0.0]
    inner = torch.logspace(math.log10(a), math.log10(sigma_min), m, dtype=torch.float64).tolist()
    return [a, *inner[1:], 0.0]


@dataclass
class IIAFit:
    """Asks `sample_iia` to fit its coefficients step by step; it fills `coefficients` and the errors."""

    m: int = 3
    ridge: float = 1e-3                                # of the basis Gram matrix's trace (`least_squares`)
    targets: list | None = None                        # per step, a given target (the teacher's state at the
                                                       # next sigma) instead of the M fine sub-steps
    coefficients: list = field(default_factory=list)   # one float64 tensor [k] per step
    plain_error: list = field(default_factory=list)    # per step, RMSE against the fine target with plain
    fit_error: list = field(default_factory=list)      # and with fitted coefficients (None: nothing fitted)
    evaluations: int = 0


def least_squares(basis: list, residual: torch.Tensor, ridge: float) -> torch.Tensor:
    """argmin_c ||residual - sum_j c_j basis_j||^2 + ridge * trace * ||c||^2, in float64."""
    b = torch.stack([v.reshape(-1).double() for v in basis], 1)
    gram = b.T @ b
    rhs = b.T @ residual.reshape(-1).double()
    scale = ridge * max(float(gram.diagonal().sum()), 1e-300)
    return torch.linalg.solve(gram + scale * torch.eye(len(gram), dtype=torch.float64), rhs)


class _Steps:
    """The solver's arithmetic, shared by the coarse step, its basis and the fine target."""

    def __init__(self, model, extra_args, schedule, s_in):
        self.model, self.extra_args, self.schedule, self.s_in = model, extra_args, schedule, s_in
        self.evaluations = 0

    def denoise(self, x, sigma):
        self.evaluations += 1
        return self.model(x, sigma * self.s_in, **self.extra_args)

    @staticmethod
    def to_d(x, sigma, denoised):
        return (x - denoised) / sigma

    def euler(self, x, sigma, sigma_next, denoised):
        return x + self.to_d(x, sigma, denoised) * (sigma_next - sigma)

    def heun(self, x, sigma, sigma_next, denoised):
        """(next x, Heun direction H, second denoised or None), as ComfyUI's sample_heun."""
        d = self.to_d(x, sigma, denoised)
        dt = sigma_next - sigma
        if sigma_next == 0:
            return x + d * dt, d, None
        x_2 = x + d * dt
        denoised_2 = self.denoise(x_2, sigma_next)
        d_prime = (d + self.to_d(x_2, sigma_next, denoised_2)) / 2
        return x + d_prime * dt, d_prime, denoised_2

    def fine(self, variant, x, sigma, sigma_next, denoised, m):
        """The target: m sub-steps of the same solver from sigma to sigma_next (first output reused)."""
        grid = fine_sigmas(float(sigma), float(sigma_next), m, self.schedule.sigma_min)
        for j in range(len(grid) - 1):
            if j > 0:
                denoised = self.denoise(x, x.new_tensor(grid[j]))
            x = (self.euler(x, grid[j], grid[j + 1], denoised) if variant == "iia_ddim"
                 else self.heun(x, grid[j], grid[j + 1], denoised)[0])
        return x

    def native_eps(self, x, sigma, denoised):
        """(x0, eps) predictions of the family's own process at ComfyUI sigma > 0."""
        alpha, sigma_native = self.schedule.alpha_sigma(float(sigma))
        return denoised, (self.schedule.native_scale(float(sigma)) * x - alpha * denoised) / sigma_native


@torch.no_grad()
def sample_iia(model, x, sigmas, extra_args=None, callback=None, disable=None, *, schedule: NoiseSchedule,
               variant: str, coefficients=None, r: int = 1, fit: IIAFit | None = None):
    """IIA-DDIM, BIIA-Heun or IIA-Heun with `coefficients` [N, k] (the paper's, see the module
    docstring), or fitting them as it goes when `fit` is given (then `coefficients` is ignored)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown IIA variant {variant!r}; expected one of {VARIANTS}")
    extra_args = {} if extra_args is None else extra_args
    steps = _Steps(model, extra_args, schedule, x.new_ones([x.shape[0]]))
    plain = plain_coefficients(variant, sigmas.detach().cpu(), r)
    if fit is None:
        coefficients = torch.as_tensor(coefficients, dtype=torch.float64)
        if coefficients.shape != plain.shape:
            raise ValueError(f"{variant}: coefficients of shape {tuple(coefficients.shape)} do not fit "
                             f"{len(plain)} steps (expected {tuple(plain.shape)})")
    previous = None                      # IIA-DDIM: the last step's (x0, eps)
    history = []                         # BIIA: earlier Heun directions; IIA-Heun: earlier brackets
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = steps.denoise(x, sigma)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        h = sigma_next - sigma
        terms = []                       # (coefficient column, vector it multiplies)
        if variant == "iia_ddim":
            step = steps.euler(x, sigma, sigma_next, denoised)
            x0, eps = steps.native_eps(x, sigma, denoised)
            if previous is not None:
                scale = schedule.native_scale(float(sigma_next))
                terms = [(0, (x0 - previous[0]) / scale), (1, (eps - previous[1]) / scale)]
            previous = (x0, eps)
        else:
            step, direction, denoised_2 = steps.heun(x, sigma, sigma_next, denoised)
            if variant == "biia_heun":
                terms = [(0, direction * h)]
            else:
                terms = [(0, (x - denoised) * h)]
                if denoised_2 is not None:
                    terms.append((1, (denoised_2 - denoised) * (-h / (2 * sigma_next))))
            first = coefficient_count(variant, r) - r
            terms += [(first + k, g * h) for k, g in enumerate(history)]
        columns = [c for c, _ in terms]
        row = plain[i].clone() if fit is not None else coefficients[i]
        target = None
        if fit is not None and terms:
            target = (steps.fine(variant, x, sigma, sigma_next, denoised, fit.m) if fit.targets is None
                      else fit.targets[i].to(x))
            row[columns] += least_squares([v for _, v in terms], target - step, fit.ridge)
            fit.plain_error.append(rmse(step, target))
        for (column, vector) in terms:
            delta = float(row[column] - plain[i, column])
            if delta != 0:
                step = step + delta * vector
        if fit is not None:
            fit.coefficients.append(row)
            fit.fit_error.append(None if target is None else rmse(step, target))
            if target is None:
                fit.plain_error.append(None)
        if variant == "biia_heun":
            history = [direction, *history][:r]
        elif variant == "iia_heun":
            bracket = (x - denoised) * float(row[0])
            if denoised_2 is not None:
                bracket = bracket - (denoised_2 - denoised) * (float(row[1]) / (2 * sigma_next))
            history = [bracket, *history][:r]
        x = step
    if fit is not None:
        fit.evaluations = steps.evaluations
    return x
