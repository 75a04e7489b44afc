"""Writes the example workflows in workflows/ (ComfyUI's UI format, as its "Save" writes it).

    $VENV/bin/python tools/make_workflows.py

Each workflow is described below by its nodes (type, column, widget values by name, inputs by source)
and laid out in columns; widget order, defaults and output types come from the node definitions
themselves (tests/workflow_format.py), so the files always match the nodes. They use a standard SD1.5
checkpoint name as a user would have it.
"""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import host  # noqa: E402

host.setup()
import workflow_format as wf  # noqa: E402

CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
PROMPT = "a watercolor painting of a lighthouse on a cliff at sunset, detailed, soft light"
NEGATIVE = "blurry, low quality, watermark"
COLUMN_WIDTH, NODE_WIDTH = 380, 340


class Workflow:
    def __init__(self, name):
        self.name, self.nodes, self.groups, self.links = name, [], [], []

    def add(self, type_, column, widgets=None, inputs=None, title=None, text=None):
        node = {"id": len(self.nodes) + 1, "type": type_, "column": column, "widgets": widgets or {},
                "sources": inputs or {}, "title": title, "text": text}
        self.nodes.append(node)
        return node["id"]

    def note(self, column, text):
        return self.add("Note", column, text=text)

    def group(self, title, ids, color="#3f789e"):
        self.groups.append((title, ids, color))

    def build(self, infos):
        heights, columns = {}, {}
        out_nodes = []
        outputs = {}
        for node in self.nodes:
            if node["type"] in wf.FRONTEND_ONLY:
                size = [NODE_WIDTH, 60 + 18 * node["text"].count("\n") + 18 * (len(node["text"]) // 48)]
                entry = {"type": node["type"], "inputs": [], "outputs": [], "widgets_values": [node["text"]]}
            else:
                info = infos[node["type"]]
                sockets, values = [], []
                for name, spec in wf.inputs_in_order(info):
                    if wf.is_widget(spec):
                        options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                        if name in node["widgets"]:
                            value = node["widgets"][name]
                        elif "default" in options:
                            value = options["default"]
                        else:
                            value = (spec[0] if isinstance(spec[0], list) else options["options"])[0]
                        values.append(value)
                        if options.get("control_after_generate"):
                            values.append("fixed")
                    elif name in node["sources"] or name in info["input"].get("required", {}):
                        sockets.append({"name": name, "type": spec[0], "link": None})
                for name in node["sources"]:
                    if name not in [s["name"] for s in sockets]:
                        raise ValueError(f"{self.name}: {node['type']} has no socket input {name!r}")
                names = info.get("output_name") or info["output"]
                outs = [{"name": name, "type": kind, "links": [], "slot_index": i}
                        for i, (name, kind) in enumerate(zip(names, info["output"]))]
                entry = {"type": node["type"], "inputs": sockets, "outputs": outs, "widgets_values": values}
                outputs[node["id"]] = outs
                size = [NODE_WIDTH, 40 + 24 * max(len(outs), 1) + 24 * (len(sockets) + len(values))]
            column = node["column"]
            y = columns.get(column, 40)
            columns[column] = y + size[1] + 60
            entry.update({"id": node["id"], "pos": [40 + column * COLUMN_WIDTH, y], "size": size, "flags": {},
                          "order": 0, "mode": 0, "properties": {"Node name for S&R": node["type"]}})
            if node["title"]:
                entry["title"] = node["title"]
            heights[node["id"]] = size
            out_nodes.append((node, entry))
        for node, entry in out_nodes:                 # links, from each socket's source
            for slot, socket in enumerate(entry["inputs"]):
                if socket["name"] in node["sources"]:
                    source, source_slot = node["sources"][socket["name"]]
                    out = outputs[source][source_slot]
                    if out["type"] != socket["type"] and socket["type"] != "*":
                        raise ValueError(f"{self.name}: {out['type']} into {node['type']}.{socket['name']} "
                                         f"({socket['type']})")
                    link_id = len(self.links) + 1
                    self.links.append([link_id, source, source_slot, node["id"], slot, out["type"]])
                    socket["link"] = link_id
                    out["links"].append(link_id)
        order = _execution_order(self.nodes)
        for node, entry in out_nodes:
            entry["order"] = order[node["id"]]
        groups = []
        for title, ids, color in self.groups:
            boxes = [(e["pos"], e["size"]) for n, e in out_nodes if n["id"] in ids]
            x0 = min(p[0] for p, _ in boxes) - 20
            y0 = min(p[1] for p, _ in boxes) - 50
            x1 = max(p[0] + s[0] for p, s in boxes) + 20
            y1 = max(p[1] + s[1] for p, s in boxes) + 20
            groups.append({"title": title, "bounding": [x0, y0, x1 - x0, y1 - y0], "color": color, "font_size": 24,
                           "flags": {}})
        return {"last_node_id": len(self.nodes), "last_link_id": len(self.links),
                "nodes": [e for _, e in out_nodes], "links": self.links, "groups": groups, "config": {},
                "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}}, "version": 0.4}


def _execution_order(nodes):
    depth = {}

    def visit(node_id):
        if node_id not in depth:
            node = nodes[node_id - 1]
            depth[node_id] = 1 + max((visit(src) for src, _ in node["sources"].values()), default=-1)
        return depth[node_id]

    for node in nodes:
        visit(node["id"])
    ranked = sorted(depth, key=lambda i: (depth[i], i))
    return {node_id: rank for rank, node_id in enumerate(ranked)}


def text_to_image(w, column=0):
    """Checkpoint, prompts and an empty 512x512 latent: (model, positive, negative, latent, vae)."""
    ckpt = w.add("CheckpointLoaderSimple", column, {"ckpt_name": CHECKPOINT})
    positive = w.add("CLIPTextEncode", column + 1, {"text": PROMPT}, {"clip": (ckpt, 1)}, title="Positive")
    negative = w.add("CLIPTextEncode", column + 1, {"text": NEGATIVE}, {"clip": (ckpt, 1)}, title="Negative")
    latent = w.add("EmptyLatentImage", column + 1, {"width": 512, "height": 512, "batch_size": 1})
    return (ckpt, 0), (positive, 0), (negative, 0), (latent, 0), (ckpt, 2)


def save(w, column, samples, vae, prefix, preview=False):
    decoded = w.add("VAEDecode", column, inputs={"samples": samples, "vae": vae})
    if preview:
        return w.add("PreviewImage", column + 1, inputs={"images": (decoded, 0)})
    return w.add("SaveImage", column + 1, {"filename_prefix": prefix}, {"images": (decoded, 0)})


def conditioning(model, positive, negative, latent):
    return {"model": model, "positive": positive, "negative": negative, "latent_image": latent}


def calibrate(w, column, model, positive, negative, latent, **widgets):
    settings = {"cfg": 7.0, "steps": 5, "teacher_steps": 0, "calibration_batch": 8, **widgets}
    return w.add("CalibrateSampler", column, settings, conditioning(model, positive, negative, latent))


def sampler_custom(w, column, model, positive, negative, latent, sampler, sigmas, seed=42):
    return w.add("SamplerCustom", column, {"add_noise": True, "noise_seed": seed, "cfg": 7.0},
                 {"model": model, "positive": positive, "negative": negative, "sampler": sampler,
                  "sigmas": sigmas, "latent_image": latent})


def calibrated_workflow(name, method_widgets, sampler_type, sampler_widgets, note, sigmas_method):
    w = Workflow(name)
    w.note(0, note)
    model, positive, negative, latent, vae = text_to_image(w)
    cal = calibrate(w, 3, model, positive, negative, latent, **method_widgets)
    report = w.add("CalibrationReport", 4, inputs={"calibration": (cal, 0)})
    w.add("PreviewImage", 5, inputs={"images": (report, 0)}, title="What calibration bought")
    sampler = w.add(sampler_type, 4, sampler_widgets, {"calibration": (cal, 0)})
    sigmas = w.add("CalibrationSigmas", 4, {"method": sigmas_method}, {"calibration": (cal, 0)})
    out = sampler_custom(w, 5, model, positive, negative, latent, (sampler, 0), (sigmas, 0))
    save(w, 6, (out, 0), vae, name)
    w.group("Calibrate once (stored in models/calibrations, reused on the next run)", [cal])
    w.group(f"Sample in {method_widgets.get('steps', 5)} steps", [sampler, sigmas, out])
    return w


def workflows():
    out = []

    w = Workflow("trust_region_sigmas")
    w.note(0, "Optimized time steps (Xue et al., CVPR 2024): Trust Region Steps picks the sigmas for the "
              "chosen solver by minimising a theory-based error bound. No calibration run, no model calls: "
              "plug it into SamplerCustom with the same solver (here uni_pc, 6 steps).")
    model, positive, negative, latent, vae = text_to_image(w)
    sigmas = w.add("TrustRegionStepsScheduler", 3, {"steps": 6, "solver": "uni_pc"}, {"model": model})
    sampler = w.add("KSamplerSelect", 3, {"sampler_name": "uni_pc"})
    result = sampler_custom(w, 4, model, positive, negative, latent, (sampler, 0), (sigmas, 0))
    save(w, 5, (result, 0), vae, "trust_region")
    w.group("Trust-region sigmas for uni_pc", [sigmas, sampler])
    out.append(w)

    out.append(calibrated_workflow(
        "calibrate_then_olss", {"method": "olss"}, "OLSSSampler", {"variant": "olss"},
        "OLSS (Duan et al., CIKM 2023). Calibrate Sampler runs a 500-step teacher once on your model with this "
        "prompt and cfg, fits OLSS and stores it; OLSS Sampler + Calibration Sigmas then sample in 5 model "
        "evaluations. Keep cfg and the latent size equal to the calibration's (the sampler refuses others).",
        "olss"))
    out.append(calibrated_workflow(
        "iia_heun", {"method": "iia_heun", "steps": 3, "scheduler": "karras"}, "IIASampler",
        {"variant": "iia_heun"},
        "IIA (Zhang, Niwa, Kleijn): Heun with a few fitted coefficients per step, fitted against 3 finer "
        "sub-steps. 3 Heun steps = 5 model evaluations. No teacher run is needed for IIA alone.", "iia_heun"))
    out.append(calibrated_workflow(
        "timetuner", {"method": "timetuner", "scheduler": "karras", "sampler_name": "dpmpp_2m"},
        "TimeTunerSampler", {},
        "TimeTuner (Xia et al., CVPR 2024): the chosen built-in sampler (here dpmpp_2m, karras, 5 steps) with a "
        "tuned time input per step, so each step lands on the teacher's trajectory. Only the network's time "
        "input changes; the solver and scaling are untouched.", "timetuner"))

    w = Workflow("calibrated_ksampler")
    w.note(0, "KSampler (Calibrated) is a drop-in for KSampler: the same inputs plus a method. The first run "
              "calibrates (once, stored in models/calibrations); later runs with the same model, cfg, size "
              "and steps reuse it instantly. Method auto samples with whichever validated best on calibration "
              "noises it was not fitted on, a built-in sampler included.")
    model, positive, negative, latent, vae = text_to_image(w)
    ks = w.add("CalibratedKSampler", 3, {"seed": 42, "steps": 5, "cfg": 7.0, "method": "auto",
                                         "sampler_name": "dpmpp_2m", "scheduler": "karras"},
               conditioning(model, positive, negative, latent))
    save(w, 4, (ks, 0), vae, "calibrated_ksampler")
    out.append(w)

    w = Workflow("hires_fix")
    w.note(0, "Hires fix with KSampler (Calibrated) in both passes: 5 steps at 512x512, the latent upscaled 1.5x, "
              "then a second pass of 5 steps at denoise 0.5. Each pass calibrates once for its own size, cfg, steps "
              "and denoise (the second on the upscaled pictures it is given), stores it and reuses it on later runs. "
              "A calibration for another denoise is refused.")
    model, positive, negative, latent, vae = text_to_image(w)
    common = {"seed": 42, "steps": 5, "cfg": 7.0, "method": "auto", "sampler_name": "dpmpp_2m"}
    first = w.add("CalibratedKSampler", 3, common, conditioning(model, positive, negative, latent),
                  title="First pass: 512x512")
    larger = w.add("LatentUpscaleBy", 4, {"upscale_method": "bislerp", "scale_by": 1.5}, {"samples": (first, 0)})
    second = w.add("CalibratedKSampler", 5, {**common, "denoise": 0.5},
                   conditioning(model, positive, negative, (larger, 0)), title="Second pass: 768x768, denoise 0.5")
    save(w, 6, (second, 0), vae, "hires_fix")
    w.group("Second pass: calibrated for denoise 0.5 at the larger size", [larger, second])
    out.append(w)

    w = Workflow("compare_5_steps")
    w.note(0, "Side by side at 5 model evaluations, same seed: a strong built-in (dpmpp_2m / karras), the "
              "calibrated OLSS and TimeTuner on dpmpp_2m, and a 40-step reference.")
    model, positive, negative, latent, vae = text_to_image(w)
    common = {"seed": 42, "cfg": 7.0}
    reference = w.add("KSampler", 3, {**common, "steps": 40, "sampler_name": "dpmpp_2m", "scheduler": "karras"},
                      conditioning(model, positive, negative, latent), title="Reference: 40 steps")
    builtin = w.add("KSampler", 3, {**common, "steps": 5, "sampler_name": "dpmpp_2m", "scheduler": "karras"},
                    conditioning(model, positive, negative, latent), title="Built-in: 5 steps")
    olss = w.add("CalibratedKSampler", 3, {**common, "steps": 5, "method": "olss"},
                 conditioning(model, positive, negative, latent), title="OLSS: 5 steps")
    tuned = w.add("CalibratedKSampler", 3, {**common, "steps": 5, "method": "timetuner", "sampler_name": "dpmpp_2m",
                                            "scheduler": "karras"},
                  conditioning(model, positive, negative, latent), title="TimeTuner on dpmpp_2m: 5 steps")
    shown = []
    for node, prefix in ((reference, "reference_40"), (builtin, "builtin_5"), (olss, "olss_5"),
                         (tuned, "timetuner_5")):
        shown.append(save(w, 4, (node, 0), vae, f"compare/{prefix}"))
    w.group("5 model evaluations", [builtin, olss, tuned])
    out.append(w)
    return out


def main():
    built = workflows()
    types = {n["type"] for w in built for n in w.nodes} - wf.FRONTEND_ONLY
    infos = wf.node_infos(sorted(types))
    folder = ROOT / "workflows"
    folder.mkdir(exist_ok=True)
    for w in built:
        path = folder / f"{w.name}.json"
        path.write_text(json.dumps(w.build(infos), indent=1) + "\n")
        print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
