"""Every calibration is made and judged in the model's own space, whatever the checkpoint's latent format.

The same closed-form model is built like a real checkpoint (SD1.5, SD2, SDXL, SD3, Flux: their model
config, model_sampling and latent format as ComfyUI defines them) and as its twin whose latent format is
the identity. ComfyUI hands a sampler the model's own space and returns LATENT space (SD1.5 divides by
0.18215, SD3 and Flux also shift), so the two models give the same calibration, and LATENT outputs that
differ exactly by the format's `process_latent_out`, only if nothing in the pack compares a LATENT with a
model-space state. Every number a calibration stores is compared: the OLSS candidates' scores and the
refit choice, every fitted tensor, the report's calibration-batch errors; then every method samples
held-out noise in SamplerCustom and through KSampler (Calibrated).
"""
import pytest
import torch

import comfy.samplers
import folder_paths
from calibrated_samplers.nodes.calibration import CalibrateSampler, CalibrationSigmas
from calibrated_samplers.nodes.ksampler import CalibratedKSampler
from calibrated_samplers.nodes.methods import ALL, METHODS
from calibrated_samplers.nodes.samplers import node_for
from comfy_extras.nodes_custom_sampler import SamplerCustom
from tinymodels import gmm

CFG = 7.0            # high guidance, as users run SD1.5
STEPS = 4
TIMING = ("fit_seconds", "teacher_seconds")


@pytest.fixture(autouse=True)
def calibration_folder(tmp_path, monkeypatch):
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "calibrations", ([str(tmp_path)], {".safetensors"}))
    return tmp_path


def _empty(model, batch):
    return {"samples": torch.zeros(batch, model.model.latent_format.latent_channels, 8, 8)}


def _calibrate(model, sampler_name, method="all"):
    return CalibrateSampler.execute(model, gmm.conditioning([3]), gmm.null_conditioning(), _empty(model, 1), 0, CFG,
                                    STEPS, 60, 4, method, "karras", sampler_name, refit=True).result


def _leaves(value, path=""):
    """{path: leaf} of nested diagnostics, without the timings."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() if key not in TIMING
                for k, v in _leaves(item, f"{path}/{key}").items()}
    if isinstance(value, (list, tuple)):
        return {k: v for i, item in enumerate(value) for k, v in _leaves(item, f"{path}[{i}]").items()}
    return {path: value}


def _method_sampler(calibration, method):
    node = node_for(method)
    return node.execute(calibration, method if len(node.METHODS) > 1 else None).result[0]


def _sample(model, calibration, method):
    latent = _empty(model, 3)
    return SamplerCustom.execute(model, True, 10_000, CFG, gmm.conditioning([3]), gmm.null_conditioning(),
                                 _method_sampler(calibration, method), CalibrationSigmas.execute(calibration, method)
                                 .result[0], latent).result[0]["samples"]


@pytest.fixture(scope="module", params=sorted(gmm.CHECKPOINTS))
def twins(request):
    """(checkpoint name, model in the checkpoint's latent format, the same model with latent format scale 1)."""
    return request.param, gmm.build_like(request.param), gmm.build_like(request.param, scale_one=True)


@pytest.mark.parametrize("method", ["all", "time_steps"])
def test_a_calibration_is_the_same_in_every_latent_format(twins, method):
    name, real, identity = twins
    fmt = real.model.latent_format
    assert fmt.scale_factor != 1 and identity.model.latent_format.scale_factor == 1
    sampler_name = "uni_pc" if name == "sd15" else "dpmpp_2m"
    ours, teacher_ours, _ = _calibrate(real, sampler_name, method)
    theirs, teacher_theirs, _ = _calibrate(identity, sampler_name, method)
    assert ours.methods == (sorted(ALL) if method == "all" else [method])
    assert set(ALL) | {"time_steps"} == set(METHODS)
    # the choices and every score: OLSS's candidates (teacher fit and cross-validated refit), the refit kept or
    # not, the per-step errors, the report's calibration-batch errors of every method and built-in
    ours_leaves, theirs_leaves = _leaves(ours.diagnostics), _leaves(theirs.diagnostics)
    assert ours_leaves.keys() == theirs_leaves.keys()
    for path, value in ours_leaves.items():
        if isinstance(value, float):
            assert value == pytest.approx(theirs_leaves[path], rel=1e-5, abs=1e-9), path
        else:
            assert value == theirs_leaves[path], path
    for method in ours.methods:
        for key, tensor in ours.fits[method].items():
            torch.testing.assert_close(tensor, theirs.fits[method][key], rtol=1e-5, atol=1e-7, msg=f"{method}.{key}")
    torch.testing.assert_close(teacher_ours["samples"], fmt.process_out(teacher_theirs["samples"]))
    # the model's own space is where the data are: unit scale, whatever the format makes of LATENT
    assert 0.5 < float(real.model.process_latent_in(teacher_ours["samples"]).std()) < 2
    for method in ours.methods:
        x = _sample(real, ours, method)
        torch.testing.assert_close(x, fmt.process_out(_sample(identity, theirs, method)), rtol=1e-4, atol=1e-5,
                                   msg=method)


def _ksampler(model, method):
    return CalibratedKSampler.execute(model=model, seed=5, steps=STEPS, cfg=CFG, sampler_name="euler",
                                      scheduler="karras", positive=gmm.conditioning([3]),
                                      negative=gmm.null_conditioning(), latent_image=_empty(model, 2), denoise=1.0,
                                      method=method, teacher_steps=60, calibration_batch=4).result[0]["samples"]


@pytest.mark.parametrize("method", ["olss", "iia_ddim"])
def test_calibrated_ksampler_gives_the_latent_of_the_format(twins, method):
    _, real, identity = twins
    expected = real.model.latent_format.process_out(_ksampler(identity, method))
    torch.testing.assert_close(_ksampler(real, method), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("base", ["uni_pc", "uni_pc_bh2"])
def test_timetuner_on_uni_pc_keeps_its_sigmas_ending_in_zero(base, calibration_folder):
    """ComfyUI's uni_pc writes 0.001 into the last sigma it is given, in place: no stored tensor reaches it."""
    model = gmm.build_like("sd15")
    calibration, _, sigmas = CalibrateSampler.execute(
        model, gmm.conditioning([3]), gmm.null_conditioning(), _empty(model, 1), 0, CFG, STEPS, 60, 4, "timetuner",
        "karras", base).result
    assert float(calibration.fits["timetuner"]["sigmas"][-1]) == 0 and float(sigmas[-1]) == 0
    for _ in range(2):
        x = _sample(model, calibration, "timetuner")
        assert torch.isfinite(x).all()
        assert float(calibration.fits["timetuner"]["sigmas"][-1]) == 0
        assert float(CalibrationSigmas.execute(calibration, "timetuner").result[0][-1]) == 0
    from calibrated_samplers import calibration_cache as store
    stored = store.load(next(calibration_folder.iterdir()))
    assert float(stored.fits["timetuner"]["sigmas"][-1]) == 0
