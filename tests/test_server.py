"""End to end: the real ComfyUI server loads the pack and runs a workflow through /prompt."""
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


def _sampler_custom_prompt(model_name, sigmas_node):
    return {
        "1": {"class_type": "CalibratedSamplersTinyModel",
              "inputs": {"model_name": model_name, "label": 3, "batch_size": 2}},
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
