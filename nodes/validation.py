"""Validation on noises a fit did not see, and the choice it allows.

Two folds of the calibration batch (the even and the odd noises, `methods.folds`): a method is fitted on one half
exactly as on the whole batch (its own choices included) and sampled on the other, against the teacher; its
validated error is the RMSE over both held-out halves. OLSS, whose fit already chooses its schedule and form by
their errors on these folds, reports that error instead of being fitted again. A method's plain solver on the
fit's sigmas (`Method.plain_tensors`; for OLSS's searched steps, sigmas chosen on the whole batch) is sampled on
the whole batch, once per run for the methods with the same plain solver on the same sigmas
(`CalibrationRun.plain_error`: OLSS, OLSS-P and IIA-DDIM: DDIM, which the built-in screen may have run already as
euler; the Heun forms: Heun). A fit that validates worse than its plain solver is stored as the plain solver.
Built-in samplers are fitted on nothing, so their error on the calibration batch is already a validated one
(`screen_builtins`: every one-evaluation sampler on every scheduler, screened on a few noises first); `choose` picks
the lowest of all within a budget of model evaluations.
"""
from dataclasses import dataclass

import torch

import comfy.model_management
import comfy.samplers

from ..optimizers.teacher import rmse
from .builtins import ONE_EVALUATION, model_evaluations, same_start, schedules
from .methods import METHODS, folds

SCREEN_KEEP = 6             # built-ins (sampler, scheduler) that go on from the screen to the whole batch


def validate(name, run, tensors, facts):
    """(tensors to store: the fit's or its plain solver's, {"rmse", "plain_rmse", "kept", "kept_rmse",
    "evaluations"}) for method `name` fitted as `tensors` (with diagnostics `facts`) on the whole of `run`;
    (tensors, None) where the batch has fewer than 2 noises. A fit that judged itself on the same folds
    (`facts["cross_validated"]`: OLSS, whose fit chooses among its forms by it) is not fitted again, and a plain
    solver's error measured already (`facts["plain_rmse"]`, or for another method on this run) is not measured
    again.
    "evaluations": the model calls validation made, in calls on the whole batch."""
    method = METHODS[name]
    settings = run.plan.settings
    halves = folds(run.batch)
    if not halves:
        return tensors, None
    plain = method.plain_tensors(tensors, settings, run.schedule)
    plain_rmse, calls = facts.get("plain_rmse"), run.calls[0]
    if plain_rmse is None:
        plain_rmse = run.plain_error(method.plain_sampler(settings) or type(method).__name__, tensors["sigmas"],
                                     lambda: rmse(run.sample_fit(method, plain), run.trajectory.final))
    validated = facts.get("cross_validated")
    if validated is None:
        held, teacher = [], []
        for fit_rows, test_rows in zip(halves, halves[::-1]):
            fitted, _ = method.fit(run.subset(fit_rows))
            test = run.subset(test_rows, states=False)
            held.append(test.sample_fit(method, fitted))
            teacher.append(test.trajectory.final)
        validated = rmse(torch.cat(held), torch.cat(teacher))
    kept = "fit" if validated <= plain_rmse else "plain"
    return (tensors if kept == "fit" else plain), {"rmse": validated, "plain_rmse": plain_rmse, "kept": kept,
                                                   "kept_rmse": min(validated, plain_rmse),
                                                   "evaluations": run.calls[0] - calls}


def choose(candidates, evaluations):
    """The label of the lowest validated error among `candidates` ({label: {"rmse", "evaluations"}}) that spend at
    most `evaluations` model evaluations per sample."""
    within = {label: entry for label, entry in candidates.items() if entry["evaluations"] <= evaluations}
    if not within:
        raise ValueError(f"no validated method or built-in sampler spends at most {evaluations} model evaluations")
    return min(within, key=lambda label: within[label]["rmse"])


@dataclass
class BuiltinScreen:
    """The built-in samplers on the calibration batch (`screen_builtins`)."""
    candidates: dict            # {label: {"rmse", "sampler", "scheduler", "sigmas", "evaluations"}}: the kept ones
    finals: dict                # {label: final x of a kept one, on the host}
    screened: dict              # {(sampler, scheduler): RMSE on the screening noises}, for every one run
    starts: dict                # {scheduler: its first sigma}
    evaluations: float          # model calls, in calls on the whole batch

    def schedulers_for(self, sampler, count, start=None):
        """The `count` schedulers (starting at `start`, if given) on which `sampler` screened best (euler's ranking
        for a sampler not screened; ComfyUI's ddim is euler)."""
        sampler = sampler if any(name == sampler for name, _ in self.screened) else "euler"
        ranked = sorted((error, scheduler) for (name, scheduler), error in self.screened.items()
                        if name == sampler and (start is None or same_start(self.starts[scheduler], start)))
        return [scheduler for _, scheduler in ranked[:count]]


def screen_builtins(run) -> BuiltinScreen:
    """The built-in samplers `auto` chooses from, on the calibration batch at the request's steps: every
    ONE_EVALUATION sampler on every scheduler that gives those steps (for a partial pass, at its denoise and
    from its start: another start is another noise level, another picture) is screened on the first eighth of the
    noises (one of 8), and the SCREEN_KEEP best of them are run on the rest, so their errors are over the whole
    batch; the samplers on the same sigmas run side by side (`side_by_side`). The final x are kept (on the host) so
    the errors can be measured again against a longer teacher without a model call."""
    ms = run.model.get_model_object("model_sampling")
    screen_rows = list(range(max(1, run.batch // 8)))
    rest_rows = list(range(len(screen_rows), run.batch))
    screen, rest = run.subset(screen_rows, states=False), run.subset(rest_rows, states=False) if rest_rows else None
    runs, starts, calls = {}, {}, run.calls[0]
    for name in ONE_EVALUATION:
        for scheduler, sigmas in schedules(ms, run.request.steps, name, run.request.denoise,
                                           run.plan.start if run.plan.partial else None).items():
            runs[(name, scheduler)] = sigmas
            starts[scheduler] = float(sigmas[0])
    xs = side_by_side(screen, runs)
    screened = {key: (rmse(xs[key], screen.trajectory.final), runs[key], xs[key]) for key in runs}
    kept = sorted(screened, key=lambda key: screened[key][0])[:SCREEN_KEEP]
    rest_finals = side_by_side(rest, {key: runs[key] for key in kept}) if rest is not None else {}
    candidates, finals = {}, {}
    for name, scheduler in kept:
        _, sigmas, x = screened[(name, scheduler)]
        if rest is not None:
            x = torch.cat([x, rest_finals[(name, scheduler)]])
        label = f"{name} / {scheduler}"
        finals[label] = x
        candidates[label] = {"rmse": rmse(x, run.trajectory.final), "sampler": name, "scheduler": scheduler,
                             "sigmas": sigmas.double().tolist(),
                             "evaluations": model_evaluations(name, run.request.steps)}
    return BuiltinScreen(candidates, finals, {key: value[0] for key, value in screened.items()}, starts,
                         run.calls[0] - calls)


def side_by_side(run, runs) -> dict:
    """{(sampler, scheduler): its final x on `run`'s noises, on the host} for `runs` ({(sampler, scheduler):
    sigmas}): the samplers on the same sigmas run side by side, their model calls batched (`lockstep`)."""
    groups = {}
    for key, sigmas in runs.items():
        groups.setdefault(tuple(sigmas.float().tolist()), []).append(key)
    finals = {}
    for sigmas, keys in groups.items():
        samplers = [comfy.samplers.sampler_object(name) for name, _ in keys]
        xs = run.sample_side_by_side([(s.sampler_function, s.extra_options) for s in samplers], torch.tensor(sigmas))
        finals.update((key, x.cpu()) for key, x in zip(keys, xs))
    return finals
