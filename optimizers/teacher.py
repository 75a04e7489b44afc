"""The teacher: a long, accurate, deterministic run whose states and model outputs the fits use.

The solver is DPM-Solver++(3M) (Lu et al. 2022), a third-order multistep exponential integrator on
the data prediction in the model family's own half-log-SNR lambda, one model evaluation per step; the
final step to sigma = 0 is the last output. Its second-order sibling, run on the same outputs, gives
an estimate of its error for free (`Trajectory.estimate`). It is written k-diffusion style,
so ComfyUI runs it as an ordinary sampler and conditioning, CFG and model patches behave exactly as
in normal sampling.

Memory: the trajectory is kept on the host (CPU) in `store_dtype`; `Trajectory.for_budget` picks
float32 when the whole run fits the budget and float16 otherwise (an SDXL latent 4x128x128, batch
16, 1000 steps: 2 x 2 GiB in float16).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .calibration import check_schedule
from .coordinates import NoiseSchedule


def teacher_sigmas(schedule: NoiseSchedule, steps: int, through=None, top=None) -> torch.Tensor:
    """About steps + 1 ComfyUI sigmas from `top` (default sigma_max; a partial pass, denoise below 1, starts
    lower) to 0, uniform in lambda (for flow models, whose sigma_max = 1 is lambda = -inf, uniform from sigma
    0.999 on). (OLSS's uniform path takes every T/N-th teacher step: a grid refined at its start would bend it.)

    `through`: a student schedule (descending, ending in 0) the teacher grid must contain; each of its
    intervals is then split uniformly in lambda into about steps / N teacher steps (the last, to 0, from
    the student's last sigma down to sigma_min), so fits can target the teacher at the student sigmas.
    """
    if steps < 2:
        raise ValueError(f"teacher_steps must be at least 2, got {steps}")
    if through is None:
        start = schedule.sigma_max if top is None else float(top)
        if not schedule.sigma_min < start <= schedule.sigma_max * (1 + 1e-6):
            raise ValueError(f"a teacher must start between sigma_min and sigma_max, not at {start:.4g}")
        first = min(start, 0.999) if schedule.is_flow else start
        lambdas = torch.linspace(float(schedule.lambda_(first)), schedule.lambda_max, steps, dtype=torch.float64)
        sigmas = schedule.sigma_of_lambda(lambdas)
        sigmas[0] = start
        return torch.cat([sigmas, sigmas.new_zeros(1)]).float()
    through = torch.as_tensor(through, dtype=torch.float64)
    check_schedule(through, "student sigmas")
    last = float(through[-2])
    ends = through[:-1].clone()
    if last > schedule.sigma_min * (1 + 1e-4):        # the last student step to 0 is refined down to sigma_min
        ends = torch.cat([ends, ends.new_tensor([schedule.sigma_min])])
    lambdas = schedule.lambda_(ends.clamp(max=0.999) if schedule.is_flow else ends)
    per = max(1, (steps - 1) // max(1, len(ends) - 1))
    pieces = [through[:1]]
    for i in range(len(ends) - 1):
        inner = torch.linspace(float(lambdas[i]), float(lambdas[i + 1]), per + 1, dtype=torch.float64)[1:]
        piece = schedule.sigma_of_lambda(inner)
        piece[-1] = ends[i + 1]
        pieces.append(piece)
    sigmas = torch.cat(pieces + [through.new_zeros(1)])
    return sigmas.float()


@dataclass
class Trajectory:
    """What a teacher run leaves for the fits: x and D(x, sigma) at every teacher sigma but the last
    (sigma = 0), and the final x, in ComfyUI's coordinates."""

    sigmas: torch.Tensor                          # [T + 1], descending, last 0
    store_dtype: torch.dtype = torch.float32
    states: list = field(default_factory=list)    # T tensors [B, ...] on the host
    denoised: list = field(default_factory=list)  # T tensors [B, ...] on the host
    final: torch.Tensor | None = None             # [B, ...] float32

    @classmethod
    def for_budget(cls, sigmas, latent_numel: int, budget_bytes: int = 2 << 30) -> "Trajectory":
        """float32 storage when both recorded tensor lists fit in budget_bytes, else float16."""
        return cls(sigmas, cls.store_dtype_for(len(sigmas) - 1, latent_numel, budget_bytes))

    @staticmethod
    def store_dtype_for(steps: int, latent_numel: int, budget_bytes: int = 2 << 30) -> torch.dtype:
        return torch.float32 if 2 * steps * latent_numel * 4 <= budget_bytes else torch.float16

    @classmethod
    def bytes_for(cls, steps: int, latent_numel: int) -> int:
        """Host memory of a `steps`-step run over `latent_numel` values (the batch's): states, outputs, final x."""
        size = torch.finfo(cls.store_dtype_for(steps, latent_numel)).bits // 8
        return 2 * steps * latent_numel * size + 4 * latent_numel

    def record(self, x, denoised):
        self.states.append(x.detach().to("cpu", self.store_dtype))
        self.denoised.append(denoised.detach().to("cpu", self.store_dtype))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.states + self.denoised)

    def state_at(self, schedule: NoiseSchedule, sigma: float) -> torch.Tensor:
        """The teacher's state (float32) at any sigma of its range: a recorded state, the final latent at
        sigma 0, or else one DPM-Solver++(3M) step (as the run itself takes) from the nearest recorded
        state above sigma, accurate to the teacher's own order."""
        sigma = float(sigma)
        grid = self.sigmas.double()
        if sigma == 0:
            return self.final.float()
        if not 0 < sigma <= float(grid[0]) * (1 + 1e-6):
            raise ValueError(f"sigma {sigma:.4g} is outside the teacher's range (0, {float(grid[0]):.4g}]")
        sigma = min(sigma, float(grid[0]))
        j = int(torch.nonzero(grid[:-1] >= sigma * (1 - 1e-7)).max())
        if math.isclose(float(grid[j]), sigma, rel_tol=1e-6):
            return self.states[j].float()
        a, b = step_coefficients(schedule, [*grid[max(0, j - 2):j + 1].tolist(), sigma])[-1]
        return a * self.states[j].float() + sum(weight * self.denoised[j - k].float() for k, weight in enumerate(b))


def step_coefficients(schedule: NoiseSchedule, sigmas, order: int = 3) -> list[tuple[float, tuple]]:
    """(a_i, (b_i0, b_i1, ...)) of every teacher step: x_{i+1} = a_i x_i + sum_k b_ik D_{i-k}.

    With x / sigma_native == x_c / s in every family (see coordinates), DPM-Solver++(3M) (the third-order
    multistep form of Lu et al. 2022's DPM-Solver++, as ComfyUI's dpmpp_3m_sde with eta 0) is
    x' = (s'/s) x + g (-phi_1 D_i + phi_2 d1 - phi_3 d2), g = s' e^{lambda'}, h = lambda' - lambda,
    phi_1 = expm1(-h), phi_2 = phi_1 / h + 1, phi_3 = phi_2 / h - 1/2, where d1 and d2 are the first and
    second divided differences of the last three outputs in lambda (steps r0 = h_{i-1} / h, r1 = h_{i-2} / h).
    The first step is first order, the second second order (DPM-Solver++(2M)'s d1), and `order` caps it.
    The last step, to sigma = 0, is x' = D_i.
    """
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    lambdas = schedule.lambda_(sigmas)
    coefficients, previous = [], []         # previous: the h of the steps whose outputs enter, most recent first
    for i in range(len(sigmas) - 1):
        if sigmas[i + 1] == 0:
            coefficients.append((0.0, (1.0,)))
            break
        h = float(lambdas[i + 1] - lambdas[i])
        g = float(sigmas[i + 1]) * math.exp(float(lambdas[i + 1]))
        phi_1 = math.expm1(-h)
        phi_2 = phi_1 / h + 1
        phi_3 = phi_2 / h - 0.5
        b = torch.tensor([-phi_1], dtype=torch.float64)
        if order >= 3 and len(previous) >= 2:
            r0, r1 = previous[0] / h, previous[1] / h
            d1_0 = torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64) / r0
            d1_1 = torch.tensor([0.0, 1.0, -1.0], dtype=torch.float64) / r1
            d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            b = torch.cat([b, b.new_zeros(2)]) + phi_2 * d1 - phi_3 * d2
        elif order >= 2 and previous:
            d1 = torch.tensor([1.0, -1.0], dtype=torch.float64) / (previous[0] / h)
            b = torch.cat([b, b.new_zeros(1)]) + phi_2 * d1
        coefficients.append((float(sigmas[i + 1] / sigmas[i]), tuple(g * float(v) for v in b)))
        # a flow model's first step leaves sigma 1, where lambda is -inf: its output starts no difference
        previous = [h, *previous[:1]] if math.isfinite(h) else []
    return coefficients


def state_combinations(schedule: NoiseSchedule, sigmas) -> torch.Tensor:
    """M [T + 1, T + 1] (float64) with teacher state x_k = M[k, 0] x_0 + sum_j M[k, 1 + j] D_j.

    Every state of the teacher is a fixed linear combination of its start and its model outputs, so
    fits can work on the start and the outputs alone.
    """
    coefficients = step_coefficients(schedule, sigmas)
    m = torch.zeros(len(coefficients) + 1, len(coefficients) + 1, dtype=torch.float64)
    m[0, 0] = 1
    for i, (a, b) in enumerate(coefficients):
        m[i + 1] = a * m[i]
        for k, weight in enumerate(b):
            m[i + 1, 1 + i - k] += weight
    return m


@torch.no_grad()
def sample_teacher(model, x, sigmas, extra_args=None, callback=None, disable=None,
                   schedule: NoiseSchedule | None = None, trajectory: Trajectory | None = None):
    """DPM-Solver++(3M) in the family's lambda (see `step_coefficients`); records into `trajectory`."""
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    outputs = []                            # the model's last outputs, most recent first
    for i, (a, b) in enumerate(step_coefficients(schedule, sigmas)):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if trajectory is not None:
            trajectory.record(x, denoised)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        outputs = [denoised, *outputs[:2]]
        x = a * x + sum(weight * d for weight, d in zip(b, outputs))
    if trajectory is not None:
        trajectory.final = x.detach().to("cpu", torch.float32)
    return x


# The order the teacher's error is assumed to fall at between two lengths: DPM-Solver++(3M) is third order in
# theory, but on these models (and on ComfyUI's discrete-time EPS schedules) it was measured falling by about
# 5x per doubling from 60 steps on, so the estimates take the safe side, second order.
OBSERVED_ORDER = 2


def error_estimate(final, coarser_final, steps, coarser_steps) -> float:
    """Richardson's estimate of a `steps`-step teacher's own error (RMSE of its final x) from a shorter run on
    the same noises: |x_steps - x_coarser| / ((steps / coarser_steps)^p - 1), p = OBSERVED_ORDER."""
    return rmse(final, coarser_final) / ((steps / coarser_steps) ** OBSERVED_ORDER - 1)


def steps_for(target, estimate, steps) -> int:
    """The teacher length whose error should be `target`, from a `steps`-step run whose error is `estimate`."""
    return math.ceil(steps * (estimate / target) ** (1 / OBSERVED_ORDER))


def rmse(x, reference) -> float:
    """The error every fit and comparison measures: RMSE of x against a reference (the teacher's) state, in
    float64, on x's device."""
    return float((x.double() - reference.to(x.device).double()).pow(2).mean().sqrt())
