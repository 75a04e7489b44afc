"""CalibrateSampler, the cache, the sampler nodes, CalibrationSigmas, LoadCalibration and CalibratedKSampler,
executed as ComfyUI executes them, on the closed-form models."""
import dataclasses
import math

import pytest
import torch

import comfy.samplers
import folder_paths
from calibrated_samplers.nodes.calibration import CalibrateSampler, CalibrationSigmas, LoadCalibration
from calibrated_samplers.nodes.ksampler import CalibratedKSampler
from calibrated_samplers.nodes.report import CalibrationReport
from calibrated_samplers.nodes.samplers import node_for
from calibrated_samplers.optimizers.calibration import CalibrationMismatch
from calibrated_samplers.optimizers.coordinates import NoiseSchedule
from comfy_extras.nodes_custom_sampler import SamplerCustom
from calibrated_samplers.nodes.builtins import ONE_EVALUATION, schedules
from calibrated_samplers.nodes.validation import SCREEN_KEEP
from calibrated_samplers.nodes.methods import ALL, METHODS
from calibrated_samplers.nodes.methods.olss import HOPELESS
from calibrated_samplers.nodes.run import FirstCalls
from tinymodels import gmm

CFG = 2.0
EMPTY = {"samples": torch.zeros(1, 4, 8, 8)}


@pytest.fixture(autouse=True)
def calibration_folder(tmp_path, monkeypatch):
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "calibrations", ([str(tmp_path)], {".safetensors"}))
    return tmp_path


def _count(calls):
    def post_cfg(args):
        calls.append(args["denoised"].shape[0])             # (the rows of the call)
        return args["denoised"]
    return post_cfg


def _calibrate(model, steps=4, teacher_steps=120, batch=6, method="all", cfg=CFG, scheduler="karras", **options):
    return CalibrateSampler.execute(model, gmm.conditioning([3]), gmm.null_conditioning(), EMPTY, 0, cfg, steps,
                                    teacher_steps, batch, method, scheduler=scheduler, **options).result


def _sample(model, sampler, sigmas, seed=10_000, batch=4, cfg=CFG):
    latent = {"samples": torch.zeros(batch, 4, 8, 8)}
    return SamplerCustom.execute(model, True, seed, cfg, gmm.conditioning([3]), gmm.null_conditioning(), sampler,
                                 sigmas, latent).result[0]["samples"]


@pytest.fixture(scope="module", params=["eps", "flow"])
def model(request):
    return gmm.build_model(request.param)


def test_calibrate_stores_and_reuses(model, calibration_folder):
    calls = []
    counted = model.clone()
    counted.set_model_sampler_post_cfg_function(_count(calls))
    calibration, teacher_latent, sigmas = _calibrate(counted)
    assert calibration.methods == sorted(ALL) and calibration.steps == 4
    # every model call is accounted for, in calls on the whole batch of 6 (a call on half of it counts a half): the
    # teacher's; the built-ins' (every one-evaluation sampler on every scheduler giving 4 steps on one noise, then
    # the SCREEN_KEEP best on the other 5); each method's fit and validation. A noise's first call at a sigma is made
    # once (the teacher's at sigma_max): a run of 4 steps that starts there makes 3
    d = calibration.diagnostics
    assert sum(calls) / 6 == pytest.approx(d["calls"])
    assert d["calls"] == pytest.approx(d["teacher"]["evaluations"] + d["builtins_evaluations"]
                                       + sum(d[m]["calls"] for m in ALL))
    assert d["teacher"]["evaluations"] == 120
    ms = model.get_model_object("model_sampling")
    top = float(ms.sigma_max)

    def starts(schedules):          # the starts other than the teacher's (ddim_uniform's, ...)
        found = {float(sigmas[0].float()) for sigmas in schedules}
        return len({start for start in found if abs(start - top) > FirstCalls.RTOL * top})
    runs = {f"{name} / {scheduler}": sigmas for name in ONE_EVALUATION
            for scheduler, sigmas in schedules(ms, 4, name).items()}
    kept = [runs[label] for label in set(d["calibration_batch"]) - set(ALL)]
    assert starts(runs.values()) >= 1
    # the samplers on the same sigmas run side by side (`lockstep`), where a call two of them ask for alike (the same
    # x and sigma: the second of those whose first step is the same arithmetic, euler's) is made once
    alike = lambda chosen: len(chosen) - len({tuple(sigmas.float().tolist()) for sigmas in chosen})  # noqa: E731
    one_by_one = (3 * len(runs) + starts(runs.values()) + 5 * (3 * len(kept) + starts(kept))) / 6
    assert one_by_one - (alike(list(runs.values())) + 5 * alike(kept)) / 6 <= d["builtins_evaluations"] < one_by_one
    # OLSS: per candidate schedule the teacher fit of each half sampled on the other half (one run in all) and,
    # unless the teacher fit is hopeless, the re-solve on each half (a run each), then the chosen re-solve on the
    # batch; validation adds only its plain solver (OLSS judged itself on the same folds). DDIM on karras (the karras
    # candidate's teacher fit, fitted on nothing, and the plain solver of OLSS on it and of IIA-DDIM) runs once, not
    # at all where the screen ran euler on karras on the whole batch. OLSS-P's one schedule is OLSS's uniform path,
    # judged already: it runs at most its re-solve and plain solver where OLSS kept another. IIA: its fit, its plain
    # solver (Heun for both Heun forms: run once), and on each half a fit and a run on the other half
    olss_fit = d["olss"]
    ddim_screened = "euler / karras" in d["validated"]
    resolved = {label for label, forms in olss_fit["candidate_rmse"].items() if "re-solved, cross-validated" in forms}
    teacher_fits = {label: forms["teacher fit, cross-validated"] for label, forms in olss_fit["candidate_rmse"].items()}
    assert resolved == {label for label, error in teacher_fits.items()
                        if label == "karras sigmas" or error <= HOPELESS * min(teacher_fits.values())}
    assert olss_fit["evaluations"] == 3 * (3 - ddim_screened + 2 * len(resolved) + olss_fit["resolved"])
    assert olss_fit["calls"] == olss_fit["evaluations"] + 3 * (olss_fit["schedule"] != "karras sigmas")
    assert d["olss_p"]["calls"] <= 2 * 3
    assert d["olss_p"]["candidate_rmse"]["uniform path"] == olss_fit["candidate_rmse"]["uniform path"]
    assert d["iia_ddim"]["evaluations"] == 3 and d["iia_ddim"]["calls"] == 3 * 3
    assert d["biia_heun"]["calls"] == pytest.approx(4 * 6) and d["iia_heun"]["calls"] == pytest.approx(3 * 6)
    assert d["iia_heun"]["validation"]["plain_rmse"] == d["biia_heun"]["validation"]["plain_rmse"]
    # (the errors on the batch take no run: a fit with no run of its own on the batch, an OLSS teacher fit kept as it
    # is, is left out of them)
    missing = {m for m in ALL if "rmse" not in d[m] and d[m]["validation"]["kept"] == "fit"}
    assert missing <= {"olss", "olss_p"} and not missing & set(d["calibration_batch"])
    assert teacher_latent["samples"].shape == (6, 4, 8, 8)
    builtins = set(calibration.diagnostics["calibration_batch"]) - set(ALL)
    assert len(builtins) == SCREEN_KEEP and builtins <= set(calibration.diagnostics["validated"])
    assert torch.equal(sigmas, calibration.fits["olss"]["sigmas"]) and len(sigmas) == 5
    # OLSS keeps the candidate (schedule, teacher fit or re-solve) that validated best on the folds, and that
    # error is its validated one
    scores = olss_fit["candidate_rmse"]
    assert set(scores) == {"searched path", "uniform path", "karras sigmas"}
    form = "re-solved, cross-validated" if olss_fit["resolved"] else "teacher fit, cross-validated"
    chosen = scores[olss_fit["schedule"]][form]
    assert chosen == min(v for s in scores.values() for v in s.values()) == olss_fit["validation"]["rmse"]
    for m in ALL:              # a fit that validates worse than its plain solver is stored as the plain solver
        check = calibration.diagnostics[m]["validation"]
        assert check["kept"] == ("fit" if check["rmse"] <= check["plain_rmse"] else "plain")
        if check["kept"] == "plain":
            schedule = NoiseSchedule.from_model_sampling(model.get_model_object("model_sampling"))
            plain = METHODS[m].plain_tensors(calibration.fits[m], calibration.settings, schedule)
            for key, tensor in plain.items():
                torch.testing.assert_close(calibration.fits[m][key].double(), tensor.double())
    assert len(list(calibration_folder.iterdir())) == 1
    made = len(calls)
    again, _, sigmas_again = _calibrate(counted)
    assert len(calls) == made, "a matching stored calibration must be reused, not recomputed"
    assert again.key() == calibration.key() and torch.equal(sigmas, sigmas_again)
    _calibrate(counted, refit=True)
    assert len(calls) == 2 * made


def test_iia_fitted_to_substeps_runs_no_teacher(model):
    calls = []
    counted = model.clone()
    counted.set_model_sampler_post_cfg_function(_count(calls))
    calibration, teacher_latent, sigmas = _calibrate(counted, method="iia_heun", teacher_steps=20,
                                                     iia_target="substeps")
    assert len(calls) == calibration.diagnostics["iia_heun"]["evaluations"]
    assert "teacher_seconds" not in calibration.diagnostics and torch.equal(teacher_latent["samples"], EMPTY["samples"])
    ms = model.get_model_object("model_sampling")
    torch.testing.assert_close(sigmas, comfy.samplers.calculate_sigmas(ms, "karras", 4).float())


def test_iia_fitted_to_substeps_beside_a_teacher_tries_schedulers_and_validates(model):
    """With method all and scheduler auto, IIA fitted to its sub-steps (not to the teacher) is still judged against
    the teacher the other methods made: each scheduler try's sample on the batch, then validation of the one kept."""
    calibration = _calibrate(model, method="all", scheduler="auto", iia_target="substeps", teacher_steps=60)[0]
    facts = calibration.diagnostics["iia_ddim"]
    assert facts["target"] == "substeps" and len(facts["schedulers_tried"]) == 2
    assert facts["scheduler"] == min(facts["schedulers_tried"], key=facts["schedulers_tried"].get)
    assert facts["validation"]["kept_rmse"] <= facts["validation"]["plain_rmse"]
    assert calibration.diagnostics["calibration_batch"]["iia_ddim"]["rmse"] == facts["rmse"] \
        or facts["validation"]["kept"] == "plain"


def test_olss_beats_the_builtin_at_the_same_nfe_on_held_out_noise(model):
    calibration = _calibrate(model, steps=5, teacher_steps=200, batch=8)[0]
    teacher = _sample(model, comfy.samplers.sampler_object("dpmpp_2m"),
                      comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "karras", 200))
    builtin = _sample(model, comfy.samplers.sampler_object("dpmpp_2m"),
                      comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "karras", 5))
    sampler = node_for("olss").execute(calibration, "olss").result[0]
    sigmas = CalibrationSigmas.execute(calibration, "olss").result[0]
    ours = _sample(model, sampler, sigmas)
    assert (ours - teacher).pow(2).mean() < 0.5 * (builtin - teacher).pow(2).mean()


def test_a_calibration_refuses_what_it_was_not_fitted_for(model):
    calibration = _calibrate(model)[0]
    sampler = node_for("olss").execute(calibration, "olss").result[0]
    sigmas = CalibrationSigmas.execute(calibration, "olss").result[0]
    other = gmm.build_model("v_prediction" if calibration.family == "flow" else "flow")
    with pytest.raises(CalibrationMismatch, match="family"):
        _sample(other, sampler, CalibrationSigmas.execute(calibration, "olss").result[0])
    patched = model.clone()
    patched.add_object_patch("model_sampling", type(model.get_model_object("model_sampling"))(
        type("Config", (), {"sampling_settings": {"shift": 2.0, "multiplier": 1000, "linear_start": 0.0012}})()))
    with pytest.raises(CalibrationMismatch, match="model"):
        _sample(patched, sampler, sigmas)
    with pytest.raises(CalibrationMismatch, match="cfg"):
        _sample(model, sampler, sigmas, cfg=4.0)
    with pytest.raises(ValueError, match="fitted for the 4-step sigmas"):
        _sample(model, sampler, comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "karras", 4))


@pytest.mark.parametrize("bad, message", [
    ({"steps": 70, "teacher_steps": 120}, "too many"),
    ({"sigmas": torch.tensor([0.9, 0.5, 0.0])}, "2 steps given"),
    ({"sigmas": torch.tensor([20.0, 0.5, 0.2, 0.1, 0.0])}, "above the model"),
    ({"sigmas": torch.tensor([1.0, 3.0, 0.5, 0.1, 0.0])}, "decrease"),
])
def test_bad_requests_are_refused_with_the_input_named(model, bad, message, calibration_folder):
    with pytest.raises(ValueError, match=message):
        _calibrate(model, **bad)
    assert list(calibration_folder.iterdir()) == []


def test_nan_from_the_model_stores_nothing(model, calibration_folder):
    broken = model.clone()
    broken.set_model_sampler_post_cfg_function(lambda args: args["denoised"] * float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        _calibrate(broken)
    assert list(calibration_folder.iterdir()) == []


def test_fixed_sigmas_keep_the_schedule(model):
    ms = model.get_model_object("model_sampling")
    given = comfy.samplers.calculate_sigmas(ms, "karras", 4)
    calibration, _, sigmas = _calibrate(model, sigmas=given, method="olss")
    torch.testing.assert_close(sigmas, given.float(), rtol=1e-5, atol=1e-6)
    assert torch.isfinite(_sample(model, node_for("olss").execute(calibration, "olss").result[0], sigmas)).all()


def test_load_calibration_lists_the_store(model, calibration_folder):
    calibration = _calibrate(model)[0]
    names = folder_paths.get_filename_list("calibrations")
    assert len(names) == 1 and calibration.family in names[0]
    loaded = LoadCalibration.execute(names[0]).result[0]
    assert loaded.key() == calibration.key()


def _ksampler(model, method, steps=4, denoise=1.0, calibration=None, sampler_name="euler", scheduler="karras"):
    latent = {"samples": torch.zeros(2, 4, 8, 8)}
    return CalibratedKSampler.execute(model=model, seed=5, steps=steps, cfg=CFG, sampler_name=sampler_name,
                                      scheduler=scheduler, positive=gmm.conditioning([3]),
                                      negative=gmm.null_conditioning(), latent_image=latent, denoise=denoise,
                                      method=method, teacher_steps=120, calibration_batch=6,
                                      calibration=calibration).result[0]["samples"]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_calibrated_ksampler_is_a_drop_in(model, calibration_folder, method):
    out = _ksampler(model, method)
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()
    assert len(list(calibration_folder.iterdir())) == 1
    assert torch.equal(_ksampler(model, method), out), "same seed and calibration: the same latent"
    assert len(list(calibration_folder.iterdir())) == 1


def test_calibrated_ksampler_refusals(model):
    calibration = _calibrate(model, method="timetuner")[0]
    with pytest.raises(CalibrationMismatch, match="steps"):
        _ksampler(model, "timetuner", steps=6, calibration=calibration)
    with pytest.raises(CalibrationMismatch, match="sampler_name"):
        _ksampler(model, "timetuner", calibration=calibration, sampler_name="heun")
    with pytest.raises(CalibrationMismatch, match="scheduler"):
        _ksampler(model, "timetuner", calibration=calibration, scheduler="beta")
    with pytest.raises(ValueError, match="holds timetuner, not olss"):
        _ksampler(model, "olss", calibration=calibration)


@pytest.mark.parametrize("node, variant", [(node_for("iia_ddim"), "iia_ddim"), (node_for("biia_heun"), "biia_heun"),
                                           (node_for("iia_heun"), "iia_heun"), (node_for("timetuner"), None)])
def test_sampler_nodes_sample_their_calibration(model, node, variant):
    method = variant or "timetuner"
    calibration = _calibrate(model, method=method, sampler_name="dpmpp_2m")[0]
    sampler = node.execute(calibration, variant).result[0] if variant else node.execute(calibration).result[0]
    sigmas = CalibrationSigmas.execute(calibration, method).result[0]
    out = _sample(model, sampler, sigmas)
    assert out.shape == (4, 4, 8, 8) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="fitted for the 4-step sigmas"):
        _sample(model, sampler, comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "beta", 4))
    if variant is None:       # another base sampler can be wrapped; a non-KSAMPLER cannot
        other = node_for("timetuner").execute(calibration, sampler=comfy.samplers.sampler_object("euler")).result[0]
        assert not torch.equal(_sample(model, other, sigmas), out)
        with pytest.raises(ValueError, match="KSAMPLER"):
            _sample(model, node_for("timetuner").execute(calibration, sampler=object()).result[0], sigmas)


def test_report_draws_every_panel(model):
    """Each method has its colour in every panel (its sigmas, its per-step error, its bar against the teacher), the
    built-ins have grey bars, and the bars' lengths follow the stored errors."""
    from calibrated_samplers.nodes.report import COLORS, GREY, MARGIN, PANEL

    def pixels_of(image, color, rows):
        rgb = torch.tensor([int(color[i:i + 2], 16) for i in (1, 3, 5)], dtype=torch.float32) / 255
        return (image[0, rows].sub(rgb).abs().amax(-1) < 1e-3).nonzero()

    calibration = _calibrate(model, method="all")[0]
    image = CalibrationReport.execute(calibration).result[0]
    assert image.ndim == 4 and image.shape[0] == 1 and image.shape[-1] == 3
    assert image.shape[1] == 3 * PANEL + 40
    errors = calibration.diagnostics["validated"]
    bar_rows = slice(2 * PANEL, 3 * PANEL)
    lengths = {}
    for i, method in enumerate(calibration.methods):
        color = COLORS[i % len(COLORS)]
        for rows in (slice(0, PANEL), slice(PANEL, 2 * PANEL), bar_rows):
            assert len(pixels_of(image, color, rows)) > 10, (method, rows)
        found = pixels_of(image, color, bar_rows)
        lengths[method] = int(found[:, 1].max() - found[:, 1].min())
    assert len(pixels_of(image, GREY, bar_rows)) > 100
    longest = max(lengths, key=lengths.get)
    assert errors[longest]["rmse"] == max(errors[m]["rmse"] for m in lengths)
    shortest = min(lengths, key=lengths.get)
    assert errors[shortest]["rmse"] == min(errors[m]["rmse"] for m in lengths)
    without_teacher = _calibrate(model, method="iia_ddim", iia_target="substeps")[0]
    short = CalibrationReport.execute(without_teacher).result[0]
    assert short.shape[1] < image.shape[1]


def test_auto_samples_with_what_validated_best(model, calibration_folder):
    """KSampler (Calibrated) `auto` calibrates every method that samples within its steps' model evaluations (the
    Heun forms, 7 at 4 steps, are not fitted) but TimeTuner (asked for by name only) and samples with the lowest
    validated error among the fits and the built-ins."""
    from calibrated_samplers.nodes.validation import choose
    out = _ksampler(model, "auto")
    calibration = LoadCalibration.execute(folder_paths.get_filename_list("calibrations")[0]).result[0]
    validated = calibration.diagnostics["validated"]
    label = choose(validated, 4)
    assert validated[label]["rmse"] == min(v["rmse"] for v in validated.values() if v["evaluations"] <= 4)
    assert calibration.methods == sorted(m for m in ALL if m not in ("biia_heun", "iia_heun", "timetuner"))
    assert all(v["evaluations"] <= 4 for v in validated.values())
    assert validated[label]["rmse"] <= min(v["rmse"] for v in validated.values() if "sampler" in v)
    entry = validated[label]
    if "method" in entry:
        expected = _ksampler(model, entry["method"])
    else:
        latent = {"samples": torch.zeros(2, 4, 8, 8)}
        expected = SamplerCustom.execute(model, True, 5, CFG, gmm.conditioning([3]), gmm.null_conditioning(),
                                         comfy.samplers.sampler_object(entry["sampler"]),
                                         torch.tensor(entry["sigmas"], dtype=torch.float32),
                                         latent).result[0]["samples"]
    torch.testing.assert_close(out, expected)


def test_auto_chooses_a_built_in_when_every_fit_validates_worse(model, calibration_folder, monkeypatch):
    """The fit made bad (IIA-DDIM's correction coefficients, and its plain solver's, moved by 3: validation fits it
    again on each fold, so its fold fits are bad too): it validates worse than the built-ins, and `auto` samples
    with the best built-in, exactly as SamplerCustom would with it."""
    method = METHODS["iia_ddim"]
    good_fit, good_plain = method.fit, method.plain_tensors

    def bad_fit(run):
        tensors, diagnostics = good_fit(run)
        return {**tensors, "coefficients": tensors["coefficients"] + 3}, diagnostics

    monkeypatch.setattr(method, "fit", bad_fit)
    monkeypatch.setattr(method, "plain_tensors", lambda tensors, settings, schedule: {
        **good_plain(tensors, settings, schedule), "coefficients": tensors["coefficients"] + 3.5})
    calibration = _calibrate(model, method="iia_ddim")[0]
    check = calibration.diagnostics["iia_ddim"]["validation"]
    assert check["kept"] == ("fit" if check["rmse"] <= check["plain_rmse"] else "plain")
    validated = calibration.diagnostics["validated"]
    builtins = {label: v for label, v in validated.items() if "sampler" in v}
    best = min(builtins, key=lambda label: builtins[label]["rmse"])
    assert validated["iia_ddim"]["rmse"] > builtins[best]["rmse"]
    out = _ksampler(model, "auto", calibration=calibration)
    latent = {"samples": torch.zeros(2, 4, 8, 8)}
    expected = SamplerCustom.execute(model, True, 5, CFG, gmm.conditioning([3]), gmm.null_conditioning(),
                                     comfy.samplers.sampler_object(builtins[best]["sampler"]),
                                     torch.tensor(builtins[best]["sigmas"], dtype=torch.float32),
                                     latent).result[0]["samples"]
    torch.testing.assert_close(out, expected)


def test_calibrated_time_steps_lower_the_samplers_error_and_sample_as_the_built_in(model):
    """Calibrated time steps: the built-in sampler's interior sigmas fitted to the teacher from the better of the
    trust-region schedule and the scheduler where that sampler screened best; never worse than that start on the
    calibration batch, endpoints kept, the start stored (its plain form), and its sampler node is the built-in
    sampler itself (checked)."""
    from calibrated_samplers.nodes.builtins import ksampler_sigmas
    from calibrated_samplers.nodes.methods.time_steps import start_sigmas
    calibration = _calibrate(model, method="time_steps", sampler_name="dpmpp_2m")[0]
    facts = calibration.diagnostics["time_steps"]
    starts = facts["starts_rmse"]
    assert len(starts) == 2 and "trust region" in starts and facts["start"] == min(starts, key=starts.get)
    assert facts["rmse"] <= facts["start_rmse"] == pytest.approx(min(starts.values())) and facts["evaluations"] > 8
    sigmas = CalibrationSigmas.execute(calibration, "time_steps").result[0]
    schedule = NoiseSchedule.from_model_sampling(model.get_model_object("model_sampling"))
    start = start_sigmas(schedule, 4, "dpmpp_2m") if facts["start"] == "trust region" else \
        ksampler_sigmas(model.get_model_object("model_sampling"), facts["start"], 4, "dpmpp_2m")
    torch.testing.assert_close(calibration.fits["time_steps"]["start"], start.float())
    assert float(sigmas[0]) == float(start.float()[0]) and float(sigmas[-1]) == 0 and torch.all(sigmas[1:] < sigmas[:-1])
    ours = _sample(model, node_for("time_steps").execute(calibration).result[0], sigmas)
    theirs = _sample(model, comfy.samplers.sampler_object("dpmpp_2m"), sigmas.clone())
    assert torch.equal(ours, theirs)
    other = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "beta", 4)
    with pytest.raises(ValueError, match="fitted for the 4-step sigmas"):
        _sample(model, node_for("time_steps").execute(calibration).result[0], other)


def test_a_plain_solver_on_the_same_sigmas_runs_once():
    """`CalibrationRun.plain_error`: ddim is ComfyUI's euler; an error the built-in screen measured on the whole batch
    for that sampler on these sigmas is taken as it is, and any other is measured once per run."""
    from calibrated_samplers.nodes.run import CalibrationRun
    from calibrated_samplers.nodes.validation import BuiltinScreen
    screened = [14.6, 3.1, 0.9, 0.0]
    screen = BuiltinScreen({"euler / karras": {"rmse": 0.25, "sampler": "euler", "sigmas": screened}}, {}, {}, {}, 0)
    run = CalibrationRun(model=None, plan=None, positive=[], negative=[], latent=None, builtin_screen=screen)
    measured = []

    def measure():
        measured.append(1)
        return 0.5

    assert run.plain_error("ddim", torch.tensor(screened), measure) == 0.25 and not measured
    other = torch.tensor([14.6, 2.0, 0.5, 0.0], dtype=torch.float64)
    assert [run.plain_error(name, other, measure) for name in ("ddim", "euler")] == [0.5, 0.5] and measured == [1]
    assert run.plain_error("heun", other, measure) == 0.5 and measured == [1, 1]


def test_a_noise_first_model_call_is_made_once(model):
    """`FirstCalls`: every run starts from the calibration noises at sigma_max, so once the teacher has run, no run
    (nor a part of one) makes that call again, and a run given it ends where it would have; a run from another start
    and a time hook tuned between runs (TimeTuner's) make theirs."""
    from calibrated_samplers.nodes.request import Request, plan
    from calibrated_samplers.nodes.run import CalibrationRun

    def fresh():
        request = Request.from_inputs("olss", seed=0, cfg=CFG, steps=4, teacher_steps=20, calibration_batch=4)
        return CalibrationRun(model=model, plan=plan(model, (4, 8, 8), request), positive=gmm.conditioning([3]),
                              negative=gmm.null_conditioning(), latent=torch.zeros(1, 4, 8, 8))

    def calls(run, function, sigmas, **options):
        before = run.calls[0]
        x = run.sample(function, sigmas, **options)
        return x, run.calls[0] - before

    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", 4).float()
    euler = comfy.samplers.sampler_object("euler").sampler_function
    run = fresh()
    assert run.trajectory.final.shape[0] == 4 and run.calls[0] == 20
    shared, made = calls(run, euler, sigmas), calls(fresh(), euler, sigmas)
    assert shared[1] == 3 and made[1] == 4
    torch.testing.assert_close(shared[0], made[0], rtol=0, atol=1e-5)
    assert calls(run.subset([1, 2]), euler, sigmas)[1] == pytest.approx(3 * 2 / 4)
    assert calls(run, euler, sigmas[1:])[1] == 3                      # another start: its first call is made
    assert calls(run, euler, sigmas[1:])[1] == 2                      # (once)
    tuned = METHODS["timetuner"].sampler({"sigmas": sigmas, "ratios": torch.full((4,), 1.1, dtype=torch.float64)},
                                         {"sampler_name": "euler"}, run.schedule)
    assert calls(run, tuned[0], sigmas, **tuned[1])[1] == 4
    # TimeTuner's tuning runs the sampler again and again from the start, with one time hook whose ratios it changes
    # (`varies`: never shared); sharing the rest changes nothing it fits
    request = Request.from_inputs("timetuner", seed=0, cfg=CFG, steps=4, teacher_steps=20, calibration_batch=4,
                                  scheduler="simple")
    ratios = []
    for first_calls in (run.first_calls, FirstCalls()):
        tuning = dataclasses.replace(run, plan=plan(model, (4, 8, 8), request), first_calls=first_calls)
        ratios.append(METHODS["timetuner"].fit(tuning)[0]["ratios"])
    assert (ratios[0] != 1).any() and torch.equal(ratios[0], ratios[1])
    hook = type("Hook", (), {"varies": True, "__call__": lambda self: None})()
    first, x, sigma = FirstCalls().at([0], 1.0), torch.ones(1, 2), torch.ones(1)
    for options in ({}, {"transformer_options": {"wrappers": {"diffusion_model": {"hook": [hook]}}}}):
        first.keep(first.key(x, sigma, options), x, 2 * x)
    assert torch.equal(first.take(first.key(x, sigma, {}), x), 2 * x)
    assert first.take(first.key(x, sigma, options), x) is None


def test_olss_does_not_re_solve_a_hopeless_path(model, monkeypatch):
    """A searched or uniform path whose teacher fit cross-validates over HOPELESS times the best one is not re-solved
    (two runs saved each); the scheduler's sigmas, whose DDIM prior is fitted on nothing, always are."""
    from calibrated_samplers.nodes.methods import olss
    facts = {}
    for hopeless in (math.inf, 0.0):
        monkeypatch.setattr(olss, "HOPELESS", hopeless)
        facts[hopeless] = _calibrate(model, method="olss", refit=True)[0].diagnostics["olss"]
    resolved = {hopeless: {label for label, forms in fact["candidate_rmse"].items()
                           if "re-solved, cross-validated" in forms} for hopeless, fact in facts.items()}
    assert resolved == {math.inf: {"uniform path", "searched path", "karras sigmas"}, 0.0: {"karras sigmas"}}
    runs = {hopeless: fact["evaluations"] / 3 - fact["resolved"] for hopeless, fact in facts.items()}
    # (4 steps, the first call the teacher's)
    assert runs[math.inf] - runs[0.0] == 2 * 2


def test_teacher_steps_auto_takes_the_teacher_its_students_need(model, monkeypatch):
    """teacher_steps 0 (auto): the teacher is lengthened until its estimated error is at most 1/TEACHER_MARGIN of
    the best built-in's at the student's steps; that estimate holds against a long teacher, the length and the
    estimate are stored, every teacher run is counted, and a stricter need takes a longer teacher."""
    from calibrated_samplers.nodes import calibrate
    from calibrated_samplers.nodes.report import teacher_line
    from calibrated_samplers.nodes.run import auto_start
    long = _calibrate(model, steps=4, teacher_steps=1000, method="iia_ddim", cfg=5.0)[1]
    teachers = {}
    for margin in (20, 2000):
        monkeypatch.setattr(calibrate, "TEACHER_MARGIN", margin)
        calibration, teacher_latent, _ = _calibrate(model, steps=4, teacher_steps=0, method="iia_ddim", cfg=5.0,
                                                    refit=True)
        teacher = calibration.diagnostics["teacher"]
        assert calibration.settings["teacher"]["steps"] == "auto"
        best = min(entry["rmse"] for label, entry in calibration.diagnostics["validated"].items() if "sampler" in entry)
        assert teacher["target"] == pytest.approx(best / margin, rel=0.2)
        assert teacher["estimate"] <= teacher["target"] and teacher["steps"] >= auto_start(4)
        assert teacher["evaluations"] >= teacher["steps"] + math.ceil(auto_start(4) * 2 / 3) / 2   # (estimate: half)
        error = float((teacher_latent["samples"] - long["samples"]).pow(2).mean().sqrt())
        assert error <= teacher["estimate"] * 1.5, (error, teacher)
        teachers[margin] = teacher
        assert teacher_line(calibration.diagnostics) == f" ({teacher['steps']} steps, its error ~{teacher['estimate']:.1e})"
    assert teachers[20]["steps"] == auto_start(4) < teachers[2000]["steps"], teachers


def test_teacher_steps_auto_takes_a_longer_teacher_for_a_harder_model():
    """Guidance makes the ODE harder: on the closed-form model, the teacher that teacher_steps auto settles on at cfg
    10 is longer than at cfg 1 (48 -> 72 steps at batch 8), each meeting its own target."""
    model = gmm.build_model("eps")
    teachers = {}
    for cfg in (1.0, 10.0):
        calibration = _calibrate(model, steps=5, teacher_steps=0, batch=8, method="iia_ddim", cfg=cfg)[0]
        teachers[cfg] = calibration.diagnostics["teacher"]
        assert teachers[cfg]["estimate"] <= teachers[cfg]["target"] and not teachers[cfg]["floor"]
    assert teachers[1.0]["steps"] < teachers[10.0]["steps"], teachers


def test_scheduler_auto_keeps_the_schedule_closest_to_the_teacher(model):
    """scheduler auto: IIA and TimeTuner are each fitted on the SCHEDULER_TRIES schedulers where their plain
    sampler did best on the screening noise, and keep the one whose fit or plain solver came closest to the teacher
    on the calibration batch, which is then validated: its sigmas are stored, and KSampler (Calibrated) with
    scheduler auto samples the calibration's choice exactly as SamplerCustom does."""
    from calibrated_samplers.nodes.builtins import ksampler_sigmas
    from calibrated_samplers.nodes.calibrate import SCHEDULER_TRIES
    calibration = _calibrate(model, method="all", scheduler="auto")[0]
    ms = model.get_model_object("model_sampling")
    assert calibration.settings["scheduler"] == "auto"
    for name in ("iia_ddim", "timetuner"):
        facts = calibration.diagnostics[name]
        tried = facts["schedulers_tried"]
        assert len(tried) == SCHEDULER_TRIES and facts["scheduler"] == min(tried, key=tried.get)
        assert min(tried.values()) == min(facts["rmse"], facts.get("plain_rmse", math.inf))
        expected = ksampler_sigmas(ms, facts["scheduler"], 4, "euler")
        assert torch.allclose(calibration.fits[name]["sigmas"], expected.float())
    screened = {label: entry for label, entry in calibration.diagnostics["validated"].items() if "sampler" in entry}
    assert {entry["scheduler"] for entry in screened.values()} - {"karras"}       # not one scheduler's built-ins
    ours = _ksampler(model, method="iia_ddim", scheduler="auto", calibration=calibration)
    theirs = _sample(model, node_for("iia_ddim").execute(calibration).result[0],
                     calibration.fits["iia_ddim"]["sigmas"], seed=5, batch=2)
    torch.testing.assert_close(ours, theirs)


def test_teacher_steps_auto_stops_where_longer_runs_stop_helping(model, monkeypatch):
    """Where a longer teacher does not lower the estimate (a model whose outputs are rough in sigma), teacher_steps
    auto stops after one lengthening and says so, instead of running up to its longest teacher."""
    from calibrated_samplers.nodes import run
    monkeypatch.setattr(run, "error_estimate", lambda *args: 1.0)      # never falling, always above the target
    calibration = _calibrate(model, steps=4, teacher_steps=0, method="iia_ddim")[0]
    teacher = calibration.diagnostics["teacher"]
    assert teacher["floor"] and teacher["estimate"] == 1.0
    assert run.auto_start(4) < teacher["steps"] <= 2 * run.auto_start(4)


def test_teacher_steps_auto_judges_the_floor_on_the_same_noises(model, monkeypatch):
    """The first estimate is made on half the noises: whether a longer teacher still helps is judged on that half,
    not on all the noises (whose errors may be larger: here 10x), which would stop it at a floor it has not met."""
    from calibrated_samplers.nodes import run
    monkeypatch.setattr(run, "error_estimate",
                        lambda final, coarser, steps, coarser_steps: (10 if len(final) == 6 else 1) * 1e5 / steps ** 3)
    calibration = _calibrate(model, steps=4, teacher_steps=0, method="iia_ddim")[0]
    teacher = calibration.diagnostics["teacher"]
    assert not teacher["floor"] and teacher["steps"] > 2 * run.auto_start(4)


def test_a_nearby_cfg_borrows_a_stored_calibration(model, calibration_folder, monkeypatch, tmp_path_factory, caplog):
    """With a measured range (here a made-up one, cfg -0.5 to +1), KSampler (Calibrated) at cfg 2.5 uses the stored
    calibration made at cfg 2 (no new file, a log line), at cfg 3.5 makes its own; a calibration given outside its
    range is refused with the range named. A calibration made without a range (no measurement) is never borrowed."""
    import json
    import logging
    from calibrated_samplers.nodes import nearby
    table = tmp_path_factory.mktemp("nearby") / "nearby.json"
    table.write_text(json.dumps({"methods": {"auto": {"cfg": [-0.5, 1.0], "sides": [1.0, 1.0]},
                                             "olss": {"cfg": [-0.5, 0.5], "sides": [1.0, 1.0]}}}))
    monkeypatch.setattr(nearby, "FILE", table)

    def ksampler(cfg, calibration=None, method="auto"):
        latent = {"samples": torch.zeros(2, 4, 8, 8)}
        return CalibratedKSampler.execute(model=model, seed=5, steps=4, cfg=cfg, sampler_name="euler",
                                          scheduler="karras", positive=gmm.conditioning([3]),
                                          negative=gmm.null_conditioning(), latent_image=latent, denoise=1.0,
                                          method=method, teacher_steps=0, calibration_batch=6,
                                          calibration=calibration).result[0]["samples"]

    ksampler(2.0)
    assert len(list(calibration_folder.iterdir())) == 1
    with caplog.at_level(logging.INFO):
        out = ksampler(2.5)
    assert torch.isfinite(out).all() and len(list(calibration_folder.iterdir())) == 1
    assert "borrowing the calibration made for cfg 2" in caplog.text and "cfg 2.5 (made for 2)" in caplog.text
    ksampler(3.5)
    assert len(list(calibration_folder.iterdir())) == 2, "outside the range: a calibration of its own"
    stored = LoadCalibration.execute(sorted(p.name for p in calibration_folder.iterdir())[0]).result[0]
    assert stored.borrow_range("olss") == {"cfg": [-0.5, 0.5], "sides": [1.0, 1.0]}
    with pytest.raises(CalibrationMismatch, match=r"from cfg \d\.?\d* to"):
        ksampler(stored.cfg + 0.75, calibration=stored, method="olss")      # within auto's range, not olss's
    monkeypatch.setattr(nearby, "FILE", tmp_path_factory.mktemp("none") / "nearby.json")
    ksampler(6.0)
    ksampler(6.25)
    assert len(list(calibration_folder.iterdir())) == 4, "made without a measured range: never borrowed"
