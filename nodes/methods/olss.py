"""OLSS and OLSS-P (Duan et al., CIKM 2023) on ComfyUI: candidate schedules, the teacher fit and its
re-solve on the student's own outputs, chosen by their cross-validated error against the teacher."""
import math
import time

import torch

from ...optimizers import olss
from ...optimizers.teacher import rmse
from . import Method, finite, folds, scheduler_setting

# Re-solving moved a path's cross-validated error at most 3.3x from its teacher fit's on the test models (the
# scheduler's sigmas, whose prior is DDIM fitted on nothing, much more): a searched or uniform path whose teacher fit
# cross-validates over HOPELESS times the best teacher fit judged on the run is not re-solved.
HOPELESS = 10


class OLSS(Method):
    """`olss`: searched teacher steps (Algorithm 3), beside the uniform path and the scheduler's sigmas;
    `olss_p`: the uniform path only."""

    node = ("OLSSSampler", "OLSS Sampler",
            "Optimal Linear Subspace Search (Duan et al., CIKM 2023): each step is the fitted linear combination of "
            "the start noise and all earlier model outputs. Use with the calibration's sigmas (Calibration Sigmas) in "
            "SamplerCustom.")

    def __init__(self, name):
        self.name = name
        self.search = self.default_variant = name == "olss"
        self.summary = ("OLSS: each step a fitted combination of the start noise and all earlier outputs, on searched "
                        "teacher steps" if self.search else "OLSS-P: OLSS on uniformly spaced teacher steps")

    def settings(self, request):
        return scheduler_setting(request) if self.search else {}

    def paths(self, run, gram):
        """{label: teacher step indices, or None for the scheduler's sigmas}: the candidate schedules, chosen on the
        teacher run of the whole batch. The given sigmas' nearest teacher steps; else the uniform path, and for
        OLSS the searched path and the scheduler's sigmas (not teacher steps: DDIM's coefficients are their prior)."""
        steps = run.request.steps
        if run.request.sigmas is not None:
            return {"given sigmas": run.nearest_teacher_steps(run.sigmas[:-1])}
        paths = {"uniform path": olss.uniform_path(gram.teacher_steps, steps)}
        if self.search:
            paths["searched path"] = olss.search_path(gram, steps)
            paths[f"{run.scheduler_name} sigmas"] = None
        return paths

    @staticmethod
    def teacher_fit(run, gram, path):
        """OLSSCoefficients fitted to a teacher run's own outputs (eq. 12; `gram` of some of its rows), or for the
        scheduler's sigmas (path None) DDIM's."""
        if path is not None:
            return olss.fit_olss(gram, path)
        sigmas = run.sigmas.double()
        weights_x, weights_d = olss.ddim_coefficients(run.schedule, sigmas)
        return olss.OLSSCoefficients(tuple(run.nearest_teacher_steps(sigmas[:-1])), sigmas.float(), weights_x,
                                     weights_d, torch.zeros(len(sigmas) - 1, dtype=torch.float64))

    def fold_fit(self, run, path, rows):
        """The teacher fit of `path` on the Gram matrices of some rows of the run (a fold)."""
        return self.teacher_fit(run, self.gram(run, rows)[0], path)

    @staticmethod
    def gram(run, rows=None):
        """(Gram matrices of the teacher run on `rows` (None: all), seconds), made once per run and shared by OLSS
        and OLSS-P."""
        key = ("olss.gram", None if rows is None else tuple(rows))
        if key not in run.memo:
            trajectory = run.trajectory if rows is None else run.subset(rows).trajectory
            start = time.perf_counter()         # (the teacher run is not the Gram matrix's time)
            gram = olss.trajectory_gram(trajectory, run.schedule)
            run.memo[key] = gram, time.perf_counter() - start
        return run.memo[key]

    def fit(self, run):
        """Every candidate schedule (`paths`) in two forms, each judged by two-fold cross-validation (`folds`:
        fitted on one half of the batch, sampled on the other): the teacher fit, and the same re-solved on the
        student's own outputs (`olss.SequentialResolve`; not for a path whose teacher fit is HOPELESS). The form
        and schedule that validate best are fitted on the whole batch and kept; diagnostics["cross_validated"] is
        their validated error (so `validate` does not fit OLSS again). With one noise, the teacher fit that comes
        closest to the teacher is kept. A schedule judged (or re-solved) already on this run, by the other of OLSS
        and OLSS-P, is not run again (`run.memo`)."""
        gram, seconds = self.gram(run)
        start = time.perf_counter()
        final = run.trajectory.final.double()
        norm = float(gram.target_sq[-1].sqrt()) or 1.0
        halves = folds(run.batch)
        scores, best, calls = {}, None, run.calls[0]

        def sample(part, c, targets, rows=None, resolve=True):
            """(final x, the coefficients it wrote, SequentialResolve) of c sampled on `part` of the run, re-solving
            on `rows` of it (None: all) or, without `resolve`, keeping c."""
            ours = c.copy()
            scales = [run.schedule.native_scale(float(s)) / norm for s in c.sigmas[1:]]
            solver = olss.SequentialResolve(targets, scales, rows=rows, keep_prior=not resolve)
            x = part.sample(olss.sample_olss, c.sigmas.float(), coefficients=ours, resolve=solver).cpu().double()
            return x, ours, solver

        judged = []                 # with folds: (label, path, coefficients, targets, memo key)
        for label, path in self.paths(run, gram).items():
            c = self.teacher_fit(run, gram, path)
            targets = run.teacher_states(c.sigmas[1:])
            if not halves:
                x, measured, solver = sample(run, c, targets, resolve=False)
                scores[label] = {"teacher fit": rmse(x, final)}
                if best is None or scores[label]["teacher fit"] < best[0]:
                    best = scores[label]["teacher fit"], label, measured, solver, False
                continue
            key = (path is None, tuple(c.sigmas.tolist()))      # (OLSS-P's one candidate is OLSS's uniform path)
            if ("olss.teacher fit", key) not in run.memo:
                if path is None:        # (DDIM on the scheduler's sigmas is fitted on nothing: its error on the batch)
                    error = run.plain_error("ddim", c.sigmas,
                                            lambda: rmse(sample(run, c, targets, resolve=False)[0], final))
                else:
                    held = [sample(run.subset(test_rows, states=False), self.fold_fit(run, path, fit_rows),
                                   [t[test_rows] for t in targets], resolve=False)[0]
                            for fit_rows, test_rows in zip(halves, halves[::-1])]
                    error = rmse(torch.cat(held), final[halves[1] + halves[0]])
                run.memo["olss.teacher fit", key] = error
            judged.append((label, path, c, targets, key))
        best_teacher = min((error for key, error in run.memo.items() if key[0] == "olss.teacher fit"),
                           default=math.inf)        # (of every teacher fit judged on this run, by OLSS or OLSS-P)
        for label, path, c, targets, key in judged:
            teacher = run.memo["olss.teacher fit", key]
            scores[label] = {"teacher fit, cross-validated": teacher}
            if path is None or teacher <= HOPELESS * best_teacher:
                if ("olss.re-solved, cross-validated", key) not in run.memo:
                    resolved = [sample(run, self.fold_fit(run, path, fit_rows), targets, rows=fit_rows)[0][test_rows]
                                for fit_rows, test_rows in zip(halves, halves[::-1])]
                    run.memo["olss.re-solved, cross-validated", key] = rmse(torch.cat(resolved),
                                                                              final[halves[1] + halves[0]])
                scores[label]["re-solved, cross-validated"] = run.memo["olss.re-solved, cross-validated", key]
            for form, error in scores[label].items():
                if best is None or error < best[0]:
                    best = error, label, c, targets, form.startswith("re-solved"), key
        if halves:
            validated, label, c, targets, resolved, key = best
            in_sample = {}
            if resolved:            # (re-solved on the whole batch: the run of the coefficients it writes back)
                if ("olss.re-solved", key) not in run.memo:
                    run.memo["olss.re-solved", key] = sample(run, c, targets)
                x, c, solver = run.memo["olss.re-solved", key]
                in_sample = {"rmse": rmse(x, final)}
            # (a teacher fit's per-step errors are its least-squares residuals; DDIM on the scheduler's sigmas has none)
            step_error = solver.errors if resolved else c.errors.tolist() if c.errors.any() else []
            facts = {**in_sample, "cross_validated": validated}
        else:
            in_sample, label, c, solver, resolved = best
            step_error, facts = solver.errors, {"rmse": in_sample}
        weights = {key: getattr(c, key).double().clone() for key in ("weights_x", "weights_d", "errors")}
        tensors = finite(self.name, {"path": torch.tensor(c.path, dtype=torch.int64), "sigmas": c.sigmas.float(),
                                     **weights})
        return tensors, {**facts, "step_error": step_error, "schedule": label, "resolved": resolved,
                         "candidate_rmse": scores, "evaluations": run.calls[0] - calls,
                         "fit_seconds": time.perf_counter() - start + seconds}

    def plain_sampler(self, settings):
        return "ddim"

    def plain_tensors(self, tensors, settings, schedule):
        """DDIM on the fit's sigmas, written in OLSS's basis."""
        weights_x, weights_d = olss.ddim_coefficients(schedule, tensors["sigmas"].double())
        return {**tensors, "weights_x": weights_x, "weights_d": weights_d,
                "errors": torch.zeros_like(tensors["errors"])}

    def shapes(self, steps):
        return {"path": (steps,), "weights_x": (steps,), "weights_d": (steps, steps), "errors": (steps,)}

    def sampler(self, tensors, settings, schedule):
        coefficients = olss.OLSSCoefficients(tuple(int(i) for i in tensors["path"]), tensors["sigmas"],
                                             tensors["weights_x"], tensors["weights_d"], tensors["errors"])
        return olss.sample_olss, {"coefficients": coefficients}
