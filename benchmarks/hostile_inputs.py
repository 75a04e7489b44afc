"""Hostile and careless inputs, each tried through the pack's nodes in real ComfyUI (in-process, on the
closed-form model built like an SD1.5 checkpoint), and what each got: the message (as ComfyUI's error panel
shows it) or the safe result. Writes benchmarks/results/hostile_inputs.md; the README's reliability section
quotes it.

    $VENV/bin/python benchmarks/hostile_inputs.py
"""
import shutil
import tempfile
from pathlib import Path

import common  # noqa: F401  (sets up the host)
import comfy.model_management as mm
import folder_paths
import torch
from calibrated_samplers import calibration_cache as store
from calibrated_samplers.nodes import store as node_store
from calibrated_samplers.nodes.calibration import CalibrateSampler, CalibrationSigmas, LoadCalibration
from calibrated_samplers.nodes.ksampler import CalibratedKSampler
from calibrated_samplers.nodes.samplers import node_for
from calibrated_samplers.nodes.trust_region import TrustRegionStepsScheduler, _optimized
from comfy_extras.nodes_custom_sampler import DualCFGGuider, RandomNoise, SamplerCustom, SamplerCustomAdvanced
from safetensors import safe_open
from safetensors.torch import save_file
from tinymodels import gmm

CFG = 3.0
MODEL = gmm.build_like("sd15")
FOLDER = Path(tempfile.mkdtemp(prefix="calibrations-"))
folder_paths.folder_names_and_paths["calibrations"] = ([str(FOLDER)], {".safetensors"})
POSITIVE, NEGATIVE = gmm.conditioning([3]), gmm.null_conditioning()


def empty(batch=1, size=8):
    return {"samples": torch.zeros(batch, 4, size, size)}


def calibrate(model=MODEL, steps=4, teacher_steps=60, batch=4, method="olss", cfg=CFG, latent=None, **options):
    return CalibrateSampler.execute(model, POSITIVE, NEGATIVE, latent or empty(), 0, cfg, steps, teacher_steps, batch,
                                    method, **options).result[0]


def sample(calibration, method="olss", model=MODEL, cfg=CFG, latent=None, sigmas=None):
    node = node_for(method)
    sampler = node.execute(calibration, method if len(node.METHODS) > 1 else None).result[0]
    sigmas = CalibrationSigmas.execute(calibration, method).result[0] if sigmas is None else sigmas
    return SamplerCustom.execute(model, True, 7, cfg, POSITIVE, NEGATIVE, sampler, sigmas,
                                 latent or empty(2)).result[0]["samples"]


def ksampler(calibration=None, **options):
    inputs = dict(model=MODEL, seed=1, steps=4, cfg=CFG, sampler_name="euler", scheduler="karras", positive=POSITIVE,
                  negative=NEGATIVE, latent_image=empty(2), denoise=1.0, method="olss", teacher_steps=60,
                  calibration_batch=4, calibration=calibration)
    return CalibratedKSampler.execute(**{**inputs, **options}).result[0]["samples"]


def edited(key, edit, label):
    path = next(p for p in FOLDER.iterdir() if p.suffix == ".safetensors" and not p.name.startswith("edited"))
    with safe_open(str(path), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors[key] = edit(tensors[key]).contiguous()
    metadata[store.CHECKSUM_KEY] = store.checksum(tensors, metadata)
    save_file(tensors, str(FOLDER / f"edited_{label}.safetensors"), metadata=metadata)
    return LoadCalibration.execute(f"edited_{label}.safetensors")


def in_folder(path, action):
    folder_paths.folder_names_and_paths["calibrations"] = ([str(path)], {".safetensors"})
    try:
        return action()
    finally:
        folder_paths.folder_names_and_paths["calibrations"] = ([str(FOLDER)], {".safetensors"})


def a_file_as_folder():
    path = FOLDER / "not_a_folder"
    path.write_text("x")
    return in_folder(path, lambda: calibrate(refit=True))


def disk_full():
    usage = shutil.disk_usage(FOLDER)._replace(free=4096)
    original = node_store.shutil.disk_usage
    node_store.shutil.disk_usage = lambda path: usage
    try:
        return calibrate(refit=True, steps=5)
    finally:
        node_store.shutil.disk_usage = original


def folder_where_the_file_goes():
    calibrate(steps=6)
    path = next(p for p in FOLDER.iterdir() if "6steps" in p.name)
    path.unlink()
    path.mkdir()
    return calibrate(steps=6)


def inpainting(method):
    calibration = calibrate(method="all", steps=3)
    latent = {"samples": torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3)) * 5,
              "noise_mask": torch.zeros(2, 1, 8, 8)}
    latent["noise_mask"][..., :4] = 1
    out = sample(calibration, method, latent=latent)
    kept = latent["noise_mask"].expand_as(out) == 0
    change = float((out - latent["samples"])[kept].abs().max() / latent["samples"].abs().max())
    return f"kept region changed by {change:.1e} of the latent's scale"


def dual_cfg_guider():
    calibration = calibrate()
    guider = DualCFGGuider.execute(MODEL, POSITIVE, gmm.conditioning([4]), NEGATIVE, CFG, CFG, "regular").result[0]
    node = node_for("olss")
    return SamplerCustomAdvanced.execute(RandomNoise.execute(3).result[0], guider,
                                         node.execute(calibration, "olss").result[0],
                                         CalibrationSigmas.execute(calibration, "olss").result[0], empty(1))


def nan_model():
    broken = MODEL.clone()
    broken.set_model_sampler_post_cfg_function(lambda args: args["denoised"] * float("nan"))
    return calibrate(broken, refit=True)


def cancel_trust_region():
    _optimized.cache_clear()
    mm.interrupt_current_processing(True)
    try:
        return TrustRegionStepsScheduler.execute(gmm.build_model("flow"), 90, "uni_pc", "karras", 2.0, 1.0)
    finally:
        mm.interrupt_current_processing(False)


def other_model():
    return sample(calibrate(), model=gmm.build_like("sd2"))


CASES = [
    ("method `dpmpp_3m`", lambda: calibrate(method="dpmpp_3m")),
    ("steps 0", lambda: calibrate(steps=0)),
    ("steps 40 with a 60-step teacher", lambda: calibrate(steps=40)),
    ("cfg NaN", lambda: calibrate(cfg=float("nan"))),
    ("cfg inf", lambda: calibrate(cfg=float("inf"))),
    ("calibration_batch 0", lambda: calibrate(batch=0)),
    ("scheduler `nonexistent`", lambda: calibrate(scheduler="nonexistent")),
    ("TimeTuner on `euler_ancestral` (stochastic)", lambda: calibrate(method="timetuner", sampler_name="euler_ancestral")),
    ("iia_substeps 1", lambda: calibrate(method="iia_ddim", iia_substeps=1)),
    ("sigmas not decreasing", lambda: calibrate(sigmas=torch.tensor([1.0, 3.0, 0.5, 0.1, 0.0]))),
    ("sigmas above the model's sigma_max", lambda: calibrate(sigmas=torch.tensor([20.0, 3.0, 0.5, 0.1, 0.0]))),
    ("model that returns NaN", nan_model),
    ("4x256x256 latent, batch 64, teacher 4000 steps", lambda: calibrate(steps=5, teacher_steps=4000, batch=64,
                                                                          latent=empty(1, 256))),
    ("calibration batch 1", lambda: f"ok: sampled, finite {bool(torch.isfinite(sample(calibrate(batch=1, steps=3))).all())}"),
    ("calibrations folder is a file", a_file_as_folder),
    ("calibrations folder not writable", lambda: in_folder("/sys/kernel/calibrated_samplers", calibrate)),
    ("a folder where the calibration's file goes", folder_where_the_file_goes),
    ("disk full", disk_full),
    ("calibration used with another model (SD2-like, V-prediction)", other_model),
    ("calibration used with the same model in SDXL's latent format", lambda: sample(calibrate(), model=gmm.build_like("sdxl"))),
    ("calibration used at another cfg", lambda: sample(calibrate(), cfg=5.0)),
    ("calibration used at another latent size", lambda: sample(calibrate(), latent=empty(2, 16))),
    ("calibration used with other sigmas", lambda: sample(calibrate(), sigmas=torch.tensor([14.6, 3.0, 1.0, 0.3, 0.0]))),
    ("DualCFGGuider with a calibrated sampler", dual_cfg_guider),
    ("KSampler (Calibrated) denoise NaN", lambda: ksampler(denoise=float("nan"))),
    ("KSampler (Calibrated) denoise 0.5", lambda: ksampler(denoise=0.5)),
    ("KSampler (Calibrated) with a 4-step calibration at steps 6", lambda: ksampler(calibrate(), steps=6)),
    ("stored file edited: NaN coefficients, re-checksummed", lambda: edited("olss.weights_d", lambda t: t * float("nan"), "nan")),
    ("stored file edited: wrong shape, re-checksummed", lambda: edited("olss.weights_x", lambda t: t[:2], "shape")),
    ("calibration name 7 (not text)", lambda: LoadCalibration.execute(7)),
    ("calibration name `../../etc/passwd`", lambda: LoadCalibration.execute("../../etc/passwd")),
    ("inpainting mask, OLSS, 3 steps", lambda: inpainting("olss")),
    ("inpainting mask, BIIA-Heun, 3 steps", lambda: inpainting("biia_heun")),
    ("Cancel during the trust-region solve (90 steps)", cancel_trust_region),
]


def outcome(action):
    try:
        result = action()
    except mm.InterruptProcessingException:
        return "stopped: InterruptProcessingException (Cancel)"
    except Exception as e:      # what ComfyUI's error panel would show
        return f"refused: {type(e).__name__}: {e}"
    return result if isinstance(result, str) else "ok"


def main():
    lines = ["# Hostile and careless inputs", "", "`benchmarks/hostile_inputs.py`: each input through the pack's nodes in "
             "real ComfyUI (closed-form model in SD1.5's format), and what it got.", "",
             "| input | what it got |", "|---|---|"]
    for label, action in CASES:
        got = outcome(action).replace("|", "/").replace("\n", " ")
        lines.append(f"| {label} | {got} |")
        print(lines[-1], flush=True)
    common.RESULTS.mkdir(exist_ok=True)
    (common.RESULTS / "hostile_inputs.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {common.RESULTS / 'hostile_inputs.md'}")


if __name__ == "__main__":
    main()
