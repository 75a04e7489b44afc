"""The teacher: a long, accurate, deterministic run whose states and model outputs the fits use.

The solver is DPM-Solver++(2M) (Lu et al. 2022, Alg. 2), a second-order multistep exponential
integrator on the data prediction in the model family's own half-log-SNR lambda, one model
evaluation per step; the final step to sigma = 0 is first order. It is written k-diffusion style,
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

from .coordinates import NoiseSchedule


def teacher_sigmas(schedule: NoiseSchedule, steps: int) -> torch.Tensor:
    """steps + 1 ComfyUI sigmas from sigma_max to 0: uniform in lambda between sigma_max (for
    flow models, where sigma_max = 1 is lambda = -inf, between 0.999) and sigma_min."""
    if steps < 2:
        raise ValueError(f"teacher_steps must be at least 2, got {steps}")
    top = min(schedule.sigma_max, 0.999) if schedule.is_flow else schedule.sigma_max
    lambdas = torch.linspace(float(schedule.lambda_(top)), schedule.lambda_max, steps, dtype=torch.float64)
    sigmas = schedule.sigma_of_lambda(lambdas)
    sigmas[0] = schedule.sigma_max
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float()


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
        full = 2 * (len(sigmas) - 1) * latent_numel * 4
        return cls(sigmas, torch.float32 if full <= budget_bytes else torch.float16)

    def record(self, x, denoised):
        self.states.append(x.detach().to("cpu", self.store_dtype))
        self.denoised.append(denoised.detach().to("cpu", self.store_dtype))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.states + self.denoised)


@torch.no_grad()
def sample_teacher(model, x, sigmas, extra_args=None, callback=None, disable=None,
                   schedule: NoiseSchedule | None = None, trajectory: Trajectory | None = None):
    """DPM-Solver++(2M) in the family's lambda; records into `trajectory` when one is given.

    With x / sigma_native == x_c / s in every family (see coordinates), one step is
    x' = (s'/s) x + s' e^{lambda'} (1 - e^{-h}) D_eff with h = lambda' - lambda and
    D_eff = (1 + 1/(2r)) D_i - 1/(2r) D_{i-1}, r = h_{i-1} / h_i (DPM-Solver++ eq. 14 and Alg. 2).
    """
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    lambdas = schedule.lambda_(sigmas.double())
    old_denoised, h_last = None, None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)
        if trajectory is not None:
            trajectory.record(x, denoised)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        if sigma_next == 0:
            x = denoised
            break
        h = float(lambdas[i + 1] - lambdas[i])
        d = denoised
        if old_denoised is not None:
            r = h_last / h
            d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        gain = float(sigma_next) * math.exp(float(lambdas[i + 1])) * -math.expm1(-h)
        x = float(sigma_next / sigma) * x + gain * d
        old_denoised, h_last = denoised, h
    if trajectory is not None:
        trajectory.final = x.detach().to("cpu", torch.float32)
    return x
