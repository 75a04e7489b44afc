"""OLSS and OLSS-P (Duan et al., CIKM 2023) on ComfyUI: candidate schedules, the teacher fit and its
re-solve on the student's own outputs, chosen by the error against the teacher on the calibration batch."""
import time

import torch

from ...optimizers import olss
from ...optimizers.teacher import rmse
from . import Method, finite, scheduler_setting


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

    def candidates(self, run, gram):
        """{label: OLSSCoefficients fitted to the teacher's own outputs (eq. 12)}: the given sigmas' nearest
        teacher steps; else the uniform path, and for OLSS the searched path and the scheduler's sigmas
        (DDIM's coefficients as the prior there: they are not teacher steps)."""
        steps = run.request.steps
        if run.request.sigmas is not None:
            return {"given sigmas": olss.fit_olss(gram, run.nearest_teacher_steps(run.sigmas[:-1]))}
        candidates = {"uniform path": olss.fit_olss(gram, olss.uniform_path(gram.teacher_steps, steps))}
        if self.search:
            candidates["searched path"] = olss.fit_olss(gram, olss.search_path(gram, steps))
            sigmas = run.sigmas.double()
            weights_x, weights_d = olss.ddim_coefficients(run.schedule, sigmas)
            candidates[f"{run.scheduler_name} sigmas"] = olss.OLSSCoefficients(
                tuple(run.nearest_teacher_steps(sigmas[:-1])), sigmas.float(), weights_x, weights_d,
                torch.zeros(steps, dtype=torch.float64))
        return candidates

    @staticmethod
    def gram(run):
        """(Gram matrices of the teacher run, seconds), made once per run and shared by OLSS and OLSS-P."""
        if "olss.gram" not in run.memo:
            trajectory = run.trajectory            # (the teacher run is not the Gram matrix's time)
            start = time.perf_counter()
            gram = olss.trajectory_gram(trajectory, run.schedule)
            run.memo["olss.gram"] = gram, time.perf_counter() - start
        return run.memo["olss.gram"]

    def fit(self, run):
        """For each candidate schedule, the teacher-fitted coefficients and the same re-solved on the student's
        own outputs (`olss.SequentialResolve`); keeps the one whose final x comes closest to the teacher's on the
        calibration batch. A re-solve is judged by two-fold cross-validation (fitted on half the batch, measured
        on the other half), so that it replaces the teacher fit only where it generalises."""
        gram, gram_seconds = self.gram(run)
        start = time.perf_counter()
        final = run.trajectory.final.double()
        norm = float(gram.target_sq[-1].sqrt()) or 1.0
        batch = run.batch
        halves = [list(range(0, batch, 2)), list(range(1, batch, 2))]
        scores, best, evaluations = {}, None, 0

        def sample(c, targets, rows=None, resolve=True):
            """(final x, coefficients, SequentialResolve) of one run: re-solving on `rows` (None: all), or
            measuring."""
            nonlocal evaluations
            evaluations += c.steps
            ours = c.copy()
            scales = [run.schedule.native_scale(float(s)) / norm for s in c.sigmas[1:]]
            solver = olss.SequentialResolve(targets, scales, rows=rows, keep_prior=not resolve)
            x = run.sample(olss.sample_olss, c.sigmas.float(), coefficients=ours, resolve=solver).cpu().double()
            return x, ours, solver

        for label, c in self.candidates(run, gram).items():
            targets = run.teacher_states(c.sigmas[1:])
            x, measured, solver = sample(c, targets, resolve=False)
            scores[label] = {"teacher fit": rmse(x, final)}
            if best is None or scores[label]["teacher fit"] < best[0]:
                best = scores[label]["teacher fit"], label, measured, solver, targets
            if batch >= 2:
                held = torch.cat([sample(c, targets, rows=half)[0][other] for half, other in zip(halves, halves[::-1])])
                scores[label]["re-solved, cross-validated"] = rmse(held, final[halves[1] + halves[0]])
                if scores[label]["re-solved, cross-validated"] < best[0]:
                    best = scores[label]["re-solved, cross-validated"], label, c, None, targets
        in_sample, label, c, solver, targets = best
        resolved = solver is None
        if resolved:            # (re-solved on the whole batch: the run of the coefficients it writes back)
            x, c, solver = sample(c, targets)
            in_sample = rmse(x, final)
        tensors = finite(self.name, {"path": torch.tensor(c.path, dtype=torch.int64), "sigmas": c.sigmas.float(),
                                     "weights_x": c.weights_x.double(), "weights_d": c.weights_d.double(),
                                     "errors": c.errors.double()})
        return tensors, {"step_error": solver.errors, "rmse": in_sample, "schedule": label, "resolved": resolved,
                         "candidate_rmse": scores,
                         "evaluations": evaluations, "fit_seconds": time.perf_counter() - start + gram_seconds}

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
