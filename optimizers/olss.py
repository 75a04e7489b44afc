"""OLSS, Optimal Linear Subspace Search (Duan, Wang, Chen, Huang, Qian; CIKM 2023).

An n-step sampler whose every update is a free linear combination of the start x_T and all model
outputs so far (paper eq. 9 and 12), one coefficient vector shared by every sample and pixel, fitted
by least squares to a long teacher run; which teacher steps to keep is searched by bisection on the
largest per-step error with a greedy feasibility test (Algorithms 1-3). OLSS-P keeps the teacher
steps at equal intervals instead (no search).

In ComfyUI's coordinates the model output is the denoised prediction D rather than eps. The span is
the same: every deterministic solver's x_{t(i+1)} lies in span{x_T, D_{t(1)}, ..., D_{t(i)}} (eq. 9).

Every least-squares problem, of the fit and of the path search, has as basis the teacher's start x_0
and some of its outputs D_j, and as target a teacher state x_k, itself an exact combination of x_0 and
the D_j (`teacher.state_combinations`). So the big tensors are read once, into the Gram matrix G of
[x_0, D_0, ..., D_{T-1}] (`trajectory_gram`); afterwards each problem is a small solve on a
submatrix of G and of G M^T. Per-step errors are measured in the family's own scale (VP for EPS and
V models: x_c times `NoiseSchedule.native_scale`) relative to the norm of the teacher's final x, so
the bisection bracket does not depend on how ComfyUI scales its states.

Beyond the paper, `SequentialResolve` re-solves each step's coefficients while the sampler runs on the
calibration batch, with the student's own outputs as basis (those the sampler meets when it samples,
not the teacher's); the calibration node keeps such a re-solve only where cross-validation says it
generalises (`nodes/methods/olss.py`).

Pure torch and numpy; never imports comfy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .calibration import check_same_sigmas
from .coordinates import NoiseSchedule
from .teacher import Trajectory, state_combinations, step_coefficients

# Work (N^2 L multiply-adds) up to which the Gram matrix is computed in float64; above, in float32
# (deflated, see `gram_matrix`) and accumulated in float64.
_FLOAT64_WORK = 4e9
# Relative ridge on the unit-diagonal normal matrix, above the Gram matrix's own rounding error.
_RIDGE = {torch.float64: 1e-12, torch.float32: 1e-7}
_PIECE = 16384     # elements per copy: below torch's parallel grain, so copies never wait on busy threads


def _compute_dtype(n: int, length: int) -> torch.dtype:
    return torch.float64 if n * n * length <= _FLOAT64_WORK else torch.float32


def _copy_rows(dst, rows, start: int, width: int):
    """dst[s] = rows[s][start:start + width] with dtype conversion, in single-threaded pieces."""
    for s, row in enumerate(rows):
        for a in range(0, width, _PIECE):
            b = min(a + _PIECE, width)
            dst[s, a:b].copy_(row[start + a:start + b])


def _anchor_interpolation(n: int, anchors: int) -> tuple[list, torch.Tensor, list]:
    """Anchor indices (0, then `anchors` spread evenly over 1..n-1); C [n, K]: every vector as the
    linear interpolation, along the index, of its two neighbouring anchors (vector 0 alone); and the
    blocks (rows, columns) of C that are not zero."""
    spread = sorted({round(1 + i * (n - 2) / max(anchors - 1, 1)) for i in range(anchors)} & set(range(1, n)))
    chosen = [0] + spread
    c = torch.zeros(n, len(chosen), dtype=torch.float32)
    c[0, 0] = 1
    blocks = [(slice(0, 1), slice(0, 1))]
    for k, (lo, hi) in enumerate(zip(spread, spread[1:] + [n])):
        for j in range(lo, hi):
            t = (j - lo) / (hi - lo) if hi < n else 0.0
            c[j, 1 + k] = 1 - t
            if t:
                c[j, 2 + k] = t
        blocks.append((slice(lo, hi), slice(1 + k, min(3 + k, len(chosen)))))
    return chosen, c, blocks


def gram_matrix(vectors, chunk_bytes: int = 256 << 20, compute_dtype: torch.dtype | None = None,
                anchors: int = 32) -> torch.Tensor:
    """G[s, t] = <v_s, v_t> in float64 for equally shaped tensors `vectors`, on their device.

    The vectors are read in slices of their flattened length, one [N, chunk] buffer of at most
    `chunk_bytes` at a time; each slice's products are computed in `compute_dtype` (float64 for
    small problems, else float32) on the upper block triangle only and accumulated in float64.

    In float32 the vectors are deflated first (a two-level Gram matrix): v = C a + r with a the
    vectors at a few anchor indices and C the linear interpolation between neighbouring anchors
    (vectors[1:] are a teacher's outputs, smooth along the index; vectors[0] is its own anchor).
    Then G = C G_aa C^T + C G_ar + G_ra C^T + G_rr with G_aa in float64, and float32 rounding only
    touches products with the small residuals r: about 1e-8 instead of 1e-6 relative on a teacher.
    """
    n = len(vectors)
    flat = [v.reshape(-1) for v in vectors]
    length = flat[0].numel()
    device = flat[0].device
    compute_dtype = compute_dtype or _compute_dtype(n, length)
    deflate = compute_dtype != torch.float64 and n > 2
    itemsize = torch.finfo(compute_dtype).bits // 8
    chunk = max(1, min(length, chunk_bytes // (n * itemsize)))
    blocks = max(1, math.ceil(n / 256))
    edges = [round(b * n / blocks) for b in range(blocks + 1)]
    residual_gram = torch.zeros(n, n, dtype=torch.float64, device=device)
    buffer = torch.empty(n, chunk, dtype=compute_dtype, device=device)
    if deflate:
        chosen, interpolation, nonzero = _anchor_interpolation(n, anchors)
        interpolation = interpolation.to(device, compute_dtype)
        anchor_rows = [flat[k] for k in chosen]
        anchor_buffer = torch.empty(len(chosen), chunk, dtype=compute_dtype, device=device)
        anchor_buffer64 = torch.empty(len(chosen), chunk, dtype=torch.float64, device=device)
        anchor_gram = torch.zeros(len(chosen), len(chosen), dtype=torch.float64, device=device)
        anchor_cross = torch.zeros(len(chosen), n, dtype=torch.float64, device=device)
    for start in range(0, length, chunk):
        width = min(chunk, length - start)
        rows = buffer[:, :width]
        _copy_rows(rows, flat, start, width)
        if deflate:
            a = anchor_buffer[:, :width]
            _copy_rows(a, anchor_rows, start, width)
            a64 = anchor_buffer64[:, :width]
            _copy_rows(a64, anchor_rows, start, width)
            anchor_gram += a64 @ a64.T
            for r, k in nonzero:
                rows[r].addmm_(interpolation[r, k], a[k], alpha=-1)
            anchor_cross += (a @ rows.T).double()
        for bi in range(blocks):
            left = rows[edges[bi]:edges[bi + 1]]
            for bj in range(bi, blocks):
                product = left @ rows[edges[bj]:edges[bj + 1]].T
                residual_gram[edges[bi]:edges[bi + 1], edges[bj]:edges[bj + 1]] += product.double()
    gram = torch.triu(residual_gram) + torch.triu(residual_gram, 1).T
    if deflate:
        c = interpolation.double()
        mixed = c @ anchor_cross
        smooth = c @ anchor_gram @ c.T
        gram += 0.5 * (smooth + smooth.T) + (mixed + mixed.T)
    return gram


@dataclass
class TrajectoryGram:
    """Everything the OLSS least-squares problems need from a teacher run, without its tensors.

    Basis vectors b = [x_0, D_0, ..., D_{T-1}]: index 0 is the start, 1 + j the output D_j. Target
    index k: the teacher state x_k = M[k] . b, k = 0..T (x_T the final x, at sigma 0).
    """

    sigmas: torch.Tensor          # [T + 1] the teacher's sigmas, as recorded
    gram: torch.Tensor            # [T + 1, T + 1] float64, <b_s, b_t>
    cross: torch.Tensor           # [T + 1, T + 1] float64, <b_s, x_k> = (G M^T)[s, k]
    target_sq: torch.Tensor       # [T + 1] float64, |x_k|^2
    error_scale: torch.Tensor     # [T + 1] float64, native_scale(sigma_k) / |x_T|
    ridge: float                  # relative Tikhonov regularisation of the unit-diagonal normal matrix

    @property
    def teacher_steps(self) -> int:
        return len(self.sigmas) - 1

    def least_squares(self, basis, targets):
        """Coefficients w [..., s, K] minimising |x_k - sum_s w[s, k] b_s| and those errors [..., K].

        Normal equations on G (paper eq. 12 solved through the Gram matrix) after scaling the basis to
        unit norm, with a relative ridge so that rank-deficient bases (duplicates, batch size 1) still
        give finite, small-norm coefficients; an eigen-decomposition pseudo-inverse where the Cholesky
        factorisation fails. Errors are in the family's own scale relative to |x_T| (see module doc).
        These systems are tiny: they are solved in numpy float64, which carries no per-call thread
        start-up cost.
        """
        g, c, basis, targets = self._blocks(basis, targets)
        d = np.sqrt(np.clip(np.diagonal(g, axis1=-2, axis2=-1), 0, None))
        d = np.where(d > 0, d, 1.0)
        a = g / (d[..., :, None] * d[..., None, :]) + self.ridge * np.eye(g.shape[-1])
        rhs = c / d[..., :, None]
        try:
            np.linalg.cholesky(a)                       # positive definite: a plain solve is stable
            z = np.linalg.solve(a, rhs)
        except np.linalg.LinAlgError:
            values, vectors = np.linalg.eigh(a)
            cutoff = np.clip(values.max(-1, keepdims=True), 0, None) * self.ridge
            inverse = np.where(values > cutoff, 1 / np.where(values > cutoff, values, 1.0), 0.0)
            z = vectors @ (inverse[..., :, None] * (np.swapaxes(vectors, -1, -2) @ rhs))
        w = z / d[..., :, None]
        return torch.from_numpy(w), self._errors(g, c, w, targets)

    def errors_of(self, basis, weights, targets):
        """Errors (as in `least_squares`) of given coefficients weights [..., s, K] on that basis."""
        g, c, _, targets = self._blocks(basis, targets)
        return self._errors(g, c, torch.as_tensor(weights, dtype=torch.float64).numpy(), targets)

    def _blocks(self, basis, targets):
        basis = np.asarray(basis, dtype=np.int64)
        targets = np.asarray(targets, dtype=np.int64)
        g = self.gram.numpy()[basis[..., :, None], basis[..., None, :]]
        c = self.cross.numpy()[basis[..., :, None], targets[..., None, :]]
        return g, c, basis, targets

    def _errors(self, g, c, w, targets):
        sq = self.target_sq.numpy()[targets] - 2 * (w * c).sum(-2) + (w * (g @ w)).sum(-2)
        return torch.from_numpy(np.sqrt(np.clip(sq, 0, None)) * self.error_scale.numpy()[targets])


def trajectory_gram(trajectory: Trajectory, schedule: NoiseSchedule, chunk_bytes: int = 256 << 20,
                    compute_dtype: torch.dtype | None = None, ridge: float | None = None) -> TrajectoryGram:
    """Read a teacher run once: the Gram matrix of [x_0, D_0, ..., D_{T-1}] and, through the teacher's
    own state combinations M (x_k = M[k] . [x_0, D]), every inner product the OLSS fits need.

    The trajectory must come from `teacher.sample_teacher` with this schedule and its sigmas.
    `ridge` defaults to 1e-12 for a float64 Gram matrix and 1e-7 for float32 blocks.
    """
    vectors = [trajectory.states[0]] + list(trajectory.denoised)
    if len(vectors) != len(trajectory.sigmas):
        raise ValueError(f"trajectory has {len(trajectory.denoised)} outputs for {len(trajectory.sigmas)} sigmas")
    compute_dtype = compute_dtype or _compute_dtype(len(vectors), vectors[0].numel())
    gram = gram_matrix(vectors, chunk_bytes, compute_dtype).cpu()
    combinations = state_combinations(schedule, trajectory.sigmas)
    cross = gram @ combinations.T
    target_sq = (combinations * cross.T).sum(1).clamp_min(0)
    sigmas = trajectory.sigmas.detach().cpu()
    scale = torch.ones(len(sigmas), dtype=torch.float64) * schedule.native_scale(sigmas.double())
    final_norm = float(target_sq[-1].sqrt())
    error_scale = scale / (final_norm if final_norm > 0 else 1.0)
    return TrajectoryGram(sigmas, gram, cross, target_sq, error_scale,
                          _RIDGE[compute_dtype] if ridge is None else ridge)


@dataclass
class OLSSCoefficients:
    """An n-step OLSS sampler: x_{i+1} = weights_x[i] x_T + sum_{j<=i} weights_d[i, j] D_j (eq. 12)."""

    path: tuple                  # n teacher step indices, path[0] = 0
    sigmas: torch.Tensor         # [n + 1] student sigmas: the teacher's at the path, then 0
    weights_x: torch.Tensor      # [n] float64
    weights_d: torch.Tensor      # [n, n] float64, lower-triangular
    errors: torch.Tensor         # [n] float64, per-step fit error (family scale, relative to |x_T|)

    @property
    def steps(self) -> int:
        return len(self.path)

    def copy(self) -> "OLSSCoefficients":
        return OLSSCoefficients(self.path, self.sigmas, self.weights_x.clone(), self.weights_d.clone(),
                                self.errors.clone())


def _check_path(path, teacher_steps: int) -> list:
    path = [int(p) for p in path]
    if not path or path[0] != 0:
        raise ValueError(f"an OLSS path starts at teacher index 0, got {path}")
    if any(b <= a for a, b in zip(path, path[1:])) or path[-1] >= teacher_steps:
        raise ValueError(f"an OLSS path must increase strictly and stay below {teacher_steps}, got {path}")
    return path


def _step_problem(path, i: int, teacher_steps: int):
    """Basis (x_0 and D at path[0..i]) and target index of step i of a path (eq. 12)."""
    basis = [0] + [1 + p for p in path[:i + 1]]
    target = path[i + 1] if i + 1 < len(path) else teacher_steps
    return basis, target


def fit_olss(gram: TrajectoryGram, path) -> OLSSCoefficients:
    """Least-squares coefficients of eq. 12 for every step of a path of teacher indices.

    Step i targets the teacher state at path[i + 1] (the final x for the last step) from x_0 and the
    outputs D at path[0..i].
    """
    path = _check_path(path, gram.teacher_steps)
    n = len(path)
    weights_x = torch.zeros(n, dtype=torch.float64)
    weights_d = torch.zeros(n, n, dtype=torch.float64)
    errors = torch.zeros(n, dtype=torch.float64)
    for i in range(n):
        basis, target = _step_problem(path, i, gram.teacher_steps)
        w, error = gram.least_squares(basis, [target])
        weights_x[i] = w[0, 0]
        weights_d[i, :i + 1] = w[1:, 0]
        errors[i] = error[0]
    sigmas = gram.sigmas[path + [gram.teacher_steps]].clone()
    return OLSSCoefficients(tuple(path), sigmas, weights_x, weights_d, errors)


def step_errors(gram: TrajectoryGram, path, weights_x, weights_d) -> torch.Tensor:
    """Per-step errors (as in `fit_olss`) of any coefficients on a path, e.g. DDIM's (`ddim_coefficients`)."""
    path = _check_path(path, gram.teacher_steps)
    errors = torch.zeros(len(path), dtype=torch.float64)
    for i in range(len(path)):
        basis, target = _step_problem(path, i, gram.teacher_steps)
        w = torch.cat([torch.as_tensor(weights_x, dtype=torch.float64)[i:i + 1],
                       torch.as_tensor(weights_d, dtype=torch.float64)[i, :i + 1]])
        errors[i] = gram.errors_of(basis, w[:, None], [target])[0]
    return errors


def ddim_coefficients(schedule: NoiseSchedule, sigmas):
    """DDIM (first-order DPM-Solver++) on these sigmas written in the OLSS basis: (weights_x [n],
    weights_d [n, n]) with x_{i+1} = a_i x_i + b_i D_i unrolled from x_T (paper eq. 2 and 9)."""
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    n = len(sigmas) - 1
    weights_x = torch.zeros(n, dtype=torch.float64)
    weights_d = torch.zeros(n, n, dtype=torch.float64)
    previous_x, previous_d = 1.0, torch.zeros(n, dtype=torch.float64)
    for i in range(n):
        a, (b,) = step_coefficients(schedule, sigmas[i:i + 2])[0]
        weights_x[i] = a * previous_x
        weights_d[i] = a * previous_d
        weights_d[i, i] = b
        previous_x, previous_d = weights_x[i], weights_d[i]
    return weights_x, weights_d


def uniform_path(teacher_steps: int, steps: int) -> list:
    """OLSS-P: `steps` teacher indices at (rounded) equal intervals, starting at 0."""
    if not 1 <= steps <= teacher_steps:
        raise ValueError(f"need 1 <= steps <= teacher steps ({teacher_steps}), got {steps}")
    return [round(i * teacher_steps / steps) for i in range(steps)]


def _greedy_path(gram: TrajectoryGram, steps: int, bound: float):
    """Algorithms 1-2: from index 0, step each time to the farthest teacher index whose one-step
    least-squares error (basis x_0 and D at the path so far) is within `bound`; the path if the
    final x is reached within `steps` steps (possibly in fewer), else None.

    Algorithm 1's binary search assumes the error grows with the index; this scans every candidate
    (one batched solve per step), which needs no such assumption.
    """
    T = gram.teacher_steps
    path = [0]
    while True:
        candidates = torch.arange(path[-1] + 1, T + 1)
        _, errors = gram.least_squares([0] + [1 + p for p in path], candidates)
        within = torch.nonzero(errors <= bound)
        if len(within) == 0:
            return None
        reached = int(candidates[within[-1, 0]])
        if reached == T:
            return path
        if len(path) == steps:
            return None
        path.append(reached)


def _fill_path(gram: TrajectoryGram, path: list, steps: int) -> list:
    """Lengthen a path that reaches the final x in fewer than `steps` steps: split the step with the
    largest error that spans more than one teacher interval, at the index minimising the larger of
    the two new errors. Later steps only gain basis vectors, so their errors do not grow."""
    T = gram.teacher_steps
    path = list(path)
    while len(path) < steps:
        errors = fit_olss(gram, path).errors
        ends = path[1:] + [T]
        i = next(int(i) for i in torch.argsort(errors, descending=True) if ends[i] - path[i] > 1)
        basis, end = _step_problem(path, i, T)
        q = torch.arange(path[i] + 1, ends[i])
        _, to_q = gram.least_squares(basis, q)
        grown = torch.cat([torch.tensor(basis).expand(len(q), -1), 1 + q[:, None]], 1)
        _, to_end = gram.least_squares(grown, torch.full((len(q), 1), end))
        path.insert(i + 1, int(q[torch.argmin(torch.maximum(to_q, to_end[:, 0]))]))
    return path


def search_path(gram: TrajectoryGram, steps: int, rtol: float = 1e-3, atol: float = 1e-9,
                keep_uniform_if_better: bool = True) -> list:
    """Algorithm 3: bisection on the largest per-step error D (eq. 13-14) with the greedy test of
    Algorithms 1-2, then `fit_olss` on the path it returns.

    The bracket starts at OLSS-P's largest error and doubles until the greedy test passes (the
    paper's fixed [0, 10] can be infeasible); bisection stops at relative width `rtol` (or absolute
    width `atol`, errors being relative to |x_T|). A path that
    reaches the end early is filled to exactly `steps` steps (`_fill_path`). The greedy test is a
    heuristic, so with `keep_uniform_if_better` the uniform path is returned where its largest
    error is smaller.
    """
    T = gram.teacher_steps
    uniform = uniform_path(T, steps)
    if steps == T:
        return uniform
    uniform_error = float(fit_olss(gram, uniform).errors.max())
    high = max(uniform_error, 1e-12)
    path = _greedy_path(gram, steps, high)
    while path is None:
        high *= 2
        path = _greedy_path(gram, steps, high)
    low = 0.0
    while high - low > max(rtol * high, atol):
        middle = 0.5 * (low + high)
        found = _greedy_path(gram, steps, middle)
        if found is None:
            low = middle
        else:
            high, path = middle, found
    path = _fill_path(gram, path, steps)
    if keep_uniform_if_better and float(fit_olss(gram, path).errors.max()) > uniform_error:
        return uniform
    return path


@dataclass
class SequentialResolve:
    """Asks `sample_olss`, run on the calibration batch, to re-solve every step's eq. 12 on the student's own
    outputs: the basis is x_T and the outputs D_j at the student's states (what the sampler will meet when
    it samples), the target the teacher's state at the next student sigma (`targets`), and the earlier
    steps already re-solved. The path and the count of coefficients stay; only their values change.

    The given (teacher-fitted) coefficients are the prior of a relative ridge; each step takes the ridge of
    `ridges` with the smallest leave-one-sample-out error, so a small or degenerate batch keeps the prior
    where the data cannot support more.
    """

    targets: list                 # [n] teacher states [B, ...] at the student sigmas after the first
    scales: list                  # [n] error scale per step (as `OLSSCoefficients.errors`)
    ridges: tuple = (1e-6, 1e-4, 1e-2, 1.0, 1e2, 1e6)
    rows: list | None = None      # fit on these samples only (the others are then held out)
    keep_prior: bool = False      # only measure the errors of the given coefficients
    chosen_ridges: list = field(default_factory=list)
    errors: list = field(default_factory=list)         # per step, re-solved
    prior_errors: list = field(default_factory=list)   # per step, the teacher-fitted coefficients from the same state

    def solve(self, i: int, basis: list, prior: torch.Tensor) -> torch.Tensor:
        """Step i's coefficients from basis [x_T, D_0, ..., D_i] (each [B, ...]); records both errors.

        Works on per-sample Gram matrices (k x k, float64), one sample's basis at a time, so memory stays
        at one latent's basis whatever the batch: |t - B w|^2 = t.t - 2 w.(B^T t) + w.(B^T B) w."""
        rows = range(len(basis[0])) if self.rows is None else self.rows
        grams, rhss, squares = [], [], []
        for s in rows:
            b = torch.stack([v[s].reshape(-1) for v in basis], 1).double()
            t = self.targets[i][s].reshape(-1).to(b.device, torch.float64)
            grams.append(b.T @ b)
            rhss.append(b.T @ t)
            squares.append(t @ t)
        grams, rhss, squares = torch.stack(grams), torch.stack(rhss), torch.stack(squares)
        prior = prior.to(grams)
        gram, rhs, square = grams.sum(0), rhss.sum(0), squares.sum(0)
        d = gram.diagonal().clamp_min(0).sqrt()
        d = torch.where(d > 0, d, torch.ones_like(d))
        eye = torch.eye(len(d), dtype=torch.float64, device=d.device)

        def residual(g, c, q, w):              # |t - B w|^2 from the Gram blocks
            return float((q - 2 * w @ c + w @ g @ w).clamp_min(0))

        def ridge_solve(g, c, ridge):
            return torch.linalg.solve(g / (d[:, None] * d[None, :]) + ridge * eye, c / d + ridge * prior * d) / d

        def loo(ridge):                        # leave-one-sample-out residual of this ridge
            return sum(residual(grams[s], rhss[s], squares[s], ridge_solve(gram - grams[s], rhs - rhss[s], ridge))
                       for s in range(len(grams))) if len(grams) > 1 else 0.0

        if self.keep_prior:
            w = prior
        else:
            ridge = min(self.ridges, key=loo)
            self.chosen_ridges.append(ridge)
            w = ridge_solve(gram, rhs, ridge)
        for store, coefficients in ((self.errors, w), (self.prior_errors, prior)):
            store.append(residual(gram, rhs, square, coefficients) ** 0.5 * self.scales[i])
        return w.cpu()


def _combine(weight_x: float, weights_d, x_T, outputs):
    """w_x x_T + sum_j w_d[j] D_j, in the one order every OLSS run uses (so stored coefficients replay bit for bit)."""
    x = weight_x * x_T
    for w, output in zip(weights_d, outputs):
        x = x.add(output, alpha=w)
    return x


@torch.no_grad()
def sample_olss(model, x, sigmas, extra_args=None, callback=None, disable=None, coefficients: OLSSCoefficients = None,
                resolve: SequentialResolve | None = None):
    """OLSS sampler (Duan et al. 2023, eq. 12): one model evaluation per student sigma, then
    x_{i+1} = w_x[i] x_T + sum_{j<=i} w_d[i, j] D_j with the fitted coefficients.

    With `resolve`, the coefficients are re-solved step by step on this run (`SequentialResolve`) and written
    back into `coefficients`."""
    if coefficients is None:
        raise ValueError("sample_olss needs fitted OLSS coefficients (coefficients=...)")
    check_same_sigmas(sigmas, coefficients.sigmas, "these OLSS coefficients")
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    weights_x, weights_d = coefficients.weights_x.tolist(), coefficients.weights_d.tolist()
    x_T, outputs = x, []
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        outputs.append(denoised)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        if resolve is not None:
            prior = torch.tensor([weights_x[i]] + weights_d[i][:i + 1], dtype=torch.float64)
            w = resolve.solve(i, [x_T] + outputs, prior)
            coefficients.weights_x[i], coefficients.weights_d[i, :i + 1] = w[0], w[1:]
            coefficients.errors[i] = resolve.errors[-1]
            weights_x[i], weights_d[i][:i + 1] = float(w[0]), w[1:].tolist()
        x = _combine(weights_x[i], weights_d[i][:i + 1], x_T, outputs)
    return x
