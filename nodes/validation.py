"""Validation on noises a fit did not see, and the choice it allows.

Two folds of the calibration batch (the even and the odd noises): a method is fitted on one half exactly as
on the whole batch (its own choices included) and sampled on the other, against the teacher; its validated
error is the RMSE over both held-out halves. Its plain solver on the fit's sigmas (`Method.plain_tensors`;
for OLSS's searched steps, sigmas chosen on the whole batch) is sampled on the whole batch. A fit that
validates worse than its plain solver is stored as the plain solver. Built-in samplers are fitted on
nothing, so their error on the calibration batch is already a validated one; `choose` picks the lowest of
all within a budget of model evaluations.
"""
import torch

from ..optimizers.teacher import rmse
from .methods import METHODS


def validate(name, run, tensors):
    """(tensors to store: the fit's or its plain solver's, {"rmse", "plain_rmse", "kept", "evaluations"}) for
    method `name` fitted as `tensors` on the whole of `run`; (tensors, None) where the batch has fewer than 2
    noises. "evaluations": the batched model calls validation made (half-batch calls for the folds)."""
    method = METHODS[name]
    settings = run.plan.settings
    if run.batch < 2:
        return tensors, None
    per_run = method.evaluations(run.request.steps, settings)
    plain = method.plain_tensors(tensors, settings, run.schedule)
    plain_rmse = rmse(run.sample_fit(method, plain), run.trajectory.final)
    halves = [list(range(0, run.batch, 2)), list(range(1, run.batch, 2))]
    held, teacher, calls = [], [], per_run
    for fit_rows, test_rows in zip(halves, halves[::-1]):
        fitted, diagnostics = method.fit(run.subset(fit_rows))
        test = run.subset(test_rows, states=False)
        held.append(test.sample_fit(method, fitted))
        teacher.append(test.trajectory.final)
        calls += diagnostics["evaluations"] + per_run
    validated = rmse(torch.cat(held), torch.cat(teacher))
    kept = "fit" if validated <= plain_rmse else "plain"
    return (tensors if kept == "fit" else plain), {"rmse": validated, "plain_rmse": plain_rmse, "kept": kept,
                                                   "evaluations": calls}


def choose(candidates, evaluations):
    """The label of the lowest validated error among `candidates` ({label: {"rmse", "evaluations"}}) that spend at
    most `evaluations` model evaluations per sample."""
    within = {label: entry for label, entry in candidates.items() if entry["evaluations"] <= evaluations}
    if not within:
        raise ValueError(f"no validated method or built-in sampler spends at most {evaluations} model evaluations")
    return min(within, key=lambda label: within[label]["rmse"])
