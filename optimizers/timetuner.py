"""TimeTuner (Xia et al., CVPR 2024): a tuned time input per step, for any deterministic sampler.

For student step i the network is fed the time input r_i * t instead of t (t = ComfyUI's
`model_sampling.timestep(sigma)`, the diffusion model's second positional argument), while the
sampler's own coefficients, the input scaling c_in and the output conversion keep the nominal sigma.
The ratios r_i are a function of the noise level (`TimeRatios`), so any sampler runs them unchanged:
`sample_timetuner` runs the sampler with a time-ratio hook installed in the model options (the hook is
comfy code, `nodes/methods/timetuner.py: with_time_ratio`, injected by the caller so this module stays free of
comfy).

The original fits each r_i by Adam on a noise-consistency loss with gradients through the network.
Here the sampling runs inside ComfyUI (under inference mode, any model), so `tune_time_ratios` fits each
r_i by a derivative-free bounded scalar search (Brent) on the quantity that matters: the RMSE between
the student's state after step i and a target state (a long accurate teacher run at the same sigma),
on the calibration batch, step after step (the student's own tuned states feed the next step).

Pure torch, numpy and scipy; never imports comfy.
"""
from __future__ import annotations

import torch

from .teacher import rmse


class TimeRatios:
    """One time-input ratio per knot sigma; a function of sigma.

    knots: the student schedule's positive sigmas, strictly descending. `ratios(sigma)` (elementwise,
    float64, on sigma's device) is the knot's ratio at a knot sigma exactly, linear in log(sigma)
    between neighbouring knots, and constant beyond the ends (above the first knot: the first ratio;
    below the last knot, sigma 0 included: the last ratio). Samplers that evaluate the model between
    schedule sigmas (heun's and dpm_2's intermediate points, uni_pc's final 0.001, ...) get the
    interpolated ratio there; heun's second evaluation of step i lies at sigmas[i + 1] and so uses
    r_{i+1}.
    """

    def __init__(self, sigmas, values=None):
        s = torch.as_tensor(sigmas).detach().to("cpu", torch.float64).flatten()
        s = s[s > 0]
        if len(s) == 0:
            raise ValueError("TimeRatios needs at least one positive sigma")
        if torch.any(s[1:] >= s[:-1]):
            raise ValueError("TimeRatios knots must be strictly descending")
        self.sigmas = s
        if values is None:
            self.values = torch.ones(len(s), dtype=torch.float64)
        else:
            if isinstance(values, torch.Tensor):
                self.values = values.detach().to("cpu", torch.float64).flatten().clone()
            else:
                self.values = torch.as_tensor(values, dtype=torch.float64).flatten().clone()
            if len(self.values) != len(s):
                raise ValueError(f"{len(self.values)} ratios for {len(s)} knot sigmas")
        self._log_ascending = s.log().flip(0)

    def __len__(self):
        return len(self.sigmas)

    def __call__(self, sigma) -> torch.Tensor:
        sigma = torch.as_tensor(sigma)
        q = sigma.detach().to("cpu", torch.float64).reshape(-1)
        values = self.values.flip(0)                        # ascending sigma
        knots = self._log_ascending
        if len(knots) == 1:
            out = values.expand(len(q)).clone()
        else:
            lq = torch.log(q.clamp_min(torch.finfo(torch.float64).tiny)).clamp(float(knots[0]), float(knots[-1]))
            hi = torch.searchsorted(knots, lq).clamp(1, len(knots) - 1)
            lo = hi - 1
            w = (lq - knots[lo]) / (knots[hi] - knots[lo])
            out = values[lo] + w * (values[hi] - values[lo])
            out = torch.where(w >= 1, values[hi], torch.where(w <= 0, values[lo], out))    # exact at knots
        return out.reshape(sigma.shape).to(sigma.device)

    def __repr__(self):
        pairs = ", ".join(f"{float(s):.4g}: {float(r):.4f}" for s, r in zip(self.sigmas, self.values))
        return f"TimeRatios({{{pairs}}})"


class _CountingModel:
    """Forwards everything to the wrapped k-diffusion model and counts its calls."""

    def __init__(self, model):
        self._model = model
        self.calls = 0

    def __getattr__(self, name):
        return getattr(self.__dict__["_model"], name)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self._model(*args, **kwargs)


def sample_timetuner(model, x, sigmas, extra_args=None, callback=None, disable=None, *, base, base_options=None,
                     ratios: TimeRatios, with_time_ratio, verify=None):
    """k-diffusion-style sampler: the `base` sampler function with the time input scaled by `ratios`.

    with_time_ratio(extra_args, ratios) -> extra_args with the time-input hook (nodes/methods/timetuner.py).
    verify(extra_args, model_calls), optional: raises if the hook never reached the network.
    With all ratios 1 the result is the base sampler's, bit for bit.
    """
    extra_args = {} if extra_args is None else extra_args
    new_extra_args = with_time_ratio(extra_args, ratios)
    counted = _CountingModel(model) if verify is not None else model
    out = base(counted, x, sigmas, extra_args=new_extra_args, callback=callback, disable=disable,
               **(base_options or {}))
    if verify is not None:
        verify(new_extra_args, counted.calls)
    return out


# ---------------------------------------------------------------------------------------------------
# tuning

class _Stop(Exception):
    """Raised inside a trial run once the state it is after is known."""

    def __init__(self, state):
        super().__init__()
        self.state = state


class _Call:
    __slots__ = ("x", "sigma", "ratio", "out")

    def __init__(self, x, sigma, ratio, out):
        self.x, self.sigma, self.ratio, self.out = x, sigma, ratio, out


class _TrialModel:
    """The model as the trial runs see it: memoised by call index against a reference run, stoppable.

    A call whose input x, sigma and applied ratio equal those of the same call index in `reference`
    returns the recorded output without running the model. `stop_before = c` stops the run before
    call c (its input is the state wanted); `stop_callback = k` stops it when the sampler reports step k.
    Attribute access goes to the wrapped model (samplers read model.inner_model..., etc.).
    """

    def __init__(self, model, ratios: TimeRatios):
        self._model = model
        self._ratios = ratios
        self.reference: list[_Call] = []
        self.record: list[_Call] = []
        self.events: dict[int, tuple[torch.Tensor, int]] = {}
        self.evaluations = 0
        self.stop_before = None
        self.stop_callback = None
        self.convert = None

    def __getattr__(self, name):
        return getattr(self.__dict__["_model"], name)

    def __call__(self, x, sigma, **kwargs):
        index = len(self.record)
        if index == self.stop_before:
            raise _Stop(x)
        ratio = self._ratios(sigma)
        ref = self.reference[index] if index < len(self.reference) else None
        if (ref is not None and torch.equal(ref.sigma, sigma) and torch.equal(ref.ratio, ratio)
                and torch.equal(ref.x, x)):
            self.record.append(ref)
            return ref.out.clone()
        out = self._model(x, sigma, **kwargs)
        self.evaluations += 1
        self.record.append(_Call(x.clone(), sigma.clone(), ratio, out.clone()))
        return out

    def callback(self, d):
        i = int(d["i"])
        if i not in self.events:
            self.events[i] = (d["x"].clone(), len(self.record))
        if i == self.stop_callback:
            raise _Stop(self.convert(d["x"], i))


def _close(a, b) -> bool:
    scale = float(b.detach().double().abs().max()) if b.numel() else 0.0
    return a.shape == b.shape and bool(torch.allclose(a.double(), b.double(), rtol=1e-5, atol=1e-6 * max(scale, 1.0)))


class _Runner:
    """Runs the base sampler through a `_TrialModel` and knows where each student state shows up."""

    def __init__(self, model, x, sigmas, extra_args, base, base_options, ratios, with_time_ratio, callback_scale):
        self.x, self.base, self.base_options = x, base, dict(base_options or {})
        self.callback_scale = callback_scale
        self.sigmas = sigmas.detach().clone()
        self.nominal = self.sigmas.detach().to("cpu", torch.float64)
        self.ratios = ratios
        self.extra_args = with_time_ratio(extra_args, ratios)
        self.model = _TrialModel(model, ratios)
        self.plans = {}
        self.completed_sigmas = self.sigmas

    def run(self, plan=None):
        """(state, completed): plan ("before", c), ("callback", k) or None (to the end)."""
        m = self.model
        m.record, m.events = [], {}
        m.stop_before = plan[1] if plan is not None and plan[0] == "before" else None
        m.stop_callback = plan[1] if plan is not None and plan[0] == "callback" else None
        sigmas = self.sigmas.clone()        # uni_pc writes into its sigmas: every run gets a fresh copy
        try:
            out = self.base(m, self.x, sigmas, extra_args=self.extra_args, callback=m.callback,
                            disable=True, **self.base_options)
        except _Stop as stop:
            return stop.state, False
        self.completed_sigmas = sigmas
        return out, True

    def probe(self):
        """A full run at the current ratios; learns from it where the state at each sigma shows up."""
        final, _ = self.run()
        m, n = self.model, len(self.nominal) - 1
        if 0 not in m.events:
            raise ValueError("this sampler does not report its steps through the callback; TimeTuner cannot tune it")
        nominal, scale = self.nominal, self.callback_scale
        if scale is None:
            m.convert = lambda x, k: x
        else:
            m.convert = lambda x, k: (x.double() * scale(float(nominal[k]))).to(x.dtype)
        if not _close(m.convert(m.events[0][0], 0), self.x):
            raise ValueError("this sampler reports its states in unknown coordinates; TimeTuner cannot tune it")
        record = m.record
        for k in range(1, n):
            if k not in m.events:
                raise ValueError(f"this sampler did not report step {k}; TimeTuner cannot tune it")
            cx, calls = m.events[k]
            state = m.convert(cx, k)
            if calls >= 1 and _close(record[calls - 1].x, state):
                self.plans[k] = ("before", calls - 1)      # the state is the input of that call: no extra evaluation
            elif k == n - 1 and calls == len(record) and _close(cx, final):
                # a sampler that reports its final state as step n-1, never its state at sigmas[n-1]: use the
                # input of its last model call at that sigma (its predictor there) instead
                at = [c for c, call in enumerate(record) if bool(torch.all(call.sigma == self.sigmas[k]))]
                self.plans[k] = ("before", at[-1]) if at else ("callback", k)
            else:
                self.plans[k] = ("callback", k)
        return final

    def plan(self, k):
        return None if k == len(self.nominal) - 1 else self.plans[k]

    def states(self, record, events, final):
        """Every student state of a completed run, from its record."""
        out = []
        for k in range(1, len(self.nominal)):
            plan = self.plan(k)
            if plan is None:
                out.append(final)
            elif plan[0] == "before":
                out.append(record[plan[1]].x)
            else:
                out.append(self.model.convert(events[k][0], k))
        return out


def secant_search(trial, target, bounds, delta, probes, xatol) -> float:
    """The r in `bounds` whose state comes closest to `target`, among 1 (tried first) and `probes` + 1 more
    trials. trial(r) -> (error, state) runs the step with ratio r. The state after a step is about linear in the
    model output, so in r: from 1 and 1 + delta (1 - delta where 1 + delta moves nothing) the next trial is the r
    that brings the secant line through the last two states closest to the target (least squares in r), and so on
    from the last two trials; it stops early when that r is within xatol of one tried. Three trials a step with
    probes 1, where the parabola search over errors it replaced took 4-5 (TimeTuner's held-out errors 0.91-1.14x
    that search's in `make bench-cost`)."""
    lo, hi = bounds
    tried = {}
    tried[1.0], state = trial(1.0)
    last = [(1.0, state)]
    for r in (min(hi, 1.0 + delta), max(lo, 1.0 - delta)):
        tried[r], moved = trial(r)
        if not torch.equal(moved, state):
            last.append((r, moved))
            break                   # (where 1 + delta moves nothing, a time input clamped above, 1 - delta is tried)
    if len(last) < 2:
        return 1.0
    for _ in range(probes):
        (ra, sa), (rb, sb) = last[-2:]
        slope = (sb.double() - sa.double()) / (rb - ra)
        norm = float((slope * slope).sum())
        if norm == 0:
            break
        r = rb + float(((target.to(sb.device).double() - sb.double()) * slope).sum()) / norm
        r = min(hi, max(lo, r))
        if any(abs(r - q) < xatol for q in tried):
            break
        tried[r], state = trial(r)
        last.append((r, state))
    return min(tried, key=tried.get)


def tune_time_ratios(model, x, sigmas, extra_args=None, callback=None, disable=None, *, base, base_options=None,
                     targets, with_time_ratio, callback_scale=None, bounds=(0.7, 1.3), delta=0.05, probes=1,
                     xatol=2e-3, result=None, verify=None):
    """k-diffusion-style function: fits one time ratio per step of `base` on `sigmas`; returns the tuned final x.

    targets[k]: the target state at sigmas[k + 1] (k = 0..N-1, the last the final latent), ComfyUI's
    k-diffusion coordinates, shape of x. Step after step, each r_i minimises the RMSE between the student's
    state at sigmas[i + 1] (from its own tuned states) and targets[i] by `secant_search` in `bounds` (delta,
    probes, xatol); r_i stays 1 unless the search beats r = 1. callback_scale(sigma): the factor that turns
    the x the base sampler reports to its callback at sigma into its state (None: 1).

    Cost: a trial runs the base sampler from the start through a memo of model calls (same call
    index, input, sigma and ratio as the reference run: no evaluation) and stops as soon as the
    state at sigmas[i + 1] is known (where that state is the input of the next model call, before
    that call). `result` (a dict) receives: ratios (float64 [N]), errors_nominal (every state of the
    plain run, all ratios 1), errors_final (every state of the tuned run), evaluations (all model
    evaluations of the fit).
    """
    extra_args = {} if extra_args is None else extra_args
    result = {} if result is None else result
    n = len(sigmas) - 1
    if len(targets) != n:
        raise ValueError(f"{len(targets)} target states for {n} steps")
    for t in targets:
        if tuple(t.shape) != tuple(x.shape):
            raise ValueError(f"target shape {tuple(t.shape)} differs from the latent's {tuple(x.shape)}")
    ratios = TimeRatios(sigmas[:-1] if float(sigmas[-1]) == 0 else sigmas)
    if len(ratios) != n:
        raise ValueError("sigmas must be strictly decreasing, positive but for a final 0")
    runner = _Runner(model, x, sigmas, extra_args, base, base_options, ratios, with_time_ratio, callback_scale)
    trial_model = runner.model

    final = runner.probe()
    if verify is not None:
        verify(runner.extra_args, trial_model.evaluations)
    nominal_states = runner.states(trial_model.record, trial_model.events, final)
    trial_model.reference = trial_model.record
    last_record, last_events, last_final = trial_model.record, trial_model.events, final
    for i in range(n):
        plan = runner.plan(i + 1)
        best = {}

        def trial(r):
            ratios.values[i] = r
            state, completed = runner.run(plan)
            e = rmse(state, targets[i])
            if not best or e < best["error"]:
                best.update(error=e, r=r, state=state, record=trial_model.record, events=trial_model.events,
                            completed=completed)
            return e, state

        secant_search(trial, targets[i], bounds, delta, probes, xatol)
        ratios.values[i] = best["r"]
        trial_model.reference = best["record"]
        if best["completed"]:
            last_record, last_events, last_final = best["record"], best["events"], best["state"]
        if callback is not None:
            record = best["record"]
            denoised = record[-1].out if record else best["state"]
            callback({"x": best["state"], "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})

    final_states = runner.states(last_record, last_events, last_final)
    result.update(ratios=ratios.values.clone(), evaluations=trial_model.evaluations,
                  errors_final=[rmse(s, t) for s, t in zip(final_states, targets)],
                  errors_nominal=[rmse(s, t) for s, t in zip(nominal_states, targets)])
    if not torch.equal(runner.completed_sigmas, sigmas):
        # the base sampler changed its sigmas in place (ComfyUI's uni_pc sets the final 0 to 0.001, and
        # KSAMPLER then un-scales the result at that sigma): do the same, so the result is the base's
        sigmas.copy_(runner.completed_sigmas)
    return last_final
