"""An experiment beyond the paper, used by the ceilings benchmark (`benchmarks/ceilings.py`) to bound what any
fit of the OLSS sampler could reach: every coefficient and the interior sigmas tuned at once for the final x.
Fitted on 4-sample halves of a calibration batch of 8 it overfits (the other half's error rises), so the
calibration node does not use it.
"""
from dataclasses import dataclass, field

import math
import torch

from calibrated_samplers.optimizers.calibration import check_same_sigmas
from calibrated_samplers.optimizers.olss import OLSSCoefficients, _combine


@dataclass
class JointRefit:
    """Beyond the paper: every coefficient and the interior student sigmas tuned at once for the final x.

    The sequential fits make each step land on the teacher's trajectory; with few steps the final x can
    come closer to the teacher's if the intermediate states leave it. `refine_olss` minimises the mean
    square error of the final x against `target` on the calibration batch by Levenberg-Marquardt over
    theta = (w_x[i], w_d[i, :i + 1] for every step, log sigma_1 ... log sigma_{n-1}), with the Jacobian
    by forward differences: the final x is linear in the last step's coefficients (exact columns), and a
    change of step i's coefficients moves x_{i+1} along one basis vector, so its column costs the n - 1 - i
    evaluations after it; a sigma_i column costs n - i. One iteration: about n^3 / 6 + n^2 / 2 evaluations.
    A step that does not lower the error is refused (the damping grows), so the error never rises.
    """

    target: torch.Tensor          # [B, ...] the teacher's final x on the calibration batch
    iterations: int = 3
    rows: list | None = None      # fit on these samples only (the others are then held out)
    relative_step: float = 1e-3   # finite-difference step, relative to the state norm (about sqrt of the model precision)
    tune_sigmas: bool = True
    max_log_step: float = 0.5     # largest change of one log sigma per iteration
    damping: float = 1e-3         # initial Marquardt damping (relative to the normal matrix's diagonal)
    errors: list = field(default_factory=list)        # RMSE of the fitted rows: start, then after each iteration
    held_errors: list = field(default_factory=list)   # the same of the other rows (with `rows`)
    evaluations: int = 0


@torch.no_grad()
def refine_olss(model, x, sigmas, extra_args=None, callback=None, disable=None, coefficients: OLSSCoefficients = None,
                joint: JointRefit = None):
    """k-diffusion-style function: tunes `coefficients` (and their sigmas) by `joint` on this batch, writes
    them back into `coefficients`, and returns the final x of the tuned sampler."""
    if coefficients is None or joint is None:
        raise ValueError("refine_olss needs OLSS coefficients and a JointRefit")
    check_same_sigmas(sigmas, coefficients.sigmas, "these OLSS coefficients")
    extra_args = {} if extra_args is None else extra_args
    n = coefficients.steps
    s_in = x.new_ones([x.shape[0]])
    rows = list(range(x.shape[0])) if joint.rows is None else list(joint.rows)
    others = [r for r in range(x.shape[0]) if r not in rows]
    target = joint.target.to(x.device, torch.float64)
    x_T = x

    def rollout(wx, wd, sig, start=0, state=None, outputs=()):
        """(final x, outputs, states) from step `start` (its input `state`, earlier outputs given); states[k]
        is step start + k's input."""
        outputs, states = list(outputs), [x_T if state is None else state]
        for i in range(start, n):
            outputs.append(model(states[-1], sig[i] * s_in, **extra_args))
            joint.evaluations += 1
            states.append(_combine(float(wx[i]), wd[i, :i + 1].tolist(), x_T, outputs))
        return states[-1], outputs, states

    def error(final, rows=rows):
        return float((final[rows].double() - target[rows]).pow(2).mean())

    def record(final, loss):
        joint.errors.append(loss ** 0.5)
        if others:
            joint.held_errors.append(error(final, others) ** 0.5)

    def jacobian(wx, wd, sig, final, outputs, states):
        columns = []
        for i in range(n):
            basis = [x_T] + outputs[:i + 1]
            if i == n - 1:
                columns += [v[rows].reshape(-1) for v in basis]
                continue
            state = states[i + 1]
            for v in basis:
                h = joint.relative_step * float(state.norm()) / max(float(v.norm()), 1e-30)
                moved = rollout(wx, wd, sig, i + 1, state + h * v, outputs[:i + 1])[0]
                columns.append(((moved[rows] - final[rows]) / h).reshape(-1))
        if joint.tune_sigmas:
            for i in range(1, n):
                moved_sig = sig.clone()
                moved_sig[i] = sig[i] * math.exp(joint.relative_step)
                moved = rollout(wx, wd, moved_sig, i, states[i], outputs[:i])[0]
                columns.append(((moved[rows] - final[rows]) / joint.relative_step).reshape(-1))
        return torch.stack([c.double() for c in columns], 1)

    def unpack(theta, wx, wd, sig):
        wx, wd, sig, k = wx.clone(), wd.clone(), sig.clone(), 0
        for i in range(n):
            wx[i] += float(theta[k])
            wd[i, :i + 1] += theta[k + 1:k + 2 + i].cpu()
            k += i + 2
        if joint.tune_sigmas and n > 1:
            log_step = theta[k:].clamp(-joint.max_log_step, joint.max_log_step).to(sig)
            sig[1:n] = sig[1:n] * torch.exp(log_step)
        return wx, wd, sig

    wx, wd = coefficients.weights_x.clone(), coefficients.weights_d.clone()
    sig = sigmas.detach().clone()
    final, outputs, states = rollout(wx, wd, sig)
    loss = error(final)
    record(final, loss)
    damping = joint.damping
    for _ in range(joint.iterations):
        jac = jacobian(wx, wd, sig, final, outputs, states)
        residual = (final[rows].double() - target[rows]).reshape(-1)
        normal, gradient = jac.T @ jac, jac.T @ residual
        scale = normal.diagonal().clamp_min(1e-30)
        for _ in range(6):                      # raise the damping until a step lowers the error
            theta = torch.linalg.solve(normal + damping * torch.diag(scale), -gradient)
            new_wx, new_wd, new_sig = unpack(theta, wx, wd, sig)
            if bool(torch.all(new_sig[1:] < new_sig[:-1])) and bool(torch.isfinite(theta).all()):
                new_final, new_outputs, new_states = rollout(new_wx, new_wd, new_sig)
                new_loss = error(new_final)
                if new_loss < loss:
                    wx, wd, sig, loss = new_wx, new_wd, new_sig, new_loss
                    final, outputs, states = new_final, new_outputs, new_states
                    damping = max(damping / 3, 1e-6)
                    break
            damping *= 10
        record(final, loss)
    coefficients.weights_x.copy_(wx)
    coefficients.weights_d.copy_(wd)
    coefficients.sigmas = sig.detach().cpu().float()
    if callback is not None:
        callback({"x": final, "i": n - 1, "sigma": sigmas[n - 1], "sigma_hat": sigmas[n - 1], "denoised": outputs[-1]})
    return final
