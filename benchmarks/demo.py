"""The demo (`make demo`): the pack's main job on the bundled tiny digits models, inside real ComfyUI.

For each trained model (EPS and flow), with guidance: calibrate once (a teacher run on calibration
noises), then sample 10 held-out seeds at 5 model evaluations with OLSS, OLSS-P, IIA-DDIM, IIA-Heun,
TimeTuner on dpmpp_2m, the trust-region schedule and the best of a shortlist of strong built-in
sampler/scheduler pairs (`make bench` searches them all), and compare each to the teacher run from the
same noise. Writes out/demo/grid.png, out/demo/results.md and each model's Calibration Report picture
(out/demo/report_<model>.png), and prints where they are. A few minutes on a laptop CPU.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import common
import comfy.samplers
import folder_paths
import torch
from PIL import Image, ImageDraw
from calibrated_samplers.nodes.calibrate import checked_sampler, method_sigmas
from calibrated_samplers.nodes.calibration import CalibrateSampler
from calibrated_samplers.nodes.report import draw_report
from calibrated_samplers.nodes.trust_region import trust_region_sigmas
OUT = Path(__file__).resolve().parents[1] / "out" / "demo"
NFE, CFG, SHOWN = 5, 3.0, 10
SCHEDULER, TIMETUNER_BASE = "beta", "dpmpp_2m"
SHORTLIST = [(s, k) for s in ("dpmpp_2m", "uni_pc", "ipndm", "deis") for k in ("karras", "beta", "kl_optimal", "normal")]


def best_builtin(case, teacher):
    best = None
    for sampler_name, scheduler in SHORTLIST:
        sampler = comfy.samplers.sampler_object(sampler_name)
        x = case.sample(sampler, common.builtin_sigmas(case, scheduler, NFE, sampler_name))
        err = common.rmse(x, teacher)
        if best is None or err < best[0]:
            best = (err, f"{sampler_name} / {scheduler}", x)
    return best


def rows_for(name, teacher_steps, batch):
    case = common.Case.make(name, CFG, SHOWN)
    start = time.perf_counter()
    teacher = case.teacher(teacher_steps)
    rows = [(f"teacher ({teacher_steps} steps)", 0.0, time.perf_counter() - start, teacher)]
    calibration_labels = torch.arange(batch) % 10
    positive = case.module.conditioning(calibration_labels)
    negative = case.module.null_conditioning(batch)
    empty = {"samples": torch.zeros(1, *case.noise.shape[1:])}
    start = time.perf_counter()
    # every method at NFE steps; the Heun forms take two evaluations per step, so (NFE + 1) // 2 steps
    with torch.inference_mode():                     # as ComfyUI runs its nodes
        calibration = CalibrateSampler.execute(case.model, positive, negative, empty, 0, CFG, NFE, teacher_steps,
                                               batch, "all", scheduler=SCHEDULER,
                                               sampler_name=TIMETUNER_BASE).result[0]
        heun = CalibrateSampler.execute(case.model, positive, negative, empty, 0, CFG, (NFE + 1) // 2,
                                        teacher_steps, batch, "iia_heun", scheduler=SCHEDULER).result[0]
    calibrate_seconds = time.perf_counter() - start
    err, label, x = best_builtin(case, teacher)
    rows.append((f"best built-in: {label}", err, None, x))
    sigmas = trust_region_sigmas(case.model_sampling, NFE, "uni_pc", "uniform_t", 2.0)
    x = case.sample(comfy.samplers.sampler_object("uni_pc"), sigmas)
    rows.append(("trust-region sigmas + uni_pc", common.rmse(x, teacher), None, x))
    shown = [(calibration, "olss_p", "OLSS-P"), (calibration, "olss", "OLSS"),
             (calibration, "iia_ddim", f"IIA-DDIM ({SCHEDULER})"), (heun, "iia_heun", f"IIA-Heun ({SCHEDULER})"),
             (calibration, "timetuner", f"TimeTuner on {TIMETUNER_BASE} ({SCHEDULER})")]
    for record, method, label in shown:
        x = case.sample(checked_sampler(record, method), method_sigmas(record, method))
        rows.append((label, common.rmse(x, teacher), None, x))
    draw_report(calibration).save(OUT / f"report_{name}.png")
    return case, rows, calibrate_seconds


def tile(case, latents, scale=4):
    images = case.module.decode(latents[:SHOWN]).clamp(-1, 1)
    images = ((images + 1) * 127.5).round().to(torch.uint8)
    strip = torch.cat(list(images), dim=1).numpy()
    return Image.fromarray(strip).resize((strip.shape[1] * scale, strip.shape[0] * scale), Image.NEAREST)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher-steps", type=int, default=300)
    parser.add_argument("--calibration-batch", type=int, default=16)
    parser.add_argument("--models", nargs="+", default=["digits_eps", "digits_flow"])
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    folder_paths.folder_names_and_paths["calibrations"] = ([tempfile.mkdtemp(prefix="calibrations-")], {".safetensors"})
    lines = ["# Demo: 5 model evaluations on the bundled tiny digits models", "",
             f"Held-out seeds, cfg {CFG:g}; RMSE of the final latent against the {args.teacher_steps}-step teacher "
             "from the same noise.", ""]
    strips = []
    for name in args.models:
        case, rows, calibrate_seconds = rows_for(name, args.teacher_steps, args.calibration_batch)
        lines += [f"## {name}", "", f"Calibration (two Calibrate runs: every method at {NFE} steps, IIA-Heun at "
                  f"{(NFE + 1) // 2}; each a {args.teacher_steps}-step teacher on {args.calibration_batch} noises + "
                  f"fits): {calibrate_seconds:.1f} s", "",
                  "| sampler | RMSE vs teacher | digits recognised |", "|---|---|---|"]
        for label, err, _, x in rows:
            correct = int((case.module.classify(x) == case.labels.numpy()).sum())
            lines.append(f"| {label} | {err:.4f} | {correct}/{len(x)} |")
            strips.append((f"{name}: {label}" + (f"  rmse {err:.3f}" if err else ""), tile(case, x)))
        lines.append("")
    width = max(s.width for _, s in strips)
    grid = Image.new("RGB", (width, sum(s.height + 18 for _, s in strips)), "white")
    y = 0
    for label, strip in strips:
        ImageDraw.Draw(grid).text((4, y + 3), label, fill="black")
        grid.paste(strip.convert("RGB"), (0, y + 18))
        y += strip.height + 18
    grid.save(OUT / "grid.png")
    (OUT / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {OUT / 'grid.png'}, {OUT / 'results.md'} and the calibration reports {OUT}/report_*.png")


if __name__ == "__main__":
    sys.exit(main())
