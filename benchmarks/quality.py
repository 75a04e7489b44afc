"""Quality benchmark: held-out RMSE against the teacher for every deterministic ComfyUI sampler and
scheduler (and the pack's methods), per tiny model, NFE and guidance scale.

    make bench                      # everything: writes benchmarks/results/quality.{json,md}
    make bench ARGS="--quick"       # two models, guided only

NFE is counted, not assumed: every run counts the guided-denoiser evaluations it made (a Heun step is
two), and a sampler enters an NFE column with the most steps whose count stays within it.
"""
import argparse
import itertools
import json
import time
from collections import defaultdict

import common
import comfy.samplers
from calibrated_samplers.nodes.builtins import drop_penultimate
import torch
from comfy_extras.nodes_align_your_steps import AlignYourStepsScheduler
from comfy_extras.nodes_gits import GITSScheduler

MODELS = ["gmm_eps", "gmm_v_prediction", "gmm_flow", "digits_eps", "digits_flow", "sharp_sd15", "sharp_flux"]
NFES = [4, 5, 6, 8, 10]
CFGS = [1.0, 3.0]


def evaluations_per_interval(max_intervals=14):
    """{sampler: {number of sigma intervals: model evaluations}}, counted on the closed-form model."""
    case = common.Case.make("gmm_eps", 3.0, 1)
    table = {}
    for name in common.SAMPLERS:
        sampler = comfy.samplers.sampler_object(name)
        table[name] = {n: case.counted_sample(sampler, comfy.samplers.calculate_sigmas(case.model_sampling, "karras", n))[1]
                       for n in range(1, max_intervals + 1)}
    return table


def within_budget(evaluations, nfe, make_sigmas):
    """(steps, sigmas) with the most steps whose evaluation count stays within nfe, or None."""
    for steps in range(nfe, 0, -1):
        sigmas = make_sigmas(steps)
        if evaluations.get(len(sigmas) - 1, nfe + 1) <= nfe:
            return steps, sigmas
    return None


def schedulers_for(case):
    """ComfyUI's schedulers, plus AlignYourSteps / GITS where the model has the SD1 noise range."""
    sd1_range = abs(case.schedule.sigma_max - 14.6146) < 1e-3 and not case.schedule.is_flow
    extra = {}
    if sd1_range:
        extra["ays_sd1"] = lambda steps: AlignYourStepsScheduler.execute("SD1", steps, 1.0).result[0]
        extra["gits_1.20"] = lambda steps: GITSScheduler.execute(1.2, steps, 1.0).result[0]
    return list(common.SCHEDULERS), extra


def builtin_runs(case, evaluations, nfe):
    """(sampler, scheduler, steps, sampler object, sigmas) for every built-in combination at this NFE."""
    names, extra = schedulers_for(case)
    for sampler_name in common.SAMPLERS:
        sampler = comfy.samplers.sampler_object(sampler_name)
        discard = sampler_name in comfy.samplers.KSampler.DISCARD_PENULTIMATE_SIGMA_SAMPLERS
        makers = {name: (lambda steps, name=name: common.builtin_sigmas(case, name, steps, sampler_name))
                  for name in names}
        for name, make in extra.items():
            makers[name] = lambda steps, make=make: drop_penultimate(make(steps + 1)) if discard else make(steps)
        for scheduler, make in makers.items():
            found = within_budget(evaluations[sampler_name], nfe, make)
            if found is not None:
                yield sampler_name, scheduler, found[0], sampler, found[1]


def trust_region_runs(case, nfe):
    """Trust-region sigmas (TrustRegionStepsScheduler's defaults) with the sampler they are for."""
    from calibrated_samplers.nodes.trust_region import SOLVERS, trust_region_sigmas
    for solver in SOLVERS:
        for label, trunc in (("trust_region", 3), ("trust_region_trunc_rule", None)):
            sigmas = trust_region_sigmas(case.model_sampling, nfe, solver, "uniform_t", 2.0, trunc_num=trunc)
            yield label, solver, "trust_region", nfe, comfy.samplers.sampler_object(solver), sigmas


CALIBRATION_BATCHES = [8, 32]
CALIBRATION_SEEDS = [0]         # --calibration-seeds, for auto: its calibration noises (seed 0's is "auto_b8")
CALIBRATION_TEACHER_STEPS = [500]
CALIBRATION_COSTS = []
CALIBRATED_SCHEDULERS = ["karras", "beta", "simple", "kl_optimal"]    # IIA and TimeTuner keep the schedule
TIMETUNER_BASES = ["ddim", "dpmpp_2m", "uni_pc"]
TIME_STEPS_BASES = ["uni_pc", "dpmpp_2m", "euler"]          # the samplers calibrated time steps are fitted for
IIA_SUBSTEPS = [3]                                       # M of the IIA fits to sub-steps (the paper: 3)
IIA_TARGETS = ["teacher", "substeps"]                    # what IIA fits to (--iia-targets)
CALIBRATED = ["olss", "olss_p", "iia_ddim", "biia_heun", "iia_heun", "timetuner", "time_steps", "auto"]  # --methods
VALIDATION = []                 # per auto calibration and method: validated error beside held-out error
PLAIN = {"iia_ddim": "ddim", "biia_heun": "heun", "iia_heun": "heun"}   # and timetuner(X): X


def _teacher(case):
    """One teacher run per case on calibration seeds (0, ...; never the held-out ones), for the largest
    calibration batch; smaller batches are its first samples (ComfyUI draws the noise sequentially)."""
    if getattr(case, "calibration", None) is None:
        run = common.calibration_run(case, max(CALIBRATION_BATCHES), 1, CALIBRATION_TEACHER_STEPS[0])
        start = time.perf_counter()
        with torch.inference_mode():
            trajectory = run.trajectory
        case.calibration = {"trajectory": trajectory, "teacher_seconds": time.perf_counter() - start, "memos": {},
                            "screens": {}}
    return case.calibration


def _calibration_run(case, batch, steps, scheduler="karras", sampler_name="euler", **inputs):
    """A CalibrationRun sharing the case's teacher (its first `batch` samples) and Gram matrices."""
    from calibrated_samplers.optimizers.teacher import Trajectory
    calibration = _teacher(case)
    full = calibration["trajectory"]
    run = common.calibration_run(case, batch, steps, CALIBRATION_TEACHER_STEPS[0], scheduler=scheduler,
                                 sampler_name=sampler_name, **inputs)
    run._trajectory = Trajectory(full.sigmas, full.store_dtype, [x[:batch] for x in full.states],
                                 [d[:batch] for d in full.denoised], full.final[:batch])
    run.teacher_seconds = calibration["teacher_seconds"]
    run.memo = calibration["memos"].setdefault(batch, {})       # e.g. OLSS's Gram matrices, shared by its fits
    return run


def calibrated_runs(case, nfe):
    """OLSS, OLSS-P, IIA (three variants) and TimeTuner (on several samplers), fitted by the nodes' own code
    on calibration batches, sampled on the held-out noise. IIA and TimeTuner on each scheduler of
    CALIBRATED_SCHEDULERS, Heun forms with (nfe + 1) // 2 steps (2 evaluations per step but the last)."""
    from calibrated_samplers.nodes.methods import METHODS
    from calibrated_samplers.nodes.validation import screen_builtins
    for batch in CALIBRATION_BATCHES:
        jobs = [(m, nfe, "karras", "euler", None) for m in ("olss", "olss_p")]
        jobs += [("time_steps", nfe, "karras", base, None) for base in TIME_STEPS_BASES]
        for scheduler in CALIBRATED_SCHEDULERS:
            fits = [None] * ("teacher" in IIA_TARGETS) + IIA_SUBSTEPS * ("substeps" in IIA_TARGETS)
            for m in fits:               # None: fitted to the teacher; else to m sub-steps
                jobs += [("iia_ddim", nfe, scheduler, "euler", m), ("biia_heun", (nfe + 1) // 2, scheduler, "euler", m),
                         ("iia_heun", (nfe + 1) // 2, scheduler, "euler", m)]
            jobs += [("timetuner", nfe, scheduler, base, None) for base in TIMETUNER_BASES]
        for method, steps, scheduler, base, substeps in [job for job in jobs if job[0] in CALIBRATED]:
            iia = {"iia_target": "substeps", "iia_substeps": substeps} if substeps else {}
            run = _calibration_run(case, batch, steps, scheduler, base, **iia)
            start = time.perf_counter()
            with torch.inference_mode():                 # as ComfyUI runs its nodes
                if method == "time_steps":              # its start may be the built-in screen's best schedule
                    screens = _teacher(case)["screens"]      # (one screen per batch and steps, for every base)
                    if (batch, steps) not in screens:
                        screens[(batch, steps)] = screen_builtins(run)
                    run.builtin_screen = screens[(batch, steps)]
                tensors, diagnostics = METHODS[method].fit(run)
            CALIBRATION_COSTS.append({"model": case.name, "cfg": case.cfg, "nfe": nfe, "method": method,
                                      "scheduler": scheduler, "sampler": base, "batch": batch, "steps": steps,
                                      "teacher_seconds": run.teacher_seconds,
                                      "fit_seconds": time.perf_counter() - start,
                                      "evaluations": diagnostics.get("evaluations", 0), "iia_substeps": substeps})
            function, options = METHODS[method].sampler(tensors, run.plan.settings, case.schedule)
            sampler = comfy.samplers.KSAMPLER(function, extra_options=options)
            name = f"{method}({base})" if method in ("timetuner", "time_steps") else method
            label = "calibrated" if method.startswith("olss") or method == "time_steps" else scheduler
            tag = f"_m{substeps}" if substeps else "_teacher" if method in PLAIN else ""
            yield f"{method}{tag}_b{batch}", name, label, steps, sampler, tensors["sigmas"]


def auto_runs(case, nfe):
    """KSampler (Calibrated)'s `auto` at its defaults (teacher_steps auto, scheduler auto, sampler_name euler): its
    own calibration for these steps (its own teacher) on each calibration batch, every method that samples within
    nfe evaluations fitted and validated by the node's own code, then the lowest validated error among them and
    the built-ins, sampled on the held-out noise. Each validated error is recorded beside its held-out one
    (VALIDATION)."""
    if "auto" not in CALIBRATED:
        return
    from calibrated_samplers.nodes.calibrate import fit
    from calibrated_samplers.nodes.validation import choose
    for batch, seed in itertools.product(CALIBRATION_BATCHES, CALIBRATION_SEEDS):
        run = common.calibration_run(case, batch, nfe, 0, method="auto", scheduler="auto", seed=seed)
        start = time.perf_counter()
        with torch.inference_mode():
            calibration = fit(run, tuple(case.noise.shape[1:]))
        validated = calibration.diagnostics["validated"]
        samplers = {}
        for label, entry in validated.items():
            samplers[label] = sampler, sigmas = common.candidate_sampler(calibration, label, case.schedule)
            VALIDATION.append({"model": case.name, "cfg": case.cfg, "nfe": nfe, "batch": batch, "seed": seed,
                               "label": label,
                               "evaluations": entry["evaluations"], "validated": entry["rmse"],
                               "held_out": common.rmse(case.sample(sampler, sigmas), case.reference)})
        label = choose(validated, nfe)          # as KSampler (Calibrated) does (`chosen_sampler`)
        sampler, sigmas = samplers[label]
        CALIBRATION_COSTS.append({"model": case.name, "cfg": case.cfg, "nfe": nfe, "method": "auto", "batch": batch,
                                  "seed": seed,
                                  "seconds": time.perf_counter() - start, "choice": label,
                                  "teacher": calibration.diagnostics["teacher"],
                                  "validation_evaluations": sum((calibration.diagnostics[m]["validation"] or {})
                                                                .get("evaluations", 0) for m in calibration.fits)})
        yield f"auto_b{batch}" + (f"_s{seed}" if seed else ""), f"auto({label})", "auto", nfe, sampler, sigmas


# The pack's methods: fn(case, nfe) -> iterable of (method, sampler, scheduler, steps, sampler_obj, sigmas)
METHODS = [trust_region_runs, calibrated_runs, auto_runs]


HELD_OUT_LABELS = ["calibration"]      # --held-out-labels


def held_out_labels(batch):
    """The held-out noises' class labels: new seeds for the prompts the calibration saw (the labels of its smallest
    batch, cycled: "calibration"), or every class, some of them never calibrated on ("all": prompts it did not see)."""
    classes = 10 if HELD_OUT_LABELS[0] == "all" else min(10, min(CALIBRATION_BATCHES))
    return torch.arange(batch) % classes


def run(models, nfes, cfgs, batch, teacher_steps, save=None):
    evaluations = evaluations_per_interval(max(nfes) + 4)
    records, teachers = [], {}
    for name in models:
        for cfg in cfgs:
            case = common.Case.make(name, cfg, batch, labels=held_out_labels(batch))
            start = time.perf_counter()
            teacher = case.reference = case.teacher(teacher_steps)
            teacher_seconds = time.perf_counter() - start
            floor = common.rmse(case.teacher(teacher_steps // 2), teacher) / 3   # h^2 error of the teacher itself
            teachers[f"{name} cfg {cfg:g}"] = {"steps": teacher_steps, "seconds": teacher_seconds,
                                              "estimated_rmse": floor, "latent_std": float(teacher.std())}
            print(f"{name} cfg {cfg:g}: teacher {teacher_steps} steps in {teacher_seconds:.1f} s, "
                  f"its own error ~{floor:.1e}", flush=True)
            for nfe in nfes:
                runs = [("builtin",) + r for r in builtin_runs(case, evaluations, nfe)]
                for method in METHODS:
                    runs += list(method(case, nfe))
                for method, sampler_name, scheduler, steps, sampler, sigmas in runs:
                    x, count, seconds = case.counted_sample(sampler, sigmas)
                    if count > nfe:
                        raise AssertionError(f"{method}/{sampler_name}/{scheduler} used {count} > {nfe} evaluations")
                    records.append({"model": name, "cfg": cfg, "nfe": nfe, "evaluations": count,
                                    "method": method, "sampler": sampler_name, "scheduler": scheduler,
                                    "steps": steps, "rmse": common.rmse(x, teacher), "seconds": seconds})
                if save is not None:
                    save(records, teachers)
    return records, teachers


def best(records, method="builtin"):
    """{(model, cfg, nfe): best record of that method}."""
    out = {}
    for r in records:
        key = (r["model"], r["cfg"], r["nfe"])
        if r["method"] == method and (key not in out or r["rmse"] < out[key]["rmse"]):
            out[key] = r
    return out


def plain_of(sampler):
    """The built-in sampler a calibrated one corrects (same sigmas), or None."""
    if sampler.startswith("timetuner("):
        return sampler[len("timetuner("):-1]
    return PLAIN.get(sampler)


def paired(records):
    """[(calibrated record, plain built-in record on the same sigmas)] for IIA and TimeTuner."""
    plain = {(r["model"], r["cfg"], r["nfe"], r["sampler"], r["scheduler"]): r for r in records
             if r["method"] == "builtin"}
    out = []
    for r in records:
        base = plain_of(r["sampler"]) if r["method"] != "builtin" else None
        key = (r["model"], r["cfg"], r["nfe"], base, r["scheduler"])
        if base is not None and key in plain:
            out.append((r, plain[key]))
    return out


def markdown(records, teachers, nfes):
    lines = ["# Quality benchmark", "",
             "RMSE of the final latent against the teacher (DPM-Solver++(2M), uniform in lambda) on held-out "
             "seeds; lower is better. `evaluations` counts guided model calls.", "",
             "## Teachers", "", "| model | steps | seconds | its own error (est.) | latent std |", "|---|---|---|---|---|"]
    for key, t in teachers.items():
        lines.append(f"| {key} | {t['steps']} | {t['seconds']:.1f} | {t['estimated_rmse']:.1e} | {t['latent_std']:.2f} |")
    methods = sorted({r["method"] for r in records}, key=lambda m: (m != "builtin", m))
    bests = {m: best(records, m) for m in methods}
    lines += ["", "## Best per model, guidance and NFE", "",
              "| model | cfg | NFE | " + " | ".join(f"best {m}" for m in methods) + " |",
              "|---|---|---|" + "---|" * len(methods)]
    for key in sorted(bests["builtin"]):
        cells = []
        for m in methods:
            r = bests[m].get(key)
            cells.append("" if r is None else f"{r['rmse']:.4f} ({r['sampler']}/{r['scheduler']}, {r['evaluations']})")
        lines.append(f"| {key[0]} | {key[1]:g} | {key[2]} | " + " | ".join(cells) + " |")
    pairs = paired(records)
    if pairs:
        lines += ["", "## IIA and TimeTuner against their plain solver on the same sigmas", "",
                  "| model | cfg | NFE | method | scheduler | calibrated | plain | ratio |", "|---|---|---|---|---|---|---|---|"]
        for r, p in sorted(pairs, key=lambda rp: (rp[0]["model"], rp[0]["cfg"], rp[0]["nfe"], rp[0]["method"],
                                                  rp[0]["sampler"], rp[0]["scheduler"])):
            lines.append(f"| {r['model']} | {r['cfg']:g} | {r['nfe']} | {r['method']} {r['sampler']} | "
                         f"{r['scheduler']} | {r['rmse']:.4f} | {p['rmse']:.4f} | {r['rmse'] / p['rmse']:.2f} |")
    lines += ["", "## Every built-in sampler at its best scheduler", ""]
    per = defaultdict(dict)
    for r in records:
        if r["method"] != "builtin":
            continue
        key = (r["model"], r["cfg"], r["sampler"], r["nfe"])
        if key not in per or r["rmse"] < per[key]["rmse"]:
            per[key] = r
    lines += ["| model | cfg | sampler | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
              "|---|---|---|" + "---|" * len(nfes)]
    for model, cfg, sampler in sorted({k[:3] for k in per}):
        cells = [f"{per[(model, cfg, sampler, n)]['rmse']:.4f} {per[(model, cfg, sampler, n)]['scheduler']}"
                 if (model, cfg, sampler, n) in per else "" for n in nfes]
        lines.append(f"| {model} | {cfg:g} | {sampler} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--nfe", nargs="+", type=int, default=NFES)
    parser.add_argument("--cfg", nargs="+", type=float, default=CFGS)
    parser.add_argument("--batch", type=int, default=16, help="held-out samples per model")
    parser.add_argument("--teacher-steps", type=int, default=500)
    parser.add_argument("--calibration-batches", nargs="+", type=int, default=CALIBRATION_BATCHES)
    parser.add_argument("--calibration-seeds", nargs="+", type=int, default=CALIBRATION_SEEDS,
                        help="auto: calibrate on each of these seeds' noises (below the held-out seeds)")
    parser.add_argument("--methods", nargs="+", default=CALIBRATED, choices=CALIBRATED,
                        help="calibrated methods to fit")
    parser.add_argument("--iia-substeps", nargs="+", type=int, default=IIA_SUBSTEPS, help="M of the IIA fits")
    parser.add_argument("--iia-targets", nargs="+", default=IIA_TARGETS, choices=IIA_TARGETS,
                        help="fit IIA to the teacher's states, to M sub-steps, or both")
    parser.add_argument("--held-out-labels", default="calibration", choices=["calibration", "all"],
                        help="held-out prompts (class labels): those the calibration saw (new seeds only), or all ten")
    parser.add_argument("--quick", action="store_true", help="gmm_eps and digits_flow, guided only")
    parser.add_argument("--out", default=str(common.RESULTS / "quality"))
    args = parser.parse_args()
    CALIBRATION_BATCHES[:] = args.calibration_batches
    CALIBRATION_SEEDS[:] = args.calibration_seeds
    if max(CALIBRATION_SEEDS) >= common.HELD_OUT_SEED:
        parser.error(f"calibration seeds are below the held-out seed {common.HELD_OUT_SEED}")
    IIA_SUBSTEPS[:] = args.iia_substeps
    IIA_TARGETS[:] = args.iia_targets
    CALIBRATED[:] = args.methods
    CALIBRATION_TEACHER_STEPS[:] = [args.teacher_steps]
    HELD_OUT_LABELS[:] = [args.held_out_labels]
    if args.quick:
        args.models, args.cfg = ["gmm_eps", "digits_flow"], [3.0]
    start = time.perf_counter()
    common.RESULTS.mkdir(exist_ok=True)

    def save(records, teachers):         # after every (model, cfg, NFE): a long run keeps what it measured
        with open(args.out + ".json", "w") as f:
            json.dump({"teachers": teachers, "calibrations": CALIBRATION_COSTS, "validation": VALIDATION,
                       "records": records}, f, indent=1)
        with open(args.out + ".md", "w") as f:
            f.write(markdown(records, teachers, args.nfe))

    records, teachers = run(args.models, args.nfe, args.cfg, args.batch, args.teacher_steps, save)
    for method in sorted({r["method"] for r in records} - {"builtin"}):
        print(f"\n{method} against the best built-in (ratio of RMSE)")
        ours = best(records, method)
        for key, r in sorted(best(records).items()):
            if key in ours:
                print(f"  {key[0]:18s} cfg {key[1]:g} NFE {key[2]:2d}: {ours[key]['rmse']:.4f} vs {r['rmse']:.4f} "
                      f"= {ours[key]['rmse'] / r['rmse']:.2f}")
    by_setting = defaultdict(list)
    for r, p in paired(records):
        by_setting[(r["model"], r["cfg"], r["nfe"], r["method"], r["sampler"])].append(r["rmse"] / p["rmse"])
    if by_setting:
        print("\nIIA / TimeTuner against the plain solver on the same sigmas (ratio of RMSE per scheduler: "
              + ", ".join(CALIBRATED_SCHEDULERS) + ")")
        for (model, cfg, nfe, method, sampler), ratios in sorted(by_setting.items()):
            print(f"  {model:12s} cfg {cfg:g} NFE {nfe:2d} {method:16s} {sampler:20s} "
                  + " ".join(f"{v:.2f}" for v in ratios))
    print(f"\nBest built-in per (model, cfg, NFE) — {len(records)} runs in {time.perf_counter() - start:.0f} s")
    for (model, cfg, nfe), r in sorted(best(records).items()):
        print(f"  {model:18s} cfg {cfg:g} NFE {nfe:2d}: {r['rmse']:.4f}  {r['sampler']}/{r['scheduler']} "
              f"({r['steps']} steps, {r['evaluations']} evaluations)")
    print(f"\nwrote {args.out}.json and {args.out}.md")


if __name__ == "__main__":
    main()
