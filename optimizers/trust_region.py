"""Optimized time steps for multistep samplers (DM-NonUniform; Xue et al., "Accelerating Diffusion
Sampling with Optimized Time Steps", CVPR 2024).

The paper bounds the error of a multistep exponential integrator on the data prediction,

    x~_eps = (sigma_eps / sigma_T) x_T + sigma_eps sum_n sum_j w_{n;k_n,j} x_theta(lambda_{n-k_n+j}),

by the surrogate of its eq. (35) / Algorithm 1

    min_{lambda_1 .. lambda_{N-1}}  sum_i eps~_i |sum_{n-k_n+j=i} w_{n;k_n,j}|,
    s.t. lambda_{n+1} > lambda_n,      eps~_i = sigma_i^p / alpha_i  (Lemma 1, with a fixed p),

over the interior half-log-SNR points lambda = log(alpha / sigma), the endpoints being fixed at the
schedule's lambda_min (sigma_max) and lambda_max (sigma_min), and solves it with a constrained trust
region method. The weights w (here J) are the exact integrals of e^lambda times the Lagrange basis
through the previous evaluation points (the paper's eq. (18)); only the order pattern k_n depends on
the sampler.

Like the authors' released code, the objective treats the first steps per step: a step s below
`trunc_num`, and the first and the last step, add the L2 norm of their own terms
sqrt(sum_j (eps~ J_j)^2) (= |eps~ J| for the first-order end steps); every other step adds its signed
terms eps~_i J_j to a sum c_i per evaluation index i, and sum_i |c_i| closes the objective (the
constant sigma_eps is dropped). The code's comment (not its value, which is 3) sets trunc_num = 3 for
N <= 7 steps and 0 above; that rule is the default here. Beware: with trunc_num = 0 the summed form
rewards putting the net weight on evaluations at very low noise (where eps~ is tiny) through the
cancelling extrapolation weights, and its optimum for the order-3 pattern at N >= 8 (order 2 at
N >= 12) collapses steps to the margin: see benchmarks/trust_region_parity.py.

Everything is computed in lambda through `NoiseSchedule`, so the same code serves eps, v-prediction,
EDM and flow-matching models (eps~ uses the family's own alpha and sigma). What is modelled of a
sampler is its order pattern (`solver_orders`) with the exact weights: dpmpp_2m's 2M step, UniPC's
B(h) and its corrector, and, for flow models, ComfyUI's interpolation in -log(sigma) rather than the
family's lambda, all differ from these weights at second order and above. Pure numpy/scipy; never
imports comfy.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Sequence, Union

import numpy as np
from scipy.optimize import LinearConstraint, minimize

from .coordinates import NoiseSchedule

__all__ = [
    "SOLVERS",
    "solver_orders",
    "default_trunc_num",
    "initial_lambdas",
    "objective",
    "objective_and_gradient",
    "optimize_lambdas",
    "time_step_sigmas",
    "discrete_vp_uniform_t_sigmas",
]

# The ComfyUI samplers whose order pattern is modelled, and "original": the authors' pattern.
SOLVERS = ("uni_pc", "uni_pc_bh2", "dpmpp_2m", "ddim", "euler", "original")

InitSpec = Union[str, Sequence[float], np.ndarray, Callable[[int], Sequence[float]]]


# ----------------------------------------------------------------------------------------------
# Order patterns
# ----------------------------------------------------------------------------------------------
def solver_orders(solver: str, steps: int, final_sigma_zero: bool = True) -> list[int]:
    """Order k_s of each step s = 0..steps-1 (lambda_s -> lambda_{s+1}) of a ComfyUI sampler.

    - 'uni_pc', 'uni_pc_bh2' (comfy/extra_samplers/uni_pc.py: multistep, order = min(3, steps - 1),
      lower_order_final=True): warm-up orders 1, 2, .., then min(order, steps - s) -> 1,2,3,..,3,2,1.
      As in the paper, the steps are modelled as exact exponential integrators of these orders
      (UniPC's own B(h) weights and its corrector are not).
    - 'original': the authors' pattern 1, 2, 3, .., 3, 2, 1 (identical to uni_pc for steps >= 2).
    - 'dpmpp_2m' (k_diffusion/sampling.py): first step order 1, then order 2; the step to a final
      sigma of 0 is order 1 (so with `final_sigma_zero` the pattern is 1, 2, .., 2, 1). Its 2M
      step approximates the exact second-order weights used here.
    - 'ddim' (ComfyUI runs euler), 'euler': order 1 everywhere (Euler in ComfyUI's sigma is DDIM,
      the first-order exponential integrator, in every family).
    Raises ValueError for samplers it does not model.
    """
    steps = int(steps)
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if solver in ("uni_pc", "uni_pc_bh2", "original"):
        order = max(1, min(3, steps - 1))
        return [min(s + 1, order, steps - s) for s in range(steps)]
    if solver == "dpmpp_2m":
        orders = [1] + [2] * (steps - 1)
        if final_sigma_zero:
            orders[-1] = 1
        return orders
    if solver in ("ddim", "euler"):
        return [1] * steps
    raise ValueError(f"time-step optimization does not model sampler {solver!r}; "
                     f"supported: {', '.join(SOLVERS)}")


def default_trunc_num(steps: int) -> int:
    """The released code's comment: truncNum = 3 for N <= 7 steps, 0 for more."""
    return 3 if steps <= 7 else 0


# ----------------------------------------------------------------------------------------------
# Exact exponential-integrator weights (paper eq. 18) and their derivatives
# ----------------------------------------------------------------------------------------------
def _phi_integrals(h: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """H_q(h) = int_0^h u^q e^u du for q = 0, 1, 2 (h > 0).

    With expm1 the cancellation in H1 = h e^h - (e^h - 1) and H2 = h^2 e^h - 2 H1 costs about
    eps / h relative precision (1e-12 at h = 1e-4); step lengths stay above the constraints'
    margin, so no series branch is needed.
    """
    eh = np.exp(h)
    h0 = np.expm1(h)
    h1 = h * eh - h0
    h2 = h * h * eh - 2.0 * h1
    return h0, h1, h2


@dataclass(frozen=True)
class _Group:
    """The steps of one order k: step indices (G,), node indices (G, k) = s-k+1..s, which of them
    add their per-step L2 norm, and the flattened nodes of the others (summed into c by index)."""

    k: int
    steps: np.ndarray
    nodes: np.ndarray
    per_step: np.ndarray
    summed_nodes: np.ndarray


@dataclass(frozen=True)
class _Structure:
    steps: int
    groups: tuple


def _structure(orders: Sequence[int], trunc_num: int) -> _Structure:
    orders = [int(k) for k in orders]
    n = len(orders)
    if n < 1:
        raise ValueError("need at least one step")
    for s, k in enumerate(orders):
        if not 1 <= k <= 3 or k > s + 1:
            raise ValueError(f"step {s} cannot have order {k} (orders 1..3, at most s + 1)")
    groups = []
    for k in (1, 2, 3):
        st = np.array([s for s in range(n) if orders[s] == k], dtype=np.intp)
        if st.size == 0:
            continue
        nodes = st[:, None] + np.arange(-k + 1, 1)[None, :]
        per_step = (st < trunc_num) | (st == 0) | (st == n - 1)
        groups.append(_Group(k, st, nodes, per_step, nodes[~per_step].ravel()))
    return _Structure(n, tuple(groups))


def _weights(lam, el, H, g: _Group, with_grad: bool):
    """J (G, k): J_j = int_{lam_s}^{lam_{s+1}} e^l L_j(l) dl, L_j the Lagrange basis on the nodes
    lam_{s-k+1..s} (the paper's w_{n;k,j}, eq. 18). With u = l - lam_s, the other nodes' offsets
    u_i and their elementary symmetric polynomials e1, e2:
    J_j = e^{lam_s} (H_{k-1} - e1 H_{k-2} + e2 H_{k-3}) / prod_{i != j} (u_j - u_i).

    With `with_grad`, also dJ_j/d(node m) (G, k, k) and dJ_j/d(lam_{s+1}) (G, k). Moving a node x_m
    changes the basis by dL_j/dx_m = -L_j'(x_m) L_m (the interpolant must still pass through the
    data), so dJ_j/dx_m = -L_j'(x_m) J_m; the limits add e^b L_j(b) and -e^a [j = current node].
    """
    st, k = g.steps, g.k
    ea, eb = el[st], el[st + 1]
    if k == 1:
        J = (eb - ea)[:, None]
        if not with_grad:
            return J, None, None
        return J, -ea[:, None, None], eb[:, None]
    h0, h1, h2 = (x[st][:, None] for x in H)
    u = lam[g.nodes] - lam[st][:, None]                 # (G, k), last column 0
    diff = u[:, :, None] - u[:, None, :]                # [j, i] = u_j - u_i
    eye = np.eye(k, dtype=bool)
    diff[:, eye] = 1.0
    w = 1.0 / np.prod(diff, axis=2)                     # barycentric weights
    e1 = u.sum(axis=1, keepdims=True) - u               # sum of the other offsets
    if k == 2:
        J = ea[:, None] * w * (h1 - e1 * h0)
    else:
        e2 = u[:, [1, 0, 0]] * u[:, [2, 2, 1]]          # product of the two other offsets
        J = ea[:, None] * w * (h2 - e1 * h1 + e2 * h0)
    if not with_grad:
        return J, None, None
    inv = 1.0 / diff
    inv[:, eye] = 0.0
    # D[g, j, m] = L_j'(x_m): (w_j / w_m) / (x_m - x_j) off the diagonal, sum_{i!=j} 1/(x_j - x_i) on it
    D = -(w[:, :, None] / w[:, None, :]) * inv
    D[:, eye] = inv.sum(axis=2)
    dJn = -D * J[:, None, :]
    dJn[:, k - 1, k - 1] -= ea
    tb = (lam[st + 1] - lam[st])[:, None] - u           # b - x_i > 0
    Lb = w * np.prod(tb, axis=1, keepdims=True) / tb    # L_j(b)
    return J, dJn, eb[:, None] * Lb


def _error_weights(schedule: NoiseSchedule, lam: np.ndarray, p: float, with_grad: bool):
    """eps~ = sigma^p / alpha (Lemma 1 / Algorithm 1) with the family's own alpha and sigma, and its
    derivative in lambda by a complex step through NoiseSchedule.alpha_sigma_of_lambda
    (f(l + i t) = f(l) + i t f'(l) + O(t^2): exact to rounding, no subtraction)."""
    if not with_grad:
        alpha, sigma = schedule.alpha_sigma_of_lambda(lam)
        return sigma ** p / alpha, None
    step = 1e-20
    alpha, sigma = schedule.alpha_sigma_of_lambda(lam + 1j * step)
    e = sigma ** p / alpha
    return e.real.copy(), e.imag / step


def _evaluate(lam, schedule, struct, p, delta, with_grad):
    """Surrogate (and its gradient in every lambda) at the full grid; |c| smoothed if delta > 0."""
    n = struct.steps
    err, derr = _error_weights(schedule, lam[:n], p, with_grad)
    el = np.exp(lam)
    H = _phi_integrals(np.diff(lam))
    total = 0.0
    c = np.zeros(n)
    parts = []
    for g in struct.groups:
        J, dJn, dJb = _weights(lam, el, H, g, with_grad)
        v = err[g.nodes] * J                             # (G, k) terms eps~_i J_j
        norms = None
        if g.summed_nodes.size < v.size:
            norms = np.sqrt(np.einsum("gj,gj->g", v, v))
            total += float(norms[g.per_step].sum())
        if g.summed_nodes.size:
            c += np.bincount(g.summed_nodes, weights=v[~g.per_step].ravel(), minlength=n)
        parts.append((g, J, dJn, dJb, v, norms))
    if delta > 0:
        r = np.sqrt(c * c + delta * delta)
        total += float(np.sum(r)) - n * delta
        sgn = c / r
    else:
        total += float(np.sum(np.abs(c)))
        sgn = np.sign(c)
    if not with_grad:
        return total, None
    m = n + 1
    grad = np.zeros(m)
    for g, J, dJn, dJb, v, norms in parts:
        if norms is None:
            gv = sgn[g.nodes]
        elif g.summed_nodes.size == 0:
            gv = v / norms[:, None]
        else:
            gv = np.where(g.per_step[:, None], v / norms[:, None], sgn[g.nodes])
        ge = gv * err[g.nodes]                           # d objective / d J
        node_grad = gv * J * derr[g.nodes] + np.einsum("gj,gjm->gm", ge, dJn)
        grad += np.bincount(g.nodes.ravel(), weights=node_grad.ravel(), minlength=m)
        grad += np.bincount(g.steps + 1, weights=np.einsum("gj,gj->g", ge, dJb), minlength=m)
    return total, grad


def _orders_for(solver, steps: int, final_sigma_zero: bool = True) -> list[int]:
    if isinstance(solver, str):
        return solver_orders(solver, steps, final_sigma_zero)
    orders = [int(k) for k in solver]
    if len(orders) != steps:
        raise ValueError(f"need {steps} step orders, got {len(orders)}")
    return orders


def _checked_grid(lambdas, struct: _Structure) -> np.ndarray:
    lam = np.asarray(lambdas, dtype=np.float64)
    if lam.shape != (struct.steps + 1,):
        raise ValueError(f"need {struct.steps + 1} lambdas for {struct.steps} steps, got {lam.shape}")
    if not np.all(np.isfinite(lam)) or np.any(np.diff(lam) <= 0):
        raise ValueError("lambdas must be finite and strictly increasing")
    return lam


def objective(lambdas, schedule: NoiseSchedule, orders, p: float = 2,
              trunc_num: int | None = None) -> float:
    """The paper's surrogate (eq. 35, in the released code's form, see the module docstring) at the
    full grid lambda_0 < .. < lambda_N, endpoints included.

    `orders`: the step orders k_s, or a sampler name for `solver_orders`. `p`: the error exponent
    of eps~ = sigma^p / alpha. `trunc_num`: steps below it add their per-step L2 norm; None takes
    `default_trunc_num` (the original code always uses 3).
    """
    n = len(lambdas) - 1
    struct = _structure(_orders_for(orders, n), default_trunc_num(n) if trunc_num is None else trunc_num)
    return float(_evaluate(_checked_grid(lambdas, struct), schedule, struct, p, 0.0, False)[0])


def objective_and_gradient(lambdas, schedule: NoiseSchedule, orders, p: float = 2,
                           trunc_num: int | None = None, smoothing: float = 0.0):
    """`objective` and its analytic gradient with respect to every lambda (endpoints included).

    `smoothing` > 0 replaces each |c_i| by sqrt(c_i^2 + smoothing^2) - smoothing (the form the
    optimizer minimizes); at 0 the gradient takes sign(c_i) on the kinks of sum |c_i|.
    """
    n = len(lambdas) - 1
    struct = _structure(_orders_for(orders, n), default_trunc_num(n) if trunc_num is None else trunc_num)
    total, grad = _evaluate(_checked_grid(lambdas, struct), schedule, struct, p, smoothing, True)
    return float(total), grad


# ----------------------------------------------------------------------------------------------
# Initial grids
# ----------------------------------------------------------------------------------------------
def _working_range(schedule: NoiseSchedule) -> tuple[float, float]:
    """The lambda interval the objective is evaluated on. A flow model whose sigma_max is 1 starts
    at pure noise (alpha = 0, lambda = -inf, eps~ infinite): its first point is taken at the mirror
    of sigma_min, lambda = -lambda_max, for the objective; the schedule still starts at sigma_max."""
    lo, hi = schedule.lambda_min, schedule.lambda_max
    if not np.isfinite(lo):
        lo = min(-hi, hi - 1.0)
    if not (np.isfinite(hi) and lo < hi):
        raise ValueError(f"cannot optimize time steps on lambda range [{lo}, {hi}]")
    return float(lo), float(hi)


def initial_lambdas(schedule: NoiseSchedule, steps: int, init: InitSpec = "uniform_lambda") -> np.ndarray:
    """The starting grid: steps + 1 increasing lambdas from lambda_min to lambda_max (for a flow
    model that starts at sigma = 1, from the floor -lambda_max instead of -inf: at alpha = 0 eps~
    is infinite).

    - 'uniform_lambda': uniform in lambda (the released code's 'unif', its advice for pixel models);
    - 'karras': rho = 7 in ComfyUI's sigma (Karras et al. 2022), sigma_max -> sigma_min;
    - an array of steps + 1 ComfyUI sigmas (descending; a final 0 is allowed), or a callable
      steps -> such an array: e.g. the model's own uniform-timestep schedule, the 'unif_t' start the
      released code advises for latent models ('uniform_t' itself needs the model's timesteps, which
      a NoiseSchedule does not know: pass those sigmas).
    The endpoints are always the schedule's own; interior points must lie strictly inside.
    """
    steps = int(steps)
    lo, hi = _working_range(schedule)
    if callable(init):
        init = init(steps)
    if isinstance(init, str):
        if init == "uniform_lambda":
            return np.linspace(lo, hi, steps + 1)
        if init == "karras":
            rho = 7.0
            smin, smax = schedule.sigma_min, schedule.sigma_max
            ramp = np.linspace(0.0, 1.0, steps + 1)
            sig = (smax ** (1 / rho) + ramp * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
            lam = np.asarray(schedule.lambda_(sig), dtype=np.float64)
        elif init == "uniform_t":
            raise ValueError("init 'uniform_t' needs the model's timesteps: pass its uniform-timestep "
                             "sigmas (an array of steps + 1 values, or a callable steps -> sigmas)")
        else:
            raise ValueError(f"unknown init {init!r}: expected 'uniform_lambda', 'karras', "
                             f"an array of sigmas or a callable")
    else:
        sig = np.asarray(init, dtype=np.float64).ravel()
        if sig.shape != (steps + 1,):
            raise ValueError(f"initial sigmas: need {steps + 1} values for {steps} steps, got {sig.size}")
        inner = sig[1:-1]
        if np.any(~np.isfinite(inner)) or np.any(inner >= schedule.sigma_max) \
                or np.any(inner <= schedule.sigma_min) or np.any(np.diff(inner) >= 0):
            raise ValueError("initial sigmas: the interior values must decrease strictly inside "
                             "(sigma_min, sigma_max)")
        lam = np.empty(steps + 1)
        lam[1:-1] = schedule.lambda_(inner)
    lam[0], lam[-1] = lo, hi
    return lam


def _feasible(lam: np.ndarray, margin: float) -> np.ndarray:
    """Move a grid strictly inside {h_i >= margin}: every step gets at least 2 * margin, the
    excess above that keeps its proportions."""
    h = np.diff(lam)
    if np.all(h >= 2 * margin):
        return lam
    excess = np.maximum(h - 2 * margin, 0.0)
    room = (lam[-1] - lam[0]) - 2 * margin * h.size
    h = 2 * margin + (excess * (room / excess.sum()) if excess.sum() > 0 else room / h.size)
    out = lam[0] + np.concatenate(([0.0], np.cumsum(h)))
    out[-1] = lam[-1]
    return out


# ----------------------------------------------------------------------------------------------
# The optimization (Algorithm 1, step 3)
# ----------------------------------------------------------------------------------------------
# All settings act on the objective divided by its starting value, so they hold for every family
# and scale. Chosen on the SD1.5 schedule, N = 4..15 (benchmarks/trust_region_parity.py).
_SMOOTHING = 1e-4       # |c| -> sqrt(c^2 + d^2) - d with d = 1e-4 of the starting objective
_MARGIN = 1e-3          # minimum step length, as a fraction of the mean step length in lambda
_WARM_START = {"maxiter": 400, "gtol": 1e-6}
_TRUST_CONSTR = {
    # the constraints are not active at a regular optimum (they only keep steps above the margin):
    # a small initial barrier leaves the objective almost undistorted from the first iteration
    "initial_barrier_parameter": 1e-4,
    "initial_barrier_tolerance": 1e-4,
    # stop once the schedule no longer moves visibly (scipy's defaults, 1e-8, polish for long)
    "gtol": 1e-4,
    "xtol": 1e-6,
    "barrier_tol": 1e-4,
}
# trust-constr iterations: after the warm start it only has to confirm the optimum (1 iteration when
# BFGS converged); alone it needs hundreds at N >= 10
_MAXITER = {True: 50, False: 500}


def optimize_lambdas(schedule: NoiseSchedule, steps: int, solver="uni_pc",
                     init: InitSpec = "uniform_lambda", error_exponent: float = 2,
                     trunc_num: int | None = None, final_sigma_zero: bool = True,
                     warm_start: bool = True, check=None) -> np.ndarray:
    """Optimized half-log-SNR grid (Algorithm 1): steps + 1 increasing lambdas from
    schedule.lambda_min to schedule.lambda_max (lambda_min is -inf for a flow model that starts at
    sigma = 1; its objective is evaluated from the floor of `initial_lambdas`).

    Minimizes `objective` over the interior points with scipy's constrained trust region method
    (trust-constr; analytic gradient, BFGS Hessian) under the linear constraints
    lambda_{i+1} - lambda_i >= margin > 0 (the paper's strict lambda_{t_{n+1}} > lambda_{t_n}: no step
    ever has zero length; margin = 1e-3 of the mean step). The kinks of sum_i |c_i| are smoothed,
    |c| -> sqrt(c^2 + d^2) - d with d = 1e-4 of the starting objective (the optimum of the smoothed
    problem is within ~0.03 % of the exact one; 1e-3 costs ~0.2 %, and with the kinks left in
    trust-constr stalls in clearly worse points, e.g. 9.17 instead of 8.57 at N = 7).

    With `warm_start` (the default), trust-constr starts from a BFGS solution of the same smoothed
    problem in the unconstrained parametrization h = margin + (span - N margin) softmax(z) of the
    step lengths, monotone by construction; trust-constr then checks the KKT conditions under the
    linear constraints (one iteration when BFGS converged) and otherwise continues for at most 50
    iterations. Same optima, ~5-10x faster: a trust-constr iteration costs ~2 ms of scipy overhead
    against ~0.2 ms for BFGS, and trust-constr needs 2-3x more of them here (hundreds at N >= 10).
    warm_start=False runs trust-constr alone (at most 500 iterations). Of the start and the stages'
    results, the best under the exact objective is returned: never worse than the start.

    `solver`: a sampler name for `solver_orders`, or the step orders themselves. `init`: see
    `initial_lambdas`. `error_exponent`: p in eps~ = sigma^p / alpha (the paper's Algorithm 1; the
    released code uses 2). `trunc_num`: None for the rule 3 if steps <= 7 else 0; the released code
    always uses 3. `final_sigma_zero`: whether the schedule will end at sigma 0 (dpmpp_2m then
    lowers its last step to first order). `check()`, if given, is called at every iteration of both stages
    and may raise to stop the solve (the node passes ComfyUI's Cancel check).
    """
    steps = int(steps)
    orders = _orders_for(solver, steps, final_sigma_zero)
    tn = default_trunc_num(steps) if trunc_num is None else int(trunc_num)
    struct = _structure(orders, tn)
    lam0 = initial_lambdas(schedule, steps, init)
    if steps > 1:
        margin = _MARGIN * (lam0[-1] - lam0[0]) / steps
        lam0 = _feasible(lam0, margin)
        p = float(error_exponent)
        f0 = _evaluate(lam0, schedule, struct, p, 0.0, False)[0]
        if not np.isfinite(f0) or f0 <= 0:
            raise ValueError(f"the objective is {f0} at the initial grid")
        delta = _SMOOTHING * f0
        best, fbest = lam0, f0
        lam = lam0
        stages = ("bfgs", "trust-constr") if warm_start else ("trust-constr",)
        for stage in stages:
            if stage == "bfgs":
                lam = _softmax_bfgs(schedule, struct, p, lam, margin, delta, f0, check)
            else:
                lam = _trust_constr(schedule, struct, p, _feasible(lam, margin), margin, delta, f0, check,
                                    _MAXITER[bool(warm_start)])
            f = _evaluate(lam, schedule, struct, p, 0.0, False)[0]
            if np.isfinite(f) and f < fbest:
                best, fbest = lam, f
        lam0 = best
    lam0 = lam0.copy()
    lam0[0] = schedule.lambda_min
    return lam0


def _callback(check):
    """A scipy minimize callback (any signature) that runs `check()`, or None."""
    return None if check is None else (lambda *args, **kwargs: check())


def _trust_constr(schedule, struct, p, lam0, margin, delta, scale, check, maxiter):
    """trust-constr on the smoothed surrogate (divided by `scale`) from lam0, under the linear
    constraints lambda_{i+1} - lambda_i >= margin (endpoints fixed)."""
    lo, hi = lam0[0], lam0[-1]
    steps = struct.steps

    def fun(x):
        lam = np.concatenate(([lo], x, [hi]))
        f, g = _evaluate(lam, schedule, struct, p, delta, True)
        return f / scale, g[1:-1] / scale

    # rows: lambda_1 - lambda_0, lambda_{i+1} - lambda_i, lambda_N - lambda_{N-1}
    a = np.zeros((steps, steps - 1))
    idx = np.arange(steps - 1)
    a[idx, idx] = 1.0
    a[idx + 1, idx] = -1.0
    lb = np.full(steps, margin)
    lb[0] += lo
    lb[-1] -= hi
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")            # BFGS "delta_grad == 0" notes near the optimum
        res = minimize(fun, lam0[1:-1], jac=True, method="trust-constr",
                       constraints=[LinearConstraint(a, lb, np.inf)],
                       options=dict(_TRUST_CONSTR, maxiter=maxiter), callback=_callback(check))
    lam = np.concatenate(([lo], res.x, [hi]))
    if np.all(np.isfinite(lam)) and np.all(np.diff(lam) > 0):
        return lam
    return lam0


def _softmax_bfgs(schedule, struct, p, lam0, margin, delta, scale, check):
    """BFGS on the smoothed surrogate in the step-length parametrization
    h = margin + room * softmax(z), room = span - N * margin: unconstrained and monotone."""
    lo, hi = lam0[0], lam0[-1]
    room = (hi - lo) - struct.steps * margin
    z0 = np.log((np.diff(lam0) - margin) / room)

    def grid(z):
        q = np.exp(z - z.max())
        q /= q.sum()
        lam = lo + np.concatenate(([0.0], np.cumsum(margin + room * q)))
        lam[-1] = hi
        return lam, q

    def fun(z):
        lam, q = grid(z)
        f, g = _evaluate(lam, schedule, struct, p, delta, True)
        g[0] = g[-1] = 0.0
        gh = np.cumsum(g[::-1])[::-1][1:]            # d/dh_i = sum of d/dlambda_j over j > i
        return f / scale, room * q * (gh - q @ gh) / scale

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = minimize(fun, z0, jac=True, method="BFGS", options=dict(_WARM_START), callback=_callback(check))
    lam = grid(res.x)[0]
    return lam if np.all(np.isfinite(lam)) else lam0


def time_step_sigmas(schedule: NoiseSchedule, steps: int, solver="uni_pc",
                     init: InitSpec = "uniform_lambda", error_exponent: float = 2,
                     trunc_num: int | None = None, final_sigma_zero: bool = True,
                     warm_start: bool = True, check=None) -> np.ndarray:
    """Optimized ComfyUI sigmas (steps + 1, strictly decreasing) from sigma_max: the last one is 0
    (the Align-Your-Steps convention) or, with final_sigma_zero=False, sigma_min. The arguments are
    those of `optimize_lambdas`."""
    lam = optimize_lambdas(schedule, steps, solver, init, error_exponent, trunc_num,
                           final_sigma_zero, warm_start, check)
    sig = np.asarray(schedule.sigma_of_lambda(lam), dtype=np.float64)
    sig[0] = schedule.sigma_max
    sig[-1] = 0.0 if final_sigma_zero else schedule.sigma_min
    return sig


def discrete_vp_uniform_t_sigmas(betas, steps: int, t_end: float = 1e-3) -> np.ndarray:
    """The released code's 'unif_t' start on a discrete VP model (NoiseScheduleVP('discrete')):
    t uniform from 1 to t_end, log alpha piecewise linear in t through
    (i / len(betas), 0.5 * cumsum(log(1 - beta))_i), i = 1..len(betas); returned as ComfyUI sigmas
    sqrt(1 / alpha^2 - 1), steps + 1 of them, descending."""
    betas = np.asarray(betas, dtype=np.float64)
    log_alpha = 0.5 * np.cumsum(np.log1p(-betas))
    t_grid = np.linspace(0.0, 1.0, betas.size + 1)[1:]
    t = np.linspace(1.0, t_end, int(steps) + 1)
    la = np.interp(t, t_grid, log_alpha)
    return np.sqrt(np.expm1(-2.0 * la))
