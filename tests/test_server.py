"""End to end: the real ComfyUI server loads the pack and runs a workflow through /prompt."""
import time
import urllib.request

import pytest


@pytest.fixture(scope="module")
def object_info(comfy_server):
    return comfy_server.get("/object_info")


def test_pack_nodes_are_listed(object_info, comfy_server):
    from calibrated_samplers.nodes import NODES
    assert NODES, "the pack registers no node"
    for node in NODES:
        node_id = node.define_schema().node_id
        assert node_id in object_info, f"{node_id} missing from /object_info:\n{comfy_server.output()}"
        assert object_info[node_id]["category"].startswith("sampling/calibrated_samplers")
    assert "CalibratedSamplersTinyModel" in object_info


def _tiny_model(model_name, batch_size):
    return {"class_type": "CalibratedSamplersTinyModel",
            "inputs": {"model_name": model_name, "label": 3, "batch_size": batch_size}}


_TINY = {"model": ["1", 0], "positive": ["1", 1], "negative": ["1", 2], "latent_image": ["1", 3]}   # node "1"


def _calibrate_node(**inputs):
    """Calibrate Sampler on the tiny model of node "1"; `inputs` overrides the defaults."""
    return {"class_type": "CalibrateSampler", "inputs": {
        **_TINY, "seed": 0, "cfg": 2.0, "steps": 4, "teacher_steps": 100, "calibration_batch": 4, "method": "all",
        "scheduler": "karras", "sampler_name": "euler", "refit": False, **inputs}}


def _ksampler_node(**inputs):
    """KSampler (Calibrated) on the tiny model of node "1"; `inputs` overrides the defaults."""
    return {"class_type": "CalibratedKSampler", "inputs": {
        **_TINY, "seed": 3, "steps": 4, "cfg": 2.0, "method": "olss", "sampler_name": "euler", "scheduler": "karras",
        "denoise": 1.0, "teacher_steps": 100, "calibration_batch": 4, **inputs}}


def _sampler_custom_prompt(model_name, sigmas_node):
    return {
        "1": _tiny_model(model_name, 2),
        "2": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "uni_pc"}},
        "3": sigmas_node,
        "4": {"class_type": "SamplerCustom",
              "inputs": {"model": ["1", 0], "add_noise": True, "noise_seed": 7, "cfg": 2.0,
                         "positive": ["1", 1], "negative": ["1", 2], "sampler": ["2", 0],
                         "sigmas": ["3", 0], "latent_image": ["1", 3]}},
        "5": {"class_type": "SaveLatent", "inputs": {"samples": ["4", 0], "filename_prefix": "e2e"}},
    }


SIGMAS_NODES = {
    "builtin": {"class_type": "BasicScheduler",
                "inputs": {"model": ["1", 0], "scheduler": "karras", "steps": 5, "denoise": 1.0}},
    "trust_region": {"class_type": "TrustRegionStepsScheduler",
                     "inputs": {"model": ["1", 0], "steps": 5, "solver": "uni_pc", "init": "uniform_t",
                                "error_exponent": 2.0, "denoise": 1.0}},
}


@pytest.mark.parametrize("schedule", SIGMAS_NODES)
@pytest.mark.parametrize("model_name", ["gmm_eps", "gmm_flow", "digits_eps"])
def test_workflow_runs_through_prompt_and_history(comfy_server, model_name, schedule):
    result = comfy_server.run_prompt(_sampler_custom_prompt(model_name, SIGMAS_NODES[schedule]))
    assert result.get("status", {}).get("status_str") == "success", (result, comfy_server.output())
    assert result["outputs"]["5"]["latents"][0]["filename"].endswith(".latent")


def test_bad_input_reaches_the_error_panel(comfy_server):
    """An invalid input is refused by ComfyUI's validation with the node and input named."""
    bad = dict(SIGMAS_NODES["trust_region"], inputs=dict(SIGMAS_NODES["trust_region"]["inputs"], steps=1))
    answer = comfy_server.post("/prompt", {"prompt": _sampler_custom_prompt("gmm_eps", bad)})
    assert answer.get("http_status") == 400
    assert "steps" in str(answer["node_errors"])


def test_calibrate_then_olss_workflow(comfy_server):
    """Calibrate Sampler -> OLSS / IIA / TimeTuner Sampler + Calibration Sigmas -> SamplerCustom, and
    KSampler (Calibrated), through /prompt."""
    prompt = {
        "1": _tiny_model("gmm_flow", 2),
        "2": _calibrate_node(sampler_name="dpmpp_2m"),
        "3": {"class_type": "OLSSSampler", "inputs": {"calibration": ["2", 0], "variant": "olss"}},
        "4": {"class_type": "CalibrationSigmas", "inputs": {"calibration": ["2", 0], "method": "olss"}},
        "5": {"class_type": "SamplerCustom",
              "inputs": {"model": ["1", 0], "add_noise": True, "noise_seed": 7, "cfg": 2.0,
                         "positive": ["1", 1], "negative": ["1", 2], "sampler": ["3", 0],
                         "sigmas": ["4", 0], "latent_image": ["1", 3]}},
        "6": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": "olss"}},
        "7": _ksampler_node(method="olss_p"),
        "8": {"class_type": "SaveLatent", "inputs": {"samples": ["7", 0], "filename_prefix": "ks"}},
    }
    for n, (node, variant) in enumerate([("IIASampler", "iia_heun"), ("TimeTunerSampler", None)]):
        first = 10 + 4 * n
        method = variant or "timetuner"
        prompt[str(first)] = {"class_type": node, "inputs": {"calibration": ["2", 0],
                                                            **({"variant": variant} if variant else {})}}
        prompt[str(first + 1)] = {"class_type": "CalibrationSigmas", "inputs": {"calibration": ["2", 0],
                                                                               "method": method}}
        prompt[str(first + 2)] = {"class_type": "SamplerCustom", "inputs": dict(
            prompt["5"]["inputs"], sampler=[str(first), 0], sigmas=[str(first + 1), 0])}
        prompt[str(first + 3)] = {"class_type": "SaveLatent", "inputs": {"samples": [str(first + 2), 0],
                                                                         "filename_prefix": method}}
    result = comfy_server.run_prompt(prompt)
    assert result.get("status", {}).get("status_str") == "success", (result, comfy_server.output())
    stored = list((comfy_server.base / "models" / "calibrations").glob("*.safetensors"))
    assert len(stored) == 2, stored      # one per request: node 2 ("all", seed 0) and node 7 ("olss_p")


def test_a_failing_node_reports_its_message(comfy_server):
    """A calibrated KSampler asked for more steps than its teacher allows fails with its message in the history
    (the error panel)."""
    prompt = {
        "1": _tiny_model("gmm_eps", 1),
        "2": _ksampler_node(steps=8, teacher_steps=10),
        "3": {"class_type": "SaveLatent", "inputs": {"samples": ["2", 0], "filename_prefix": "bad"}},
    }
    result = comfy_server.run_prompt(prompt)
    assert result["status"]["status_str"] == "error"
    messages = str(result["status"]["messages"])
    assert "steps 8 is too many for a 10-step teacher" in messages


def test_cancel_stops_calibration_promptly_and_stores_nothing(comfy_server):
    """Cancel (POST /interrupt) during a long teacher run: the prompt ends within seconds as interrupted,
    and no calibration file appears."""
    folder = comfy_server.base / "models" / "calibrations"
    before = set(folder.glob("*.safetensors")) if folder.exists() else set()
    prompt = {
        "1": _tiny_model("gmm_eps", 1),
        "2": _calibrate_node(seed=11, steps=5, teacher_steps=4000, calibration_batch=256, method="olss", refit=True),
        "3": {"class_type": "SaveLatent", "inputs": {"samples": ["2", 1], "filename_prefix": "cancelled"}},
    }
    pid = comfy_server.post("/prompt", {"prompt": prompt})["prompt_id"]
    deadline = time.time() + 60
    while not comfy_server.get("/queue")["queue_running"] and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(1.5)                                   # inside the teacher run
    urllib.request.urlopen(urllib.request.Request(comfy_server.url + "/interrupt", data=b"{}", method="POST"))
    cancelled = time.time()
    while time.time() < cancelled + 30:
        entry = comfy_server.get(f"/history/{pid}").get(pid)
        if entry and entry.get("status", {}).get("completed") is not None:
            break
        time.sleep(0.1)
    assert time.time() - cancelled < 5, "Cancel took too long"
    assert entry["status"]["status_str"] == "error"
    assert "execution_interrupted" in str(entry["status"]["messages"])
    after = set(folder.glob("*.safetensors")) if folder.exists() else set()
    assert after == before, "a cancelled calibration must store nothing"


def test_every_pack_input_and_node_is_explained(object_info):
    """Display names, descriptions and a tooltip on every input: what a user reads in the UI."""
    from calibrated_samplers.nodes import NODES
    for node in NODES:
        info = object_info[node.define_schema().node_id]
        assert info["display_name"] != info["name"] and info["description"], info["name"]
        for group in ("required", "optional"):
            for name, spec in info["input"].get(group, {}).items():
                options = spec[1] if len(spec) > 1 else {}
                assert options.get("tooltip"), f"{info['name']}.{name} has no tooltip"


def test_a_damaged_stored_calibration_is_listed_but_refused_with_a_message(comfy_server):
    """A torn or foreign file in models/calibrations never breaks the node list; loading it fails with a
    message in the error panel, and nothing from it is executed."""
    folder = comfy_server.base / "models" / "calibrations"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "damaged.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    listed = comfy_server.get("/object_info/LoadCalibration")["LoadCalibration"]["input"]["required"]
    assert "damaged.safetensors" in str(listed["calibration_name"])
    prompt = {
        "1": {"class_type": "LoadCalibration", "inputs": {"calibration_name": "damaged.safetensors"}},
        "2": {"class_type": "CalibrationReport", "inputs": {"calibration": ["1", 0]}},
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}},
    }
    result = comfy_server.run_prompt(prompt)
    assert result["status"]["status_str"] == "error"
    assert "calibration damaged.safetensors is damaged or not a safetensors file" in str(result["status"]["messages"])
    (folder / "damaged.safetensors").unlink()


def _stored_record(cfg):
    import torch
    from calibrated_samplers.optimizers.calibration import Calibration
    sigmas = torch.tensor([14.6, 2.0, 0.5, 0.0])
    return Calibration(family="eps", fingerprint="f", cfg=cfg, latent_shape=(4, 8, 8), steps=3, settings={},
                       fits={"olss": {"sigmas": sigmas, "path": torch.tensor([0, 1, 2]), "weights_x": torch.zeros(3),
                                      "weights_d": torch.zeros(3, 3), "errors": torch.zeros(3)}},
                       evaluations={"olss": 3})


def _cached_nodes(result):
    return {node for kind, data in result["status"]["messages"] if kind == "execution_cached" for node in data["nodes"]}


def test_load_calibration_follows_its_file(comfy_server):
    """Load Calibration is cached while its file stays; a replaced file (a re-calibration, a copy) loads anew, and
    a deleted one is refused by name."""
    import os
    from calibrated_samplers import calibration_cache as store
    folder = comfy_server.base / "models" / "calibrations"
    folder.mkdir(parents=True, exist_ok=True)
    store.save(_stored_record(3.0), folder, "follow")
    prompt = {"1": {"class_type": "LoadCalibration", "inputs": {"calibration_name": "follow.safetensors"}},
              "2": {"class_type": "CalibrationReport", "inputs": {"calibration": ["1", 0]}},
              "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "follow"}}}
    first = comfy_server.run_prompt(prompt)
    assert first["status"]["status_str"] == "success", (first, comfy_server.output())
    again = comfy_server.run_prompt(prompt)
    assert "1" in _cached_nodes(again)
    time.sleep(0.01)
    replacement = store.save(_stored_record(5.0), folder, "replacement")
    os.replace(replacement, folder / "follow.safetensors")
    replaced = comfy_server.run_prompt(prompt)
    assert replaced["status"]["status_str"] == "success" and "1" not in _cached_nodes(replaced)
    os.unlink(folder / "follow.safetensors")
    gone = comfy_server.run_prompt(prompt)
    assert "follow.safetensors" in str(gone)


def _ksampler_prompt(scheduler):
    return {
        "1": _tiny_model("gmm_eps", 2),
        "2": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "seed": 7, "steps": 5, "cfg": 2.0, "sampler_name": "dpmpp_2m", "scheduler": scheduler,
            "positive": ["1", 1], "negative": ["1", 2], "latent_image": ["1", 3], "denoise": 1.0}},
        "3": {"class_type": "SaveLatent", "inputs": {"samples": ["2", 0], "filename_prefix": "scheduler"}},
    }


@pytest.fixture(scope="module")
def server_with_schedulers():
    """A second real server, started with the opt-in setting on."""
    import host
    from comfy_server import ComfyServer
    from calibrated_samplers.nodes.ksampler_schedulers import SETTING
    server = ComfyServer(host.COMFYUI_DIR, host.ROOT, extra_nodes=[host.TESTS / "tinymodels"], env={SETTING: "1"})
    try:
        yield server.wait_ready()
    finally:
        server.stop()


def _scheduler_lists(object_info):
    """{node: its scheduler combo} for every node in /object_info with an input named scheduler."""
    out = {}
    for name, info in object_info.items():
        for group in ("required", "optional"):
            spec = info.get("input", {}).get(group, {}).get("scheduler")
            if spec and isinstance(spec[0], list):              # V1 nodes: [options, {...}]
                out[name] = spec[0]
            elif spec and spec[0] == "COMBO":                   # V3 nodes: ["COMBO", {"options": ...}]
                out[name] = spec[1]["options"]
    return out


def test_the_trust_region_scheduler_is_opt_in(comfy_server, server_with_schedulers, object_info):
    """Off (the default): no scheduler list changes. On: every core node that lists schedulers (KSampler,
    KSampler (Advanced), BasicScheduler, ...) offers trust_region after the built-in names, in the same order, and
    a KSampler workflow with it runs in the real server, while one with karras still runs."""
    from calibrated_samplers.nodes.ksampler_schedulers import NAME
    import comfy.samplers
    off = _scheduler_lists(object_info)
    assert off["KSampler"] == list(comfy.samplers.SCHEDULER_NAMES) and all(NAME not in v for v in off.values())
    on = _scheduler_lists(server_with_schedulers.get("/object_info"))
    assert {"KSampler", "KSamplerAdvanced", "BasicScheduler", "CalibratedKSampler"} <= set(off) and set(on) == set(off)
    for node in off:
        assert on[node] == [*off[node], NAME], node
    for scheduler in (NAME, "karras"):
        result = server_with_schedulers.run_prompt(_ksampler_prompt(scheduler))
        assert result.get("status", {}).get("status_str") == "success", (result, server_with_schedulers.output())
    refused = comfy_server.post("/prompt", {"prompt": _ksampler_prompt(NAME)})
    assert "prompt_id" not in refused and "trust_region" in str(refused)
