"""The example workflows in workflows/: they load in the real server's node set, their links are
type-correct, ComfyUI's template browser lists them, and each one runs to success once its SD1.5
checkpoint, prompts and VAE are swapped for the bundled tiny model."""
import json
import urllib.request

import pytest
import torch

import workflow_format as wf
from host import ROOT

WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
FILE_INPUTS = {("CheckpointLoaderSimple", "ckpt_name"), ("LoadCalibration", "calibration_name")}   # the user's files


@pytest.fixture(scope="module")
def object_info(comfy_server):
    return comfy_server.get("/object_info")


def test_there_is_one_workflow_per_use():
    names = {p.stem for p in WORKFLOWS}
    assert {"trust_region_sigmas", "calibrate_then_olss", "iia_heun", "timetuner", "calibrated_ksampler",
            "compare_5_steps", "hires_fix"} <= names


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_matches_the_nodes(path, object_info):
    workflow = json.loads(path.read_text())
    nodes = {n["id"]: n for n in workflow["nodes"]}
    for node in workflow["nodes"]:
        assert {"id", "type", "pos", "size", "inputs", "outputs", "widgets_values"} <= set(node)
        if node["type"] in wf.FRONTEND_ONLY:
            continue
        assert node["type"] in object_info, f"{path.name}: unknown node {node['type']}"
        info = object_info[node["type"]]
        names = dict(wf.inputs_in_order(info))
        for socket in node["inputs"]:
            assert socket["name"] in names, f"{path.name}: {node['type']} has no input {socket['name']}"
            assert socket["type"] == names[socket["name"]][0]
        assert len(node["widgets_values"]) == len(wf.widget_names(info)), (path.name, node["type"])
        for name, value in zip(wf.widget_names(info), node["widgets_values"]):
            spec = None if (node["type"], name) in FILE_INPUTS else names.get(name)
            if spec is not None and isinstance(spec[0], list):
                assert value in spec[0], f"{path.name}: {node['type']}.{name} = {value!r} is not an option"
            elif spec is not None and spec[0] == "COMBO":
                assert value in spec[1]["options"], f"{path.name}: {node['type']}.{name} = {value!r}"
        for slot, out in enumerate(node["outputs"]):
            assert out["type"] == info["output"][slot]
    for link_id, source, source_slot, target, target_slot, kind in workflow["links"]:
        assert nodes[source]["outputs"][source_slot]["type"] == kind
        assert nodes[target]["inputs"][target_slot]["type"] == kind
        assert nodes[target]["inputs"][target_slot]["link"] == link_id
        assert link_id in nodes[source]["outputs"][source_slot]["links"]
    assert any(n["type"] in wf.FRONTEND_ONLY for n in workflow["nodes"]) or workflow["groups"], "explain the workflow"


def tiny_prompt(prompt, model_name="gmm_eps"):
    """The API prompt with the SD1.5 checkpoint, prompts, empty latent and VAE swapped for a tiny model."""
    swap = {}
    tiny = None
    for node_id, node in prompt.items():
        if node["class_type"] == "CheckpointLoaderSimple":
            tiny = node_id
            prompt[node_id] = {"class_type": "CalibratedSamplersTinyModel",
                               "inputs": {"model_name": model_name, "label": 3, "batch_size": 2}}
    for node_id, node in list(prompt.items()):
        if node["class_type"] == "EmptyLatentImage":
            swap[node_id] = [tiny, 3]
        elif node["class_type"] == "CLIPTextEncode":
            swap[node_id] = None          # positive or negative: decided by the input it feeds
        elif node["class_type"] == "VAEDecode":
            swap[node_id] = ("decoded", node["inputs"]["samples"])
    for node_id in swap:
        del prompt[node_id]
    for node_id, node in list(prompt.items()):
        for name, value in list(node["inputs"].items()):
            if not (isinstance(value, list) and value[0] in swap):
                continue
            target = swap[value[0]]
            if target is None:
                node["inputs"][name] = [tiny, 1 if name == "positive" else 2]
            elif isinstance(target, tuple):      # an image of a decoded latent: save the latent instead
                prompt[node_id] = {"class_type": "SaveLatent",
                                   "inputs": {"samples": target[1], "filename_prefix": f"workflow_{node_id}"}}
            else:
                node["inputs"][name] = target
    return prompt


# Workflows that change the latent size run on the digits model (a U-Net of any size; the mixture is 8x8 only),
# with a smaller calibration batch (two calibrations on a trained network, one at 12x12, within a CI minute)
TINY_MODEL = {"hires_fix": "digits_eps"}
TINY_INPUTS = {"hires_fix": {"CalibratedKSampler": {"calibration_batch": 4}}}


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_runs_on_the_tiny_model(path, object_info, comfy_server):
    prompt = tiny_prompt(wf.to_api(json.loads(path.read_text()), object_info), TINY_MODEL.get(path.stem, "gmm_eps"))
    for node in prompt.values():
        node["inputs"].update(TINY_INPUTS.get(path.stem, {}).get(node["class_type"], {}))
    result = comfy_server.run_prompt(prompt)
    assert result.get("status", {}).get("status_str") == "success", (path.name, result, comfy_server.output())
    if path.stem == "hires_fix":        # the second pass calibrated for denoise 0.5 and sampled the larger latent
        import safetensors.torch
        assert list((comfy_server.base / "models" / "calibrations").glob("eps-5steps-cfg7-denoise0.5-*.safetensors"))
        saved = sorted((comfy_server.base / "output").rglob("workflow_*.latent"))
        assert any(safetensors.torch.load_file(str(p))["latent_tensor"].shape[-2:] == (12, 12) for p in saved)


@pytest.mark.parametrize("checkpoint, channels", [("sd15", 4), ("flux", 16)])
@pytest.mark.parametrize("name", ["calibrate_then_olss", "calibrated_ksampler"])
def test_workflow_runs_on_a_model_built_like_a_real_checkpoint(name, checkpoint, channels, object_info, comfy_server):
    """The closed-form model in SD1.5's and Flux's latent formats: the saved latents are in LATENT space, that
    is the unit-scale data the model sees, passed through the format's process_latent_out."""
    import comfy.latent_formats
    import safetensors.torch
    fmt = {"sd15": comfy.latent_formats.SD15, "flux": comfy.latent_formats.Flux}[checkpoint]()
    prefix = f"{name}_{checkpoint}"
    prompt = tiny_prompt(wf.to_api(json.loads((ROOT / "workflows" / f"{name}.json").read_text()), object_info),
                         f"sharp_{checkpoint}")
    for node in prompt.values():
        if node["class_type"] == "SaveLatent":
            node["inputs"]["filename_prefix"] = f"{prefix}_{node['inputs']['filename_prefix']}"
    result = comfy_server.run_prompt(prompt)
    assert result.get("status", {}).get("status_str") == "success", (result, comfy_server.output())
    saved = sorted((comfy_server.base / "output").rglob(f"{prefix}_*.latent"))
    assert saved
    for path in saved:
        latent = safetensors.torch.load_file(str(path))["latent_tensor"]
        assert latent.shape[1] == channels and torch.isfinite(latent).all()
        assert 0.5 < float(fmt.process_in(latent).std()) < 2, path.name


def test_template_browser_lists_them(comfy_server):
    listed = comfy_server.get("/workflow_templates")
    ours = [names for names in listed.values() if "calibrate_then_olss" in names]
    assert ours and set(ours[0]) == {p.stem for p in WORKFLOWS}
    folder = next(k for k, v in listed.items() if v is ours[0])
    with urllib.request.urlopen(f"{comfy_server.url}/api/workflow_templates/{folder}/calibrate_then_olss.json") as r:
        assert json.loads(r.read())["nodes"]
