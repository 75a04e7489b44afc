"""One noise-schedule object per model family: every conversion between ComfyUI's sigma and the
half-log-SNR lambda, alpha and sigma of the family's own forward process lives here.

ComfyUI samples every model in its own state space x_c and calls its noise level "sigma" (s):
- EPS, V_PREDICTION (discrete VP training, SD1.x/SDXL) and EDM models: x_c = x0 + s * n, the
  variance-exploding form; the VP process is x = alpha * x0 + sigma * n with
  alpha = 1 / sqrt(1 + s^2), sigma = s / sqrt(1 + s^2) (EDM: alpha = 1, sigma = s);
- CONST (flow matching: SD3, Flux, Wan): x_c = (1 - s) * x0 + s * n, so alpha = 1 - s, sigma = s.
In every family x / sigma == x_c / s, and the probability-flow ODE is d(x_c / s) = D d(e^lambda)
with lambda = log(alpha / sigma) (DPM-Solver++, eq. 9): a method written in lambda, alpha and
sigma through this module works for all families alike.

Accepts Python floats, numpy arrays or torch tensors and returns the same kind. Never imports comfy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

FAMILIES = ("eps", "v_prediction", "edm", "flow")

# Names of ComfyUI's prediction classes (comfy.model_sampling) and the family each belongs to.
_PREDICTION_CLASSES = {
    "EPS": "eps",
    "V_PREDICTION": "v_prediction",
    "EDM": "edm",
    "CONST": "flow",
}


def _ops(x):
    """The math module for x: torch for tensors, numpy otherwise."""
    if hasattr(x, "detach"):
        import torch
        return torch
    return np


def _as_array(x):
    return x if hasattr(x, "detach") or isinstance(x, np.ndarray) else np.float64(x)


@dataclass(frozen=True)
class NoiseSchedule:
    """The forward process of one model family between ComfyUI's sigma_min and sigma_max."""

    family: str
    sigma_min: float
    sigma_max: float

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"unknown model family {self.family!r}; expected one of {FAMILIES}")
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max}")
        if self.is_flow and self.sigma_max > 1:
            raise ValueError(f"a flow model's sigma_max must be at most 1, got {self.sigma_max}")

    @property
    def is_flow(self) -> bool:
        return self.family == "flow"

    # ComfyUI sigma <-> half-log-SNR lambda = log(alpha / sigma)
    def lambda_(self, s):
        s = _as_array(s)
        xp = _ops(s)
        with np.errstate(divide="ignore"):          # lambda(sigma = 1) of a flow model is -inf
            return xp.log1p(-s) - xp.log(s) if self.is_flow else -xp.log(s)

    def sigma_of_lambda(self, lambda_):
        """ComfyUI's sigma at half-log-SNR lambda (the inverse of `lambda_`)."""
        lambda_ = _as_array(lambda_)
        xp = _ops(lambda_)
        if self.is_flow:
            return 1 / (1 + xp.exp(lambda_))
        return xp.exp(-lambda_)

    # the family's own forward process x = alpha * x0 + sigma * n
    def alpha_sigma(self, s):
        """(alpha, sigma) of the family's own forward process at ComfyUI sigma s."""
        s = _as_array(s)
        xp = _ops(s)
        if self.is_flow:
            return 1 - s, s
        if self.family == "edm":
            return xp.ones_like(s), s
        alpha = 1 / xp.sqrt(1 + s * s)
        return alpha, s * alpha

    def alpha_sigma_of_lambda(self, lambda_):
        """(alpha, sigma) at half-log-SNR lambda, computed stably for large |lambda|."""
        lambda_ = _as_array(lambda_)
        xp = _ops(lambda_)
        if self.is_flow:
            return 1 / (1 + xp.exp(-lambda_)), 1 / (1 + xp.exp(lambda_))
        if self.family == "edm":
            return xp.ones_like(lambda_), xp.exp(-lambda_)
        return 1 / xp.sqrt(1 + xp.exp(-2 * lambda_)), 1 / xp.sqrt(1 + xp.exp(2 * lambda_))

    def native_scale(self, s):
        """k with x_native = k * x_c: the factor from ComfyUI's state to the family's own x."""
        alpha, _ = self.alpha_sigma(s)
        return 1 if self.is_flow else alpha

    @property
    def lambda_min(self) -> float:
        return float(self.lambda_(self.sigma_max))

    @property
    def lambda_max(self) -> float:
        return float(self.lambda_(self.sigma_min))

    @classmethod
    def from_model_sampling(cls, model_sampling) -> "NoiseSchedule":
        """Build from a ComfyUI `model_sampling` object (duck-typed: comfy is never imported here).

        The family is read from ComfyUI's prediction class in the object's MRO (EPS,
        V_PREDICTION, EDM, CONST); the state-space form is then checked against the object's own
        `noise_scaling`, so a model-sampling class we do not know is refused, not guessed.
        """
        names = [k.__name__ for k in type(model_sampling).__mro__]
        family = next((_PREDICTION_CLASSES[n] for n in names if n in _PREDICTION_CLASSES), None)
        if family is None:
            raise ValueError(
                f"unsupported model type: model_sampling {type(model_sampling).__name__} "
                f"({', '.join(names[1:4])}) is not an EPS, V_PREDICTION, EDM or CONST (flow) model")
        schedule = cls(family, float(model_sampling.sigma_min), float(model_sampling.sigma_max))
        schedule._check_noise_scaling(model_sampling)
        return schedule

    def _check_noise_scaling(self, model_sampling):
        import torch
        s = torch.tensor([0.5 * (self.sigma_min + self.sigma_max) if self.is_flow else 1.0])
        one = torch.ones(1)
        got = model_sampling.noise_scaling(s, one, 2 * one)        # ComfyUI: x_c for n = 1, x0 = 2
        alpha, sigma = self.alpha_sigma(s.double())
        want = (alpha * 2 + sigma) / self.native_scale(s.double())
        if not math.isclose(float(got), float(want), rel_tol=1e-4):
            raise ValueError(
                f"unsupported model type: {type(model_sampling).__name__} places noise as "
                f"{float(got):.4f}, not as a {self.family} model ({float(want):.4f})")
