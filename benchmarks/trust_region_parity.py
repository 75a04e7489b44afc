"""DM-NonUniform time-step optimization (optimizers/trust_region.py) against the released code.

    $VENV/bin/python benchmarks/trust_region_parity.py [--repeats 5]

Parity setting: the SD1.5/SDXL schedule (scaled-linear betas 0.00085..0.012), the released code's
order pattern 1,2,3,..,3,2,1, p = 2, truncNum = 3, its uniform-t start on the discrete VP schedule.
Columns: the released code's objective at its own result (METHODS.md 1.3, run as shipped), ours
(warm-started trust-constr, the default) and trust-constr alone, their ratios, and the median wall
time of `repeats` runs. Then our default setting (trunc rule 3 if N <= 7 else 0, uniform-lambda
start) per sampler, with the shortest step in lambda (a step near the 1e-3 margin means the
surrogate's optimum has collapsed that step), and the same with truncNum = 3 at every N. Needs
numpy and scipy only: comfy is never imported.
"""
import argparse
import importlib
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import host  # noqa: E402

host.setup(comfy=False)
tr = importlib.import_module("calibrated_samplers.optimizers.trust_region")
NoiseSchedule = importlib.import_module("calibrated_samplers.optimizers.coordinates").NoiseSchedule

BETAS = host.SD15_BETAS
_CUMPROD = np.cumprod(1 - BETAS)
_SIGMAS = np.sqrt((1 - _CUMPROD) / _CUMPROD)
SD = NoiseSchedule("eps", float(_SIGMAS[0]), float(_SIGMAS[-1]))
ORIGINAL = {4: 15.0579, 5: 13.4804, 6: 11.3782, 7: 8.5707, 8: 6.7151, 9: 4.8186, 10: 4.7460,
            12: 4.4743, 15: 4.1139}
ORIGINAL_TIME = {4: 0.14, 5: 0.18, 6: 1.4, 7: 3.0, 8: 2.1, 9: 3.0, 10: 2.8, 12: 6.9, 15: 6.7}


def timed(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return out, statistics.median(times)


def parity(repeats):
    print(f"Parity: SD1.5/SDXL eps schedule (sigma {SD.sigma_min:.7f}..{SD.sigma_max:.6f}), "
          "pattern 1,2,3,..,3,2,1, p = 2, truncNum = 3, uniform-t start")
    print(f"{'N':>3} {'start':>8} {'original':>9} {'ours':>8} {'ratio':>6} {'time s':>7} "
          f"{'tc alone':>9} {'ratio':>6} {'time s':>7} {'orig s':>7}")
    times = []
    for steps in range(4, 16):
        init = tr.discrete_vp_uniform_t_sigmas(BETAS, steps)
        start = tr.objective(tr.initial_lambdas(SD, steps, init), SD, "original", 2, 3)
        row = []
        for warm in (True, False):
            lam, seconds = timed(lambda: tr.optimize_lambdas(SD, steps, "original", init, 2, 3,
                                                             warm_start=warm),
                                 repeats if warm else max(1, repeats // 2))
            row.append((tr.objective(lam, SD, "original", 2, 3), seconds))
        times.append(row[0][1])
        orig = ORIGINAL.get(steps)
        ratio = [f"{f / orig:6.4f}" if orig else f"{'-':>6}" for f, _ in row]
        print(f"{steps:>3} {start:8.4f} {orig if orig else '-':>9} {row[0][0]:8.4f} {ratio[0]} "
              f"{row[0][1]:7.3f} {row[1][0]:9.4f} {ratio[1]} {row[1][1]:7.3f} "
              f"{ORIGINAL_TIME.get(steps, '-'):>7}")
    print(f"ours: median {statistics.median(times):.3f} s, max {max(times):.3f} s over N = 4..15")


def defaults(repeats, trunc_num=None):
    rule = "trunc rule 3 if N <= 7 else 0" if trunc_num is None else f"trunc_num = {trunc_num}"
    print(f"\n{'Default setting' if trunc_num is None else 'Default setting but'} ({rule}, "
          "uniform-lambda start), same schedule")
    print(f"{'solver':>9} {'N':>3} {'trunc':>5} {'start':>8} {'ours':>8} {'time s':>7} "
          f"{'min step':>8}  sigmas")
    solvers = ("uni_pc", "dpmpp_2m", "euler") if trunc_num is None else ("uni_pc", "dpmpp_2m")
    for solver in solvers:
        for steps in (4, 5, 6, 8, 10, 12, 15, 20) if trunc_num is None else (8, 10, 12, 15, 20):
            tn = tr.default_trunc_num(steps) if trunc_num is None else trunc_num
            start = tr.objective(tr.initial_lambdas(SD, steps, "uniform_lambda"), SD, solver, 2, tn)
            lam, seconds = timed(lambda: tr.optimize_lambdas(SD, steps, solver, trunc_num=tn), repeats)
            sigmas = SD.sigma_of_lambda(lam)
            shown = " ".join(f"{s:.3g}" for s in sigmas)
            print(f"{solver:>9} {steps:>3} {tn:>5} {start:8.4f} "
                  f"{tr.objective(lam, SD, solver, 2, tn):8.4f} {seconds:7.3f} "
                  f"{np.diff(lam).min():8.4f}  {shown}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    parity(args.repeats)
    defaults(max(1, args.repeats // 2))
    defaults(max(1, args.repeats // 2), trunc_num=3)


if __name__ == "__main__":
    main()
