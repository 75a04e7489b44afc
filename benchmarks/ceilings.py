"""How far each method could go on these models: every parameter tuned at once for the final x.

    make bench-ceilings                  # writes benchmarks/results/ceilings.{json,md}

TimeTuner: one time-input ratio per step, all of them tuned together by Powell's method (bounded, a
full sampling run per trial) for the final x on the calibration batch, against the node's step-by-step
fit and the plain sampler. OLSS: the node's fit, then every coefficient and interior sigma tuned together
for the final x (`joint_refit.JointRefit`). Both are sampled on held-out noise. These searches cost hundreds of
sampling runs: they bound what the per-step fits can reach, they are not what the node does.
"""
import argparse
import json
import time

import common
import comfy.samplers
import numpy as np
import quality
import torch
from scipy.optimize import minimize

import joint_refit
from calibrated_samplers.nodes.methods import METHODS

CFG = 3.0


def _sample(case, method, tensors, settings):
    function, options = METHODS[method].sampler(tensors, settings, case.schedule)
    return case.sample(comfy.samplers.KSAMPLER(function, extra_options=options), tensors["sigmas"].float())


def timetuner_ceiling(cal, held, teacher, nfe, scheduler, base, maxfev):
    run = quality._calibration_run(cal, quality.CALIBRATION_BATCHES[0], nfe, scheduler, base)
    with torch.inference_mode():
        tensors, _ = METHODS["timetuner"].fit(run)
    settings = run.plan.settings
    final = run.trajectory.final

    def with_ratios(r):
        return {"sigmas": tensors["sigmas"], "ratios": torch.as_tensor(r, dtype=torch.float64)}

    seen = []                                   # (error, ratios) of every trial: Powell may end off its best

    def calibration_error(r):
        seen.append((common.rmse(_sample(cal, "timetuner", with_ratios(r), settings), final), np.array(r)))
        return seen[-1][0]

    ones = np.ones(len(tensors["ratios"]))
    start = time.perf_counter()
    minimize(calibration_error, tensors["ratios"].numpy(), method="Powell", bounds=[(0.3, 3.0)] * len(ones),
             options={"maxfev": maxfev, "xtol": 1e-3})
    best_error, best = min(seen, key=lambda t: t[0])
    return {"method": f"timetuner({base})", "nfe": nfe, "scheduler": scheduler,
            "plain": common.rmse(_sample(held, "timetuner", with_ratios(ones), settings), teacher),
            "node": common.rmse(_sample(held, "timetuner", tensors, settings), teacher),
            "ceiling": common.rmse(_sample(held, "timetuner", with_ratios(best), settings), teacher),
            "ceiling_calibration": best_error, "node_calibration": seen[0][0],
            "ratios": [round(float(v), 4) for v in best], "runs": len(seen),
            "seconds": time.perf_counter() - start}


def olss_ceiling(cal, held, teacher, nfe, iterations):
    run = quality._calibration_run(cal, quality.CALIBRATION_BATCHES[0], nfe)
    with torch.inference_mode():
        tensors, diagnostics = METHODS["olss"].fit(run)
    coefficients = METHODS["olss"].sampler(tensors, {}, cal.schedule)[1]["coefficients"].copy()
    joint = joint_refit.JointRefit(run.trajectory.final, iterations=iterations)
    start = time.perf_counter()
    with torch.inference_mode():
        run.sample(joint_refit.refine_olss, coefficients.sigmas.float(), coefficients=coefficients, joint=joint)
    tuned = {**tensors, "sigmas": coefficients.sigmas, "weights_x": coefficients.weights_x,
             "weights_d": coefficients.weights_d}
    return {"method": "olss", "nfe": nfe, "scheduler": diagnostics["schedule"],
            "node": common.rmse(_sample(held, "olss", tensors, {}), teacher),
            "ceiling": common.rmse(_sample(held, "olss", tuned, {}), teacher),
            "ceiling_calibration": joint.errors[-1], "node_calibration": joint.errors[0],
            "sigmas": [round(float(s), 4) for s in coefficients.sigmas], "runs": joint.evaluations,
            "seconds": time.perf_counter() - start}


def best_builtin(held, teacher, nfe):
    evaluations = quality.evaluations_per_interval(nfe + 2)
    best = None
    for sampler_name, scheduler, _, sampler, sigmas in quality.builtin_runs(held, evaluations, nfe):
        e = common.rmse(held.sample(sampler, sigmas), teacher)
        if best is None or e < best[0]:
            best = e, f"{sampler_name}/{scheduler}"
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["digits_eps", "digits_flow"])
    parser.add_argument("--timetuner-nfe", nargs="+", type=int, default=[5, 10])
    parser.add_argument("--timetuner-schedulers", nargs="+", default=["karras", "beta"])
    parser.add_argument("--timetuner-base", default="ddim")
    parser.add_argument("--olss-nfe", nargs="+", type=int, default=[5, 8])
    parser.add_argument("--calibration-batch", type=int, default=8)
    parser.add_argument("--maxfev", type=int, default=200, help="Powell's sampling runs per TimeTuner case")
    parser.add_argument("--iterations", type=int, default=4, help="JointRefit iterations for OLSS")
    parser.add_argument("--out", default=str(common.RESULTS / "ceilings"))
    args = parser.parse_args()
    quality.CALIBRATION_BATCHES[:] = [args.calibration_batch]
    records = []
    lines = ["# Ceilings: every parameter tuned at once for the final x", "",
             f"Held-out RMSE against a 500-step teacher (16 noises), cfg {CFG:g}, calibration batch "
             f"{args.calibration_batch}; `benchmarks/ceilings.py`.", "",
             "| model | method | NFE | scheduler | plain / best built-in | node fit | all at once | "
             "node / reference | all at once / reference | calibration batch: node, all at once |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name in args.models:
        held = common.Case.make(name, CFG, 16)
        teacher = held.teacher(500)
        cal = common.Case.make(name, CFG, args.calibration_batch, seed=0)
        cases = [(timetuner_ceiling, (cal, held, teacher, nfe, s, args.timetuner_base, args.maxfev))
                 for nfe in args.timetuner_nfe for s in args.timetuner_schedulers]
        cases += [(olss_ceiling, (cal, held, teacher, nfe, args.iterations)) for nfe in args.olss_nfe]
        for make, case_args in cases:
            r = {"model": name, **make(*case_args)}
            if r["method"] == "olss":
                r["plain"], r["reference"] = best_builtin(held, teacher, r["nfe"])
            else:
                r["reference"] = f"{args.timetuner_base}/{r['scheduler']}"
            records.append(r)
            lines.append(f"| {name} | {r['method']} | {r['nfe']} | {r['scheduler']} | {r['plain']:.4f} "
                         f"({r['reference']}) | {r['node']:.4f} | {r['ceiling']:.4f} | {r['node'] / r['plain']:.2f} | "
                         f"{r['ceiling'] / r['plain']:.2f} | {r['node_calibration']:.4f}, "
                         f"{r['ceiling_calibration']:.4f} |")
            print(lines[-1], f"({r['runs']} runs, {r['seconds']:.0f} s)", flush=True)
            with open(args.out + ".json", "w") as f:
                json.dump(records, f, indent=1)
            with open(args.out + ".md", "w") as f:
                f.write("\n".join(lines) + "\n")
    print(f"wrote {args.out}.json and {args.out}.md")


if __name__ == "__main__":
    main()
