"""Calibrated time steps: the interior sigmas of a built-in sampler fitted to a teacher run.

Like LD3 (Tong et al., ICLR 2025: time steps learned against a teacher from about a hundred samples), the
objective is the sampler's own final error against the teacher on the calibration noises, measured by running
it (`error(sigmas)`, given by the caller). The start, and the regulariser the fit is pulled toward, is the
trust-region schedule of Xue et al. (CVPR 2024) for that sampler's order (`trust_region.time_step_sigmas`):
    f(lambda) = error(sigma(lambda)) / error(start) + regulariser * mean((lambda - lambda_start)^2),
over the interior half-log-SNRs, endpoints fixed, solved by scipy's constrained trust-region method
(trust-constr) under lambda_{i+1} - lambda_i >= margin, with forward differences of step `h` in lambda (the
error comes from float32 sampling runs: a tiny step would measure their rounding). The best schedule
evaluated is returned, so the fit is never worse than its start on the calibration noises.

Pure numpy and scipy; never imports comfy.
"""
from __future__ import annotations

import warnings

import numpy as np
from scipy.optimize import LinearConstraint, minimize

from .coordinates import NoiseSchedule


def fit_time_steps(error, start, schedule: NoiseSchedule, regulariser: float = 1e-2, h: float = 0.02,
                   maxiter: int = 12, check=None, start_error=None):
    """(sigmas [N + 1] float64, {"start_error", "error", "evaluations"}) for a start schedule `start` (N + 1
    sigmas from sigma_max, ending in 0). `error(sigmas)` -> float runs the sampler; `check()` may raise (Cancel).
    `start_error`: error(start), where the caller has measured it already (then not run again, nor counted)."""
    start = np.asarray(start, dtype=np.float64)
    n = len(start) - 1
    lam0 = np.asarray(schedule.lambda_(start[1:-1]), dtype=np.float64)
    seen = {} if start_error is None else {np.round(lam0, 12).tobytes(): (float(start_error), lam0.copy())}
    given = len(seen)

    def sigmas_of(lam):
        return np.concatenate([start[:1], np.asarray(schedule.sigma_of_lambda(lam), dtype=np.float64), [0.0]])

    def measured(lam):
        key = np.round(lam, 12).tobytes()
        if key not in seen:
            if check is not None:
                check()
            seen[key] = (float(error(sigmas_of(lam))), lam.copy())
        return seen[key][0]

    if n < 2:
        return start, {"start_error": measured(lam0), "error": measured(lam0), "evaluations": 1 - given}
    scale = max(measured(lam0), 1e-12)

    def objective(lam):
        return measured(lam) / scale + regulariser * float(np.mean((lam - lam0) ** 2))

    def gradient(lam):
        f = objective(lam)
        g = np.empty_like(lam)
        for i in range(len(lam)):
            moved = lam.copy()
            moved[i] += h
            g[i] = (objective(moved) - f) / h
        return g

    top = float(schedule.lambda_(start[0]))
    bottom = schedule.lambda_max
    margin = 1e-3 * (bottom - (lam0[0] if not np.isfinite(top) else top)) / n
    rows, lower = [], []
    for i in range(n - 2):                                   # lambda_{i+1} - lambda_i >= margin
        row = np.zeros(n - 1)
        row[i], row[i + 1] = -1, 1
        rows.append(row)
        lower.append(margin)
    last = np.zeros(n - 1)
    last[-1] = -1                                            # lambda_{N-1} <= lambda_max
    rows.append(last)
    lower.append(-bottom)
    if np.isfinite(top):                                     # lambda_1 >= lambda_0 + margin
        first = np.zeros(n - 1)
        first[0] = 1
        rows.append(first)
        lower.append(top + margin)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        minimize(objective, lam0, jac=gradient, method="trust-constr",
                 constraints=[LinearConstraint(np.array(rows), np.array(lower), np.inf)],
                 options={"maxiter": maxiter, "initial_tr_radius": 0.25, "gtol": 1e-6, "xtol": 1e-4})
    best_error, best = min(seen.values(), key=lambda item: item[0] / scale + regulariser * float(
        np.mean((item[1] - lam0) ** 2)))
    return sigmas_of(best), {"start_error": seen[np.round(lam0, 12).tobytes()][0], "error": best_error,
                             "evaluations": len(seen) - given}
