"""Cost of the OLSS fit (Gram matrix, path search, coefficients) against teacher steps and latent size,
and, with --quality, held-out RMSE of OLSS / OLSS-P against ComfyUI's dpmpp_2m + karras on the
closed-form mixture models.

    python benchmarks/olss_cost.py                 # the cost table (synthetic SD-sized trajectories)
    python benchmarks/olss_cost.py --quick         # 250 and 500 teacher steps only
    python benchmarks/olss_cost.py --quality       # RMSE vs the teacher, NFE 4, 5, 6, 8

The cost runs record a real teacher (`sample_teacher`, DPM-Solver++(2M)) in float16 on SD-sized
latents, with a cheap analytic denoiser in place of a network: every element is m + s b with
b = +-1, a smooth mean field m, so D = m + s tanh(s (x - m) / sigma^2) is the exact posterior mean;
the fit cannot tell it from a UNet's outputs. Peak RSS increase: the process's high-water mark
during the fit (reset just before it) minus the resident size before it, the trajectory included
in neither.
"""
import argparse
import gc
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import host  # noqa: E402

host.setup()

import torch  # noqa: E402

from calibrated_samplers.optimizers import olss  # noqa: E402
from calibrated_samplers.optimizers.coordinates import NoiseSchedule  # noqa: E402
from calibrated_samplers.optimizers.teacher import Trajectory, sample_teacher, teacher_sigmas  # noqa: E402

SD15 = NoiseSchedule("eps", 0.0291675, 14.614642)
ROWS = [(250, (4, 64, 64), 16), (500, (4, 64, 64), 16), (1000, (4, 64, 64), 16),
        (1000, (4, 32, 32), 16), (1000, (4, 128, 128), 8)]


def synthetic_trajectory(steps, shape, batch, seed=0):
    """A float16 teacher run of the analytic two-level denoiser (see module doc)."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.nn.functional.interpolate(torch.randn(batch, shape[0], 8, 8, generator=g), size=shape[1:],
                                           mode="bilinear", align_corners=False)
    spread = 0.5

    def denoiser(x, sigma):
        s = sigma.reshape(-1, 1, 1, 1)
        return mean + spread * torch.tanh(spread * (x - mean) / (s * s))

    sigmas = teacher_sigmas(SD15, steps)
    trajectory = Trajectory(sigmas, torch.float16)
    noise = torch.randn(batch, *shape, generator=g) * sigmas[0]
    sample_teacher(denoiser, noise, sigmas, schedule=SD15, trajectory=trajectory)
    return trajectory


def _status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cost_row(steps, shape, batch, olss_steps, compare_float64=False):
    trajectory = synthetic_trajectory(steps, shape, batch)
    gc.collect()
    resident = _status("VmRSS")
    exact_peak = _reset_peak()
    cpu_start = time.process_time()
    start = time.perf_counter()
    gram = olss.trajectory_gram(trajectory, SD15)
    gram_seconds = time.perf_counter() - start
    start = time.perf_counter()
    path = olss.search_path(gram, olss_steps)
    search_seconds = time.perf_counter() - start
    start = time.perf_counter()
    coefficients = olss.fit_olss(gram, path)
    fit_seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start
    peak = _status("VmHWM") - resident
    row = dict(steps=steps, latent="x".join(map(str, shape)), batch=batch, n=olss_steps,
               trajectory_gib=trajectory.nbytes() / 2 ** 30, gram_s=gram_seconds, search_s=search_seconds,
               total_s=gram_seconds + search_seconds + fit_seconds, cpu_s=cpu_seconds, peak_gib=peak / 2 ** 30,
               peak_exact=exact_peak, max_error=float(coefficients.errors.max()), path=path)
    if compare_float64:
        start = time.perf_counter()
        exact = olss.trajectory_gram(trajectory, SD15, compute_dtype=torch.float64)
        row["float64_gram_s"] = time.perf_counter() - start
        scale = exact.gram.diagonal().sqrt()
        row["gram_rel_dev"] = float(((gram.gram - exact.gram) / (scale[:, None] * scale[None, :])).abs().max())
        exact_path = olss.search_path(exact, olss_steps)
        row["float64_path"] = exact_path
        row["float64_max_error"] = float(olss.fit_olss(exact, exact_path).errors.max())
        row["max_error_on_float64_gram"] = float(olss.fit_olss(exact, path).errors.max())
    return row


def cost_table(rows, olss_steps, compare_float64):
    """One fresh process per row, so that each row's resident-size baseline is its own."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"OLSS fit cost, {torch.get_num_threads()} threads on {os.cpu_count()} CPUs (load average {load:.1f} "
          f"at start), n = {olss_steps} student steps; times are wall-clock, CPU = process time of all threads")
    print("| teacher steps | latent | batch | trajectory (GiB, fp16) | Gram (s) | search (s) | total (s) | CPU (s) "
          "| peak RSS increase (GiB) | max step error |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for steps, shape, batch in rows:
        command = [sys.executable, __file__, "--row", json.dumps([steps, list(shape), batch]), "--steps", str(olss_steps)]
        if compare_float64:
            command.append("--compare-float64")
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        r = json.loads(output.strip().splitlines()[-1])
        print(f"| {r['steps']} | {r['latent']} | {r['batch']} | {r['trajectory_gib']:.2f} | {r['gram_s']:.2f} "
              f"| {r['search_s']:.2f} | {r['total_s']:.2f} | {r['cpu_s']:.1f} | {r['peak_gib']:.2f}"
              f"{'' if r['peak_exact'] else ' (approx.)'} | {r['max_error']:.4f} |", flush=True)
        if compare_float64:
            print(f"    float64 Gram: {r['float64_gram_s']:.2f} s; max |G32 - G64| / (|b_s||b_t|) = {r['gram_rel_dev']:.2e}; "
                  f"path {r['path']} (error on the float64 Gram {r['max_error_on_float64_gram']:.5f}) vs "
                  f"float64 search {r['float64_path']} ({r['float64_max_error']:.5f})", flush=True)


def quality_table(models, nfes, cfg, teacher_steps, calibration_batch, held_out_batch):
    import common
    import comfy.samplers

    print(f"\nHeld-out RMSE vs the teacher (500 steps), cfg {cfg:g}; OLSS fitted on a {teacher_steps}-step "
          f"teacher, {calibration_batch} calibration samples, {held_out_batch} held-out samples")
    print("| model | NFE | OLSS | OLSS-P | dpmpp_2m karras | dpmpp_2m, best scheduler | OLSS path |")
    print("|---|---|---|---|---|---|---|")
    for name in models:
        calibration = common.Case.make(name, cfg, calibration_batch, seed=0)
        trajectory = Trajectory(teacher_sigmas(calibration.schedule, teacher_steps))
        calibration.sample(comfy.samplers.KSAMPLER(sample_teacher, extra_options={
            "schedule": calibration.schedule, "trajectory": trajectory}), trajectory.sigmas)
        gram = olss.trajectory_gram(trajectory, calibration.schedule)
        case = common.Case.make(name, cfg, held_out_batch)
        reference = case.teacher(500)
        for nfe in nfes:
            fits = {"OLSS": olss.fit_olss(gram, olss.search_path(gram, nfe)),
                    "OLSS-P": olss.fit_olss(gram, olss.uniform_path(teacher_steps, nfe))}
            rmse = {}
            for label, c in fits.items():
                x, calls, _ = case.counted_sample(
                    comfy.samplers.KSAMPLER(olss.sample_olss, extra_options={"coefficients": c}), c.sigmas)
                assert calls == nfe, (label, calls)
                rmse[label] = common.rmse(x, reference)
            sampler = comfy.samplers.sampler_object("dpmpp_2m")
            for scheduler in common.SCHEDULERS:
                x, calls, _ = case.counted_sample(sampler, common.builtin_sigmas(case, scheduler, nfe, "dpmpp_2m"))
                if calls == nfe:
                    rmse[scheduler] = common.rmse(x, reference)
            best = min(common.SCHEDULERS, key=lambda k: rmse.get(k, math.inf))
            print(f"| {name} | {nfe} | {rmse['OLSS']:.4f} | {rmse['OLSS-P']:.4f} | {rmse['karras']:.4f} "
                  f"| {rmse[best]:.4f} ({best}) | {list(fits['OLSS'].path)} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="250 and 500 teacher steps only")
    parser.add_argument("--steps", type=int, default=10, help="student steps n of the path search")
    parser.add_argument("--compare-float64", action="store_true",
                        help="also compute the Gram matrix in float64 and compare paths and errors")
    parser.add_argument("--quality", action="store_true", help="held-out RMSE table on the mixture models instead")
    parser.add_argument("--cfg", type=float, default=2.0)
    parser.add_argument("--row", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.row:
        steps, shape, batch = json.loads(args.row)
        print(json.dumps(cost_row(steps, tuple(shape), batch, args.steps, args.compare_float64)))
        return
    if args.quality:
        quality_table(["gmm_eps", "gmm_v_prediction", "gmm_flow"], [4, 5, 6, 8], args.cfg,
                      teacher_steps=200, calibration_batch=16, held_out_batch=32)
        return
    cost_table(ROWS[:2] if args.quick else ROWS, args.steps, args.compare_float64)


if __name__ == "__main__":
    main()
