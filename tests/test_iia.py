"""IIA (Zhang, Niwa, Kleijn): the three samplers and their step-by-step fits, on the closed-form mixture
models run through real ComfyUI sampling."""
import pytest
import torch

import comfy.sample
import comfy.samplers
from calibrated_samplers.optimizers import iia
from calibrated_samplers.optimizers.coordinates import NoiseSchedule
from calibrated_samplers.nodes.methods import METHODS
from calibrated_samplers.optimizers.teacher import Trajectory, rmse, sample_teacher, teacher_sigmas
from tinymodels import gmm

CFG = 2.0
FAMILIES = ["eps", "v_prediction", "flow"]


@pytest.fixture(scope="module", params=FAMILIES)
def case(request):
    model = gmm.build_model(request.param)
    return model, NoiseSchedule.from_model_sampling(model.get_model_object("model_sampling"))


def _noise(batch, seed):
    return torch.randn(batch, *gmm.LATENT_SHAPE, generator=torch.Generator().manual_seed(seed))


def _run(model, sampler, sigmas, noise):
    labels = torch.arange(len(noise)) % 10
    return comfy.sample.sample_custom(model, noise, CFG, sampler, sigmas, gmm.conditioning(labels),
                                      gmm.null_conditioning(len(noise)), torch.zeros_like(noise),
                                      disable_pbar=True, seed=0)


def _iia(schedule, variant, **options):
    return comfy.samplers.KSAMPLER(iia.sample_iia, extra_options={"schedule": schedule, "variant": variant,
                                                                   **options})


def _sigmas(model, steps, scheduler="karras"):
    return comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps)


@pytest.mark.parametrize("variant, builtin", [("iia_ddim", "ddim"), ("biia_heun", "heun"), ("iia_heun", "heun")])
def test_plain_coefficients_reproduce_comfy(case, variant, builtin):
    model, schedule = case
    sigmas = _sigmas(model, 5)
    noise = _noise(3, 1)
    want = _run(model, comfy.samplers.sampler_object(builtin), sigmas, noise)
    got = _run(model, _iia(schedule, variant, coefficients=iia.plain_coefficients(variant, sigmas)), sigmas, noise)
    assert torch.equal(got, want)


@pytest.mark.parametrize("variant", iia.VARIANTS)
def test_fit_lowers_error_at_every_step(case, variant):
    model, schedule = case
    steps = 4 if variant == "iia_ddim" else 3
    sigmas = _sigmas(model, steps)
    noise = _noise(8, 2)
    fit = iia.IIAFit(m=3)
    fitted_run = _run(model, _iia(schedule, variant, fit=fit), sigmas, noise)
    assert len(fit.coefficients) == steps
    fitted = [e for e in fit.fit_error if e is not None]
    plain = [e for e in fit.plain_error if e is not None]
    assert len(fitted) == (steps - 1 if variant == "iia_ddim" else steps)
    for before, after in zip(plain, fitted):
        assert after <= before * (1 + 1e-6) + 1e-6     # float32 rounding of the applied step
    assert sum(fitted) < sum(plain)
    # calls: the coarse run, plus each fitted step's fine path less its first evaluation (shared)
    m = 3
    if variant == "iia_ddim":
        expected = steps + (steps - 1) * (m - 1)
    else:                     # Heun: two per step, one at the last (to 0, Euler); so do the fine paths
        expected = (2 * steps - 1) + (steps - 1) * (2 * m - 1) + (2 * m - 2)
    assert fit.evaluations == expected

    # the stored coefficients replay the fitted run exactly
    coefficients = torch.stack(fit.coefficients)
    replay = _run(model, _iia(schedule, variant, coefficients=coefficients), sigmas, noise)
    assert torch.allclose(replay, fitted_run, atol=1e-5)


def test_fine_sigmas():
    assert iia.fine_sigmas(4.0, 1.0, 2, 0.03) == pytest.approx([4.0, 2.0, 1.0])
    grid = iia.fine_sigmas(1.0, 0.0, 3, 0.01)
    assert grid == pytest.approx([1.0, 0.1, 0.01, 0.0])
    assert iia.fine_sigmas(0.02, 0.0, 3, 0.03) == [0.02, 0.0]


def test_rank_deficient_batch_falls_back_safely(case):
    """Batch 1 and a flat latent: the fit stays finite and never worse than plain."""
    model, schedule = case
    sigmas = _sigmas(model, 3)
    fit = iia.IIAFit()
    out = _run(model, _iia(schedule, "iia_heun", fit=fit, r=2), sigmas, _noise(1, 3))
    assert torch.isfinite(out).all() and torch.isfinite(torch.stack(fit.coefficients)).all()
    assert torch.stack(fit.coefficients).shape == (3, 4)


def test_wrong_coefficients_refused(case):
    model, schedule = case
    sigmas = _sigmas(model, 3)
    with pytest.raises(ValueError, match="do not fit"):
        _run(model, _iia(schedule, "iia_ddim", coefficients=torch.zeros(5, 2)), sigmas, _noise(1, 0))


@pytest.mark.parametrize("variant", iia.VARIANTS)
def test_fit_to_the_teacher_lowers_every_step_and_the_final_error(case, variant):
    """iia_target 'teacher': each step fitted to the teacher's state at its next sigma, with no evaluations
    besides the run itself; every step's error from the same state and the final error drop below plain."""
    model, schedule = case
    steps = 4 if variant == "iia_ddim" else 3
    sigmas = _sigmas(model, steps)
    noise = _noise(8, 2)
    trajectory = Trajectory(teacher_sigmas(schedule, 120))
    _run(model, comfy.samplers.KSAMPLER(sample_teacher, extra_options={"schedule": schedule,
                                                                       "trajectory": trajectory}),
         trajectory.sigmas, noise)
    fit = iia.IIAFit(targets=[trajectory.state_at(schedule, s) for s in sigmas[1:].tolist()])
    fitted = _run(model, _iia(schedule, variant, fit=fit), sigmas, noise)
    assert fit.evaluations == METHODS[variant].evaluations(steps, {})
    pairs = [(p, f) for p, f in zip(fit.plain_error, fit.fit_error) if f is not None]
    assert len(pairs) == (steps - 1 if variant == "iia_ddim" else steps)
    assert all(after <= before * (1 + 1e-6) + 1e-6 for before, after in pairs)
    plain = _run(model, comfy.samplers.sampler_object("ddim" if variant == "iia_ddim" else "heun"), sigmas, noise)
    rmse = [float((x.double() - trajectory.final.double()).pow(2).mean().sqrt()) for x in (fitted, plain)]
    assert rmse[0] < rmse[1], rmse


def test_the_ridge_keeps_a_fit_on_sharp_data_from_wrecking_unseen_noises(tmp_path, monkeypatch):
    """On sharp data near sigma 0, a term that barely moves on the calibration noises once took a coefficient of -25
    (ridge 1e-9) and sent unseen noises to other mixture components: IIA-DDIM fitted on 8 noises must stay below
    its own plain DDIM on 64 new seeds of the same prompts (closed-form SD1.5-like model, 7 steps, exponential)."""
    import folder_paths
    from calibrated_samplers.nodes.calibration import CalibrateSampler, CalibrationSigmas
    from calibrated_samplers.nodes.samplers import node_for
    from comfy_extras.nodes_custom_sampler import SamplerCustom
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "calibrations", ([str(tmp_path)], {".safetensors"}))
    model = gmm.build_like("sd15")
    schedule = NoiseSchedule.from_model_sampling(model.get_model_object("model_sampling"))
    calibration = CalibrateSampler.execute(model, gmm.conditioning(torch.arange(8)), gmm.null_conditioning(8),
                                           {"samples": torch.zeros(1, 4, 8, 8)}, 0, 3.0, 7, 500, 8, "iia_ddim",
                                           "exponential", iia_target="teacher").result[0]
    labels = torch.arange(64) % 8
    latent = {"samples": torch.zeros(64, 4, 8, 8)}

    def sample(sampler, sigmas):
        return SamplerCustom.execute(model, True, 10_000, 3.0, gmm.conditioning(labels), gmm.null_conditioning(64),
                                     sampler, sigmas, latent).result[0]["samples"]

    sigmas = CalibrationSigmas.execute(calibration, "iia_ddim").result[0]
    teacher = sample(comfy.samplers.KSAMPLER(sample_teacher, extra_options={"schedule": schedule}),
                     teacher_sigmas(schedule, 500))
    fitted = rmse(sample(node_for("iia_ddim").execute(calibration, "iia_ddim").result[0], sigmas.clone()), teacher)
    plain = rmse(sample(comfy.samplers.sampler_object("ddim"), sigmas.clone()), teacher)
    assert fitted < plain, (fitted, plain)
