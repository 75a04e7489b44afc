"""A second pass at denoise below 1 (img2img, a hires fix): KSampler (Calibrated)'s `auto` against every built-in
sampler at the same model evaluations, denoise and start.

    make bench-img2img                                   # digits and closed-form models, 3 and 5 steps, denoise 0.5
    make bench-img2img ARGS="--models sharp_sd15 --steps 3"

For each model, scheduler and step count, the calibration is made by the nodes' own `calibrate` (method auto,
teacher_steps auto, calibration batch 8, an empty latent_image: its starting pictures are the teacher's own).
Held-out: new pictures (the teacher's own on held-out seeds: a 200-step run from sigma_max), re-noised to the
pass's start sigma with new noise, as KSampler does; the reference is a 500-step teacher from that start. The
built-ins are every one-evaluation deterministic sampler on every scheduler whose denoise schedule starts at the
same sigma (another start is another noise level: another task with another answer), at the same steps.
"""
import argparse
import json
import tempfile

import common
import folder_paths
import comfy.sample
import comfy.samplers
import torch

from calibrated_samplers.nodes.builtins import ONE_EVALUATION, schedules
from calibrated_samplers.nodes.calibrate import calibrate, chosen_sampler
from calibrated_samplers.nodes.request import Request

MODELS = ["digits_eps", "digits_flow", "sharp_sd15", "sharp_flux"]
CALIBRATION_BATCH = 8


def sample(case, sampler, sigmas, pictures, seed):
    """Final x in the model's space of ComfyUI's sampling from `pictures` (LATENT) re-noised to sigmas[0]."""
    noise = comfy.sample.prepare_noise(pictures, seed)
    with torch.inference_mode():
        out = comfy.sample.sample_custom(case.model, noise, case.cfg, sampler, sigmas.clone(),
                                         case.module.conditioning(case.labels),
                                         case.module.null_conditioning(len(case.labels)), pictures, disable_pbar=True,
                                         seed=seed)
        return case.model.model.process_latent_in(out)


def teacher(case, steps, top=None):
    return comfy.samplers.KSAMPLER(common.sample_teacher, extra_options={"schedule": case.schedule}), \
        common.teacher_sigmas(case.schedule, steps, top=top)


def measure(name, cfg, steps, scheduler, denoise, batch, starts):
    labels = torch.arange(batch) % CALIBRATION_BATCH if starts == "teacher" else torch.zeros(batch, dtype=torch.long)
    case = common.Case.make(name, cfg, batch, labels=labels)     # (one_picture: its prompt, new pictures)
    pictures = torch.zeros_like(case.noise)
    pictures = case.model.model.process_latent_out(sample(case, *teacher(case, 200), pictures, common.HELD_OUT_SEED + 1))
    request = Request.from_inputs("auto", seed=0, cfg=cfg, steps=steps, denoise=denoise, teacher_steps=0,
                                  calibration_batch=CALIBRATION_BATCH, scheduler=scheduler, sampler_name="euler")
    calib_labels = torch.arange(CALIBRATION_BATCH) % 10
    latent = torch.zeros(1, *case.noise.shape[1:])
    if starts == "one_picture":     # a hires fix's second pass: one given picture (not a held-out one) for every noise
        one = common.Case.make(name, cfg, 1, labels=[0])
        latent = case.model.model.process_latent_out(sample(one, *teacher(one, 200), latent, common.HELD_OUT_SEED + 2))
        calib_labels = torch.zeros(CALIBRATION_BATCH, dtype=torch.long)
    with torch.inference_mode():
        calibration, _ = calibrate(case.model, case.module.conditioning(calib_labels),
                                   case.module.null_conditioning(CALIBRATION_BATCH), latent, request, refit=True)
    sampler, sigmas, choice = chosen_sampler(calibration, steps)
    start = float(sigmas[0])
    reference = sample(case, *teacher(case, 500, top=start), pictures, common.HELD_OUT_SEED)
    errors = {}
    for sampler_name in ONE_EVALUATION:
        builtin = comfy.samplers.sampler_object(sampler_name)
        for other, other_sigmas in schedules(case.model_sampling, steps, sampler_name, denoise, start).items():
            x = sample(case, builtin, other_sigmas.float(), pictures, common.HELD_OUT_SEED)
            errors[f"{sampler_name} / {other}"] = common.rmse(x, reference)
    best = min(errors, key=errors.get)
    ours = common.rmse(sample(case, sampler, sigmas, pictures, common.HELD_OUT_SEED), reference)
    validated = calibration.diagnostics["validated"]
    return {"model": name, "cfg": cfg, "steps": steps, "scheduler": scheduler, "denoise": denoise, "starts": starts,
            "start_sigma": start, "auto_choice": choice, "auto": ours, "best_builtin": best,
            "best_builtin_rmse": errors[best], "ratio": ours / errors[best],
            "builtins_compared": len(errors), "teacher_steps": calibration.diagnostics["teacher"]["steps"],
            "validated": {label: entry["rmse"] for label, entry in validated.items()}}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--steps", nargs="+", type=int, default=[3, 5])
    parser.add_argument("--schedulers", nargs="+", default=["auto", "normal"])
    parser.add_argument("--denoise", type=float, default=0.5)
    parser.add_argument("--cfg", type=float, default=3.0)
    parser.add_argument("--batch", type=int, default=16, help="held-out pictures per model")
    parser.add_argument("--starts", default="teacher", choices=["teacher", "one_picture"],
                        help="the calibration's pictures: the teacher's own (an empty latent_image), or one picture "
                             "given as latent_image (a hires fix), of class 0, for every calibration noise")
    parser.add_argument("--out", default=str(common.RESULTS / "img2img"))
    args = parser.parse_args()
    folder_paths.folder_names_and_paths["calibrations"] = ([tempfile.mkdtemp()], {".safetensors"})  # (not stored)
    rows = []
    for name in args.models:
        for scheduler in args.schedulers:
            for steps in args.steps:
                row = measure(name, args.cfg, steps, scheduler, args.denoise, args.batch, args.starts)
                rows.append(row)
                print(f"{name:12s} {scheduler:7s} {steps} steps from sigma {row['start_sigma']:.3g}: auto "
                      f"({row['auto_choice']}) {row['auto']:.4f} / best built-in ({row['best_builtin']}, of "
                      f"{row['builtins_compared']}) {row['best_builtin_rmse']:.4f} = {row['ratio']:.2f}x", flush=True)
    with open(args.out + ".json", "w") as f:
        json.dump(rows, f, indent=1)
    lines = [f"Second pass at denoise {args.denoise:g}, cfg {args.cfg:g}, calibrated on {args.starts} pictures, "
             f"{args.batch} held-out pictures: held-out "
             "RMSE of KSampler (Calibrated)'s auto / the best built-in at the same steps, denoise and start sigma.", "",
             "| model | scheduler | steps | start sigma | auto's choice | auto | best built-in | ratio |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['scheduler']} | {r['steps']} | {r['start_sigma']:.3g} | {r['auto_choice']} "
                     f"| {r['auto']:.4f} | {r['best_builtin']} {r['best_builtin_rmse']:.4f} | {r['ratio']:.2f}x |")
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
