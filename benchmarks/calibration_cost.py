"""What a calibration costs, and what a shorter teacher changes: Calibrate Sampler's method `all` with scheduler
auto, made by the nodes' own `fit`, with a fixed teacher and with teacher_steps auto.

    make bench-cost                                  # digits and closed-form models, NFE 5 and 10
    make bench-cost ARGS="--models sharp_sd15 --nfe 5"

Model calls are counted as ComfyUI makes them (guided calls, after CFG) and weighed by the rows they
evaluate, so a call on half the calibration batch counts one half: "calls" are calls on the whole batch;
"invocations" counts the calls as made, whatever their rows (what a GPU's per-call overhead and a call of few
latents cost).
They are split into the teacher's runs (diagnostics["teacher"]), the built-in screen
(diagnostics["builtins_evaluations"]) and each method's fits and validation (diagnostics[method]["calls"]); the
node's own total is checked against the count. Each method's held-out error (new seeds, the calibration's prompts)
is measured against a 500-step teacher, for both calibrations, and so is the sample `auto` chooses.
"""
import argparse
import json
import time

import common
import torch

from calibrated_samplers.nodes.calibrate import fit
from calibrated_samplers.nodes.methods import AUTO
from calibrated_samplers.nodes.validation import choose

MODELS = ["digits_eps", "digits_flow", "sharp_sd15", "sharp_flux"]
CALIBRATION_BATCH = 8


def counted(case):
    """A clone of the case's model that records the rows of every guided call."""
    rows = []
    model = case.model.clone()
    model.set_model_sampler_post_cfg_function(lambda args: rows.append(args["denoised"].shape[0]) or args["denoised"])
    return model, rows


def held_out(case, calibration, label):
    """Held-out RMSE of one candidate of the calibration (a method or a built-in) against the case's reference."""
    return common.rmse(case.sample(*common.candidate_sampler(calibration, label, case.schedule)), case.reference)


def measure(case, nfe, teacher_steps):
    model, rows = counted(case)
    original, case.model = case.model, model
    try:
        run = common.calibration_run(case, CALIBRATION_BATCH, nfe, teacher_steps, scheduler="auto",
                                     labels=torch.arange(CALIBRATION_BATCH) % 10)
        start = time.perf_counter()
        with torch.inference_mode():
            calibration = fit(run, tuple(case.noise.shape[1:]))
        seconds = time.perf_counter() - start
    finally:
        case.model = original
    d = calibration.diagnostics
    calls = sum(rows) / CALIBRATION_BATCH
    teacher = d["teacher"]
    errors = {m: held_out(case, calibration, m) for m in calibration.fits}
    choice = choose(d["validated"], nfe)
    errors["auto"] = held_out(case, calibration, choice)
    assert abs(calls - d["calls"]) < 1e-6, (calls, d["calls"])        # the node's own count is every call
    return {"teacher_steps": teacher["steps"], "estimate": teacher.get("estimate"), "target": teacher.get("target"),
            "calls": calls, "invocations": len(rows), "teacher_calls": teacher["evaluations"],
            "builtin_calls": d["builtins_evaluations"],
            "other_calls": calls - teacher["evaluations"] - d["builtins_evaluations"], "seconds": seconds,
            "method_calls": {m: d[m]["calls"] for m in calibration.fits},
            # what KSampler (Calibrated)'s auto does not fit: not in AUTO, or more than nfe evaluations
            "not_in_auto": [m for m in calibration.fits if m not in AUTO or calibration.evaluations[m] > nfe],
            "auto": choice, "held_out": errors}


def markdown(results):
    lines = ["# Calibration cost", "",
             f"Calibrate Sampler's method all with scheduler auto, calibration batch "
             f"{CALIBRATION_BATCH}, cfg 3. Calls: guided model calls on the whole calibration batch (a half-batch "
             "call counts one half). Held-out: RMSE against a 500-step teacher on 16 new seeds, the calibration's "
             "prompts.", "",
             "| model | NFE | teacher | its error (est.) | calls: teacher | built-ins | fits and validation | "
             "total | invocations | seconds | auto's choice | auto held-out |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for setting in ("fixed", "auto"):
            m = r[setting]
            estimate = "" if m["estimate"] is None else f"{m['estimate']:.1e} (target {m['target']:.1e})"
            lines.append(f"| {r['model']} | {r['nfe']} | {setting}: {m['teacher_steps']} steps | {estimate} | "
                         f"{m['teacher_calls']:.0f} | {m['builtin_calls']:.0f} | {m['other_calls']:.0f} | "
                         f"{m['calls']:.0f} | {m.get('invocations', '')} | {m['seconds']:.0f} | {m['auto']} | "
                         f"{m['held_out']['auto']:.4f} |")
    fitted = sorted({m for r in results for m in r["auto"]["method_calls"]})
    lines += ["", "Model calls per method with teacher_steps auto (its fits and validation, every scheduler tried), "
              "and the total of KSampler (Calibrated)'s auto, which fits only the methods of AUTO "
              "spending at most NFE evaluations (not TimeTuner, not the Heun forms)", "",
              "| model | NFE | " + " | ".join(fitted) + " | KSampler auto |",
              "|---|---|" + "---|" * (len(fitted) + 1)]
    for r in results:
        m = r["auto"]
        ksampler = m["calls"] - sum(m["method_calls"][f] for f in m["not_in_auto"])
        lines.append(f"| {r['model']} | {r['nfe']} | " + " | ".join(f"{m['method_calls'][f]:.0f}" for f in fitted)
                     + f" | {ksampler:.0f} |")
    methods = sorted({m for r in results for m in r["fixed"]["held_out"]})
    lines += ["", "Held-out RMSE with teacher_steps auto as a ratio to the fixed teacher's (1.00: the same)", "",
              "| model | NFE | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    for r in results:
        cells = [f"{r['auto']['held_out'][m] / r['fixed']['held_out'][m]:.2f}" if m in r["auto"]["held_out"] else ""
                 for m in methods]
        lines.append(f"| {r['model']} | {r['nfe']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--nfe", nargs="+", type=int, default=[5, 10])
    parser.add_argument("--fixed-teacher-steps", type=int, default=500)
    parser.add_argument("--out", default=str(common.RESULTS / "calibration_cost"))
    args = parser.parse_args()
    results = []
    for name in args.models:
        case = common.Case.make(name, 3.0, 16, labels=torch.arange(16) % min(10, CALIBRATION_BATCH))
        case.reference = case.teacher(500)
        for nfe in args.nfe:
            row = {"model": name, "nfe": nfe, "fixed": measure(case, nfe, args.fixed_teacher_steps),
                   "auto": measure(case, nfe, 0)}
            results.append(row)
            print(f"{name} NFE {nfe}: calls {row['fixed']['calls']:.0f} (teacher {args.fixed_teacher_steps}) / "
                  f"{row['auto']['calls']:.0f} (teacher auto: {row['auto']['teacher_steps']} steps)", flush=True)
            common.RESULTS.mkdir(exist_ok=True)
            with open(args.out + ".json", "w") as f:
                json.dump(results, f, indent=1)
            with open(args.out + ".md", "w") as f:
                f.write(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
