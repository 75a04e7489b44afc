"""Bad inputs and limits, as a user meets them: a clear message naming the input (ComfyUI's error panel
shows the exception) or a safe result, nothing half-written on disk; calibrations reproducible."""
import shutil
from pathlib import Path

import pytest
import torch

import folder_paths
from calibrated_samplers.nodes.calibration import CalibrateSampler, CalibrationSigmas
from calibrated_samplers.nodes.ksampler import CalibratedKSampler
from calibrated_samplers.nodes.methods import ALL, METHODS
from calibrated_samplers.nodes.samplers import node_for
from comfy_extras.nodes_custom_sampler import SamplerCustom
from tinymodels import gmm

CFG = 2.0


@pytest.fixture(autouse=True)
def folder(tmp_path, monkeypatch):
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "calibrations", ([str(tmp_path)], {".safetensors"}))
    return tmp_path


@pytest.fixture(scope="module", params=["eps", "flow"])
def model(request):
    return gmm.build_model(request.param)


def calibrate(model, steps=4, teacher_steps=60, batch=4, method="all", cfg=CFG, **options):
    return CalibrateSampler.execute(model, gmm.conditioning([3]), gmm.null_conditioning(),
                                    {"samples": torch.zeros(1, 4, 8, 8)}, 0, cfg, steps, teacher_steps, batch,
                                    method, **options).result[0]


def sampler_of(calibration, method):
    node = node_for(method)
    return node.execute(calibration, method if len(node.METHODS) > 1 else None).result[0]


def sample(model, calibration, method, batch=2, seed=10_000):
    return SamplerCustom.execute(model, True, seed, CFG, gmm.conditioning([3]), gmm.null_conditioning(),
                                 sampler_of(calibration, method), CalibrationSigmas.execute(calibration, method).result[0],
                                 {"samples": torch.zeros(batch, 4, 8, 8)}).result[0]["samples"]


@pytest.mark.parametrize("batch, steps", [(1, 4), (3, 1)], ids=["calibration batch 1", "steps 1"])
def test_degenerate_sizes_give_finite_samplers(model, batch, steps):
    """A one-noise calibration (rank-deficient least squares) and a one-step student: every method fits,
    stays finite and samples finite latents."""
    calibration = calibrate(model, steps=steps, batch=batch)
    for method in ALL:
        for tensor in calibration.fits[method].values():
            assert not tensor.is_floating_point() or torch.isfinite(tensor).all(), method
        assert torch.isfinite(sample(model, calibration, method)).all(), method


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("method", ["iia_ddim", "iia_heun", "olss", "timetuner"])
def test_non_finite_model_output_stores_nothing(model, folder, value, method):
    broken = model.clone()
    broken.set_model_sampler_post_cfg_function(lambda args: args["denoised"] * value)
    with pytest.raises(ValueError, match="NaN or inf"):
        calibrate(broken, method=method)
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize("options, message", [
    ({"method": "dpmpp_3m"}, "expected 'all' or one of"),
    ({"steps": 11, "teacher_steps": 20}, "too many for a 20-step teacher"),
    ({"method": "timetuner", "sampler_name": "euler_ancestral"}, "deterministic sampler"),
    ({"scheduler": "nonexistent"}, "scheduler 'nonexistent'"),
    ({"iia_substeps": 1, "method": "iia_ddim"}, "iia_substeps 1"),
    ({"iia_target": "fine", "method": "iia_ddim"}, "iia_target 'fine'"),
    ({"iia_target": "teacher", "method": "iia_heun", "steps": 11, "teacher_steps": 20}, "too many for a 20-step"),
    ({"steps": 0}, "steps 0: expected at least 1"),
    ({"scheduler": "ddim_uniform", "steps": 7}, "scheduler ddim_uniform gives 8 steps for steps 7"),
    ({"cfg": float("nan")}, "cfg nan: expected a finite number"),
    ({"cfg": float("inf")}, "cfg inf: expected a finite number"),
    ({"teacher_steps": 1}, "teacher_steps 1: expected at least 2"),
    ({"batch": 0}, "calibration_batch 0: expected at least 1"),
])
def test_bad_settings_are_refused_by_name(model, folder, options, message):
    calls = []
    counted = model.clone()
    counted.set_model_sampler_post_cfg_function(lambda args: calls.append(1) or args["denoised"])
    with pytest.raises(ValueError, match=message):
        calibrate(counted, **options)
    assert list(folder.iterdir()) == [] and calls == [], "refused before the first model call"


def test_settings_a_fit_depends_on_get_their_own_stored_calibration(model, folder):
    """OLSS tries the scheduler's sigmas, and IIA's target changes its fit: each is stored under its own key
    (a reused calibration for the other setting would be wrong); the OLSS-P fit does not depend on either."""
    for method, options in [("olss", {"scheduler": "karras"}), ("olss", {"scheduler": "beta"}),
                            ("iia_ddim", {"iia_target": "teacher"}), ("iia_ddim", {"iia_target": "substeps"})]:
        calibrate(model, method=method, **options)
    assert len(list(folder.iterdir())) == 4
    calibrate(model, method="olss_p", scheduler="karras")
    calibrate(model, method="olss_p", scheduler="beta")
    assert len(list(folder.iterdir())) == 5


def test_calibration_is_reproducible_from_its_seed(model):
    first = calibrate(model, method="all")
    again = calibrate(model, method="all", refit=True)
    for method in ALL:
        for name, tensor in first.fits[method].items():
            assert torch.equal(tensor, again.fits[method][name]), (method, name)


def test_ksampler_with_a_calibration_for_another_latent_size(model):
    calibration = calibrate(model, method="olss")
    latent = {"samples": torch.zeros(1, 4, 32, 32)}        # (4x the sides: beyond any measured borrow range)
    with pytest.raises(ValueError, match="latent shape"):
        CalibratedKSampler.execute(model=model, seed=1, steps=4, cfg=CFG, sampler_name="euler", scheduler="karras",
                                   positive=gmm.conditioning([3]), negative=gmm.null_conditioning(),
                                   latent_image=latent, denoise=1.0, method="olss", teacher_steps=60,
                                   calibration_batch=4, calibration=calibration)


def test_olss_from_an_all_calibration_ignores_the_scheduler(model):
    """OLSS brings its own sigmas: KSampler (Calibrated) takes it from a calibration made with another
    scheduler; IIA and TimeTuner keep the scheduler's sigmas and refuse another."""
    calibration = calibrate(model, method="all", scheduler="karras")
    common = dict(model=model, seed=1, steps=4, cfg=CFG, sampler_name="euler", scheduler="beta",
                  positive=gmm.conditioning([3]), negative=gmm.null_conditioning(),
                  latent_image={"samples": torch.zeros(1, 4, 8, 8)}, denoise=1.0, teacher_steps=60,
                  calibration_batch=4, calibration=calibration)
    out = CalibratedKSampler.execute(method="olss", **common).result[0]["samples"]
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="scheduler karras, not beta"):
        CalibratedKSampler.execute(method="iia_ddim", **common)


def _with_lora_patch(patcher):
    """A clone with a LoRA-like weight patch (ComfyUI applies it in place while the model is loaded)."""
    patched = patcher.clone()
    key = next(k for k in patched.model_state_dict() if k.startswith("diffusion_model.input_blocks.0.0.weight"))
    weight = patched.model_state_dict()[key]
    patched.add_patches({key: (torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)) * 0.05,)}, 1.0)
    return patched


def test_fingerprint_is_the_same_loaded_or_not():
    """ComfyUI patches LoRA weights into the shared model while it is loaded: the fingerprint hashes the
    original weights plus the patches, so it does not depend on what happens to be loaded."""
    import comfy.model_management
    from calibrated_samplers.nodes.fingerprint import model_fingerprint
    from tinymodels import digits

    unloaded = _with_lora_patch(digits.build_model("eps"))
    loaded = _with_lora_patch(digits.build_model("eps"))        # the same weights and patch, another instance
    comfy.model_management.load_models_gpu([loaded])
    try:
        assert loaded.backup, "the patch should be applied in place while loaded"
        assert model_fingerprint(loaded) == model_fingerprint(unloaded)
        plain = digits.build_model("eps")
        assert model_fingerprint(plain) != model_fingerprint(unloaded)      # the patch itself still counts
    finally:
        comfy.model_management.unload_all_models()


def test_a_calibration_of_a_lora_patched_model_samples():
    """Calibrated before the patched model is loaded, sampled while it is: the same model, no mismatch."""
    import comfy.model_management
    from tinymodels import digits

    comfy.model_management.unload_all_models()
    patched = _with_lora_patch(digits.build_model("eps"))
    empty = {"samples": torch.zeros(1, 4, 8, 8)}
    calibration = CalibrateSampler.execute(patched, digits.conditioning([3]), digits.null_conditioning(1), empty, 0,
                                           CFG, 2, 8, 2, "iia_ddim").result[0]
    try:
        out = SamplerCustom.execute(patched, True, 10_000, CFG, digits.conditioning([3]), digits.null_conditioning(1),
                                    node_for("iia_ddim").execute(calibration, "iia_ddim").result[0],
                                    CalibrationSigmas.execute(calibration, "iia_ddim").result[0], empty).result[0]
        assert torch.isfinite(out["samples"]).all()
    finally:
        comfy.model_management.unload_all_models()


def test_bad_numbers_and_guiders_are_refused_before_sampling(model):
    """With a calibration given, KSampler (Calibrated) and the sampler nodes check denoise, cfg and the guider
    before the first model call; a guider with two scales (DualCFGGuider) cannot be checked and is refused."""
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import DualCFGGuider, SamplerCustomAdvanced, RandomNoise
    calibration = calibrate(model, method="olss")
    calls = []
    counted = model.clone()
    counted.set_model_sampler_post_cfg_function(lambda args: calls.append(1) or args["denoised"])
    for options, message in [({"denoise": float("nan")}, "denoise nan"), ({"cfg": float("nan")}, "cfg nan")]:
        with pytest.raises(ValueError, match=message):
            CalibratedKSampler.execute(**{"model": counted, "seed": 1, "steps": 4, "cfg": CFG, "sampler_name": "euler",
                                          "scheduler": "karras", "positive": gmm.conditioning([3]),
                                          "negative": gmm.null_conditioning(),
                                          "latent_image": {"samples": torch.zeros(1, 4, 8, 8)}, "denoise": 1.0,
                                          "method": "olss", "teacher_steps": 60, "calibration_batch": 4,
                                          "calibration": calibration, **options})
    guider = DualCFGGuider.execute(counted, gmm.conditioning([3]), gmm.conditioning([4]), gmm.null_conditioning(),
                                   CFG, CFG, "regular").result[0]
    with pytest.raises(ValueError, match="Guider_DualCFG"):
        SamplerCustomAdvanced.execute(RandomNoise.execute(3).result[0], guider, sampler_of(calibration, "olss"),
                                      CalibrationSigmas.execute(calibration, "olss").result[0],
                                      {"samples": torch.zeros(1, 4, 8, 8)})
    assert calls == []


def test_stored_tensors_are_checked_against_their_method(model, folder):
    """A file whose per-method tensors were edited (and re-checksummed, as a careful hand would) is refused by
    name: NaN coefficients, a tensor of the wrong shape, a method this pack does not know."""
    from calibrated_samplers import calibration_cache as store
    from calibrated_samplers.nodes.calibration import LoadCalibration
    from safetensors import safe_open
    from safetensors.torch import save_file
    calibrate(model, method="all")
    path = next(folder.iterdir())
    with safe_open(str(path), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    edits = {"nan": ("olss.weights_d", lambda t: t * float("nan"), "olss.weights_d holds NaN"),
             "shape": ("iia_heun.coefficients", lambda t: t[:, :2], r"iia_heun.coefficients has shape \(4, 2\)"),
             "ratios": ("timetuner.ratios", lambda t: t[:3], r"timetuner.ratios has shape \(3,\)")}
    for label, (key, edit, message) in edits.items():
        edited = dict(tensors, **{key: edit(tensors[key]).contiguous()})
        meta = dict(metadata)
        meta[store.CHECKSUM_KEY] = store.checksum(edited, meta)
        save_file(edited, str(folder / f"edited_{label}.safetensors"), metadata=meta)
        with pytest.raises(ValueError, match=message):
            LoadCalibration.execute(f"edited_{label}.safetensors")
    with pytest.raises(ValueError, match="calibration_name must be a file name, not int"):
        LoadCalibration.execute(7)


def _counted(model):
    calls = []
    counted = model.clone()
    counted.set_model_sampler_post_cfg_function(lambda args: calls.append(1) or args["denoised"])
    return counted, calls


@pytest.mark.parametrize("damage", ["folder is a file", "folder cannot be written", "a folder where the file goes",
                                    "a link where the file goes", "disk full"])
def test_an_unusable_calibrations_folder_is_refused_before_the_teacher(model, folder, monkeypatch, damage):
    """The place a calibration will be written is checked before the first model call, and the message names it
    and the fix: no minutes of GPU lost to a write that cannot succeed."""
    import calibrated_samplers.nodes.store as node_store
    counted, calls = _counted(model)
    target = folder
    if damage == "folder is a file":
        target = folder / "calibrations"
        target.write_text("not a folder")
    elif damage == "folder cannot be written":
        target = Path("/sys/kernel/calibrated_samplers_test")      # read-only even for root
    elif damage == "disk full":
        usage = shutil.disk_usage(folder)._replace(free=4096)
        monkeypatch.setattr(node_store.shutil, "disk_usage", lambda path: usage)
    else:
        calibrate(counted, method="olss")                               # learn the file's name, then block it
        calls.clear()
        path = next(folder.iterdir())
        path.unlink()
        if damage == "a folder where the file goes":
            path.mkdir()
        else:
            path.symlink_to(folder / "elsewhere.safetensors")
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "calibrations", ([str(target)], {".safetensors"}))
    message = {"folder is a file": "is a file, not a folder", "folder cannot be written": "cannot be written",
               "a folder where the file goes": "is a folder, where this calibration's file goes",
               "a link where the file goes": "is a link, where this calibration's file goes",
               "disk full": "MiB free"}[damage]
    with pytest.raises(ValueError, match=message) as refused:
        calibrate(counted, method="olss", refit=True)
    assert calls == [] and str(target) in str(refused.value) and "extra_model_paths.yaml" in str(refused.value)


def test_a_write_that_fails_after_the_run_still_gives_the_calibration(model, folder, monkeypatch, caplog):
    """Checked up front, the write can still fail (the disk filled meanwhile): the workflow goes on with the fitted
    calibration, and the log and the calibration say it was not stored and why."""
    import calibrated_samplers.nodes.store as node_store

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(node_store.store, "save", full)
    calibration = calibrate(model, method="olss")
    assert "No space left" in calibration.diagnostics["not_stored"] and list(folder.iterdir()) == []
    assert "NOT stored" in caplog.text and torch.isfinite(sample(model, calibration, "olss")).all()


def test_a_calibration_too_big_for_memory_is_refused_up_front(model, folder):
    """A 2048-pixel-class latent (4x256x256) at calibration batch 64 and 4000 teacher steps needs about 1 TB for the
    teacher's trajectory: refused before the first model call, with the estimate, what is free and what to lower."""
    counted, calls = _counted(model)
    with pytest.raises(ValueError, match="GiB of host memory.*lower teacher_steps or calibration_batch"):
        CalibrateSampler.execute(counted, gmm.conditioning([3]), gmm.null_conditioning(),
                                 {"samples": torch.zeros(1, 4, 256, 256)}, 0, CFG, 5, 4000, 64, "olss")
    assert calls == [] and list(folder.iterdir()) == []
    from calibrated_samplers.nodes import memory
    from calibrated_samplers.nodes.request import Request
    small = memory.estimate(model, Request.from_inputs("all", seed=0, cfg=CFG, steps=5, teacher_steps=500,
                                                       calibration_batch=8), (4, 64, 64))
    assert 0.5 * 2 ** 30 < small["host"] < 1 * 2 ** 30        # SD1.5 at 512 pixels, the defaults: under 1 GiB


def test_validation_folds_see_the_conditioning_the_teacher_saw():
    """A conditioning of 2 prompts for 8 calibration noises is repeated to the batch as ComfyUI does: a fold of the
    even noises sees prompt 0 only, as the teacher did for those noises."""
    from calibrated_samplers.nodes.run import _rows_of
    prompts = gmm.conditioning([0, 1])
    fold = _rows_of(prompts, [0, 2, 4, 6], 8)
    assert torch.equal(fold[0][0], prompts[0][0][[0, 0, 0, 0]])
    assert torch.equal(_rows_of(prompts, [1, 3], 8)[0][0], prompts[0][0][[1, 1]])
    single = gmm.conditioning([3])
    assert _rows_of(single, [0, 2], 8)[0][0] is single[0][0]


def test_all_leaves_out_a_method_that_does_not_apply(model):
    """A scheduler that starts below sigma_max leaves TimeTuner out of `all`; asked for alone, TimeTuner is refused
    by name."""
    calibration = calibrate(model, method="all", scheduler="ddim_uniform", steps=3)
    assert "timetuner" not in calibration.methods and "olss" in calibration.methods
    with pytest.raises(ValueError, match="below the model's"):
        calibrate(model, method="timetuner", scheduler="ddim_uniform", steps=3)
