"""ComfyUI's two workflow formats, as the pack's tools and tests need them.

UI format: what ComfyUI's "Save" writes (nodes with positions, sizes, socket inputs/outputs and
`widgets_values` in the order of the node's widget inputs, links as [id, from node, from slot, to node,
to slot, type], groups). API format: what /prompt takes ({id: {class_type, inputs}}).

`node_infos()` gives /object_info's entries in-process; `widget_names(info)` the order of a node's
widget values (a seed with control_after_generate is followed by its control value); `to_api` converts.
"""
import asyncio

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
FRONTEND_ONLY = {"Note", "MarkdownNote"}           # drawn by the frontend, not in /object_info


def is_widget(spec) -> bool:
    kind = spec[0]
    return isinstance(kind, list) or kind in WIDGET_TYPES


def inputs_in_order(info):
    """[(name, spec)] required then optional, as /object_info orders them."""
    out = []
    for group in ("required", "optional"):
        specs = info["input"].get(group, {})
        for name in info.get("input_order", {}).get(group, list(specs)):
            out.append((name, specs[name]))
    return out


def widget_names(info):
    """Names of the values in a node's widgets_values; None marks a seed's control_after_generate value."""
    names = []
    for name, spec in inputs_in_order(info):
        if is_widget(spec):
            names.append(name)
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if options.get("control_after_generate"):
                names.append(None)
    return names


def node_infos(types):
    """/object_info entries for these node types, computed in-process (ComfyUI's core, its extras and
    the pack must be importable: call after tests/host.setup())."""
    import nodes
    from comfy_api.internal import _ComfyNodeInternal

    if "SamplerCustom" not in nodes.NODE_CLASS_MAPPINGS:
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    from calibrated_samplers.nodes import NODES
    classes = dict(nodes.NODE_CLASS_MAPPINGS)
    classes.update({n.define_schema().node_id: n for n in NODES})
    out = {}
    for name in types:
        cls = classes[name]
        if issubclass(cls, _ComfyNodeInternal):
            out[name] = cls.GET_NODE_INFO_V1()
        else:
            types_ = cls.INPUT_TYPES()
            out[name] = {"input": types_, "input_order": {k: list(v) for k, v in types_.items()},
                         "output": list(cls.RETURN_TYPES),
                         "output_name": list(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES))}
    return out


def to_api(workflow, object_info):
    """The API-format prompt of a UI-format workflow (frontend-only nodes left out)."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY or node.get("mode", 0) != 0:
            continue
        inputs = {}
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                link = links[slot["link"]]
                inputs[slot["name"]] = [str(link[1]), link[2]]
        names = widget_names(object_info[node["type"]])
        for name, value in zip(names, node.get("widgets_values", [])):
            if name is not None and name not in inputs:
                inputs[name] = value
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt
