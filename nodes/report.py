"""CalibrationReport: a picture of what a calibration holds and what it bought (drawn with Pillow)."""
import math

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from comfy.k_diffusion.sampling import get_sigmas_karras
from comfy_api.latest import io

from . import CATEGORY, CalibrationType
from .validation import choose

WIDTH, PANEL, MARGIN = 960, 330, 70
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"]
GREY = "#9a9a9a"


def _font(size):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:                     # Pillow without FreeType sizes
        return ImageFont.load_default()


class _Panel:
    """One plot: x linear, y linear or log10, in a box of the picture."""

    def __init__(self, draw, top, title, xs, ys, log=True, xlabel=""):
        self.draw, self.top, self.log = draw, top, log
        self.box = (MARGIN, top + 40, WIDTH - 220, top + PANEL - 40)
        values = [v for v in ys if v is not None and v > 0 and math.isfinite(v)] if log else list(ys)
        low, high = (min(values), max(values)) if values else (1e-3, 1.0)
        if log:
            low, high = math.floor(math.log10(low)), math.ceil(math.log10(high))
            high = max(high, low + 1)
        else:
            low, high = 0.0, high * 1.1 or 1.0
        self.y_range, self.x_range = (low, high), (min(xs), max(max(xs), min(xs) + 1))
        x0, y0, x1, y1 = self.box
        draw.text((x0, top + 8), title, fill="black", font=_font(18))
        draw.rectangle(self.box, outline="black")
        for tick in (range(int(low), int(high) + 1) if log else np.linspace(low, high, 5)):
            y = self.y(10.0 ** tick if log else tick)
            draw.line([(x0, y), (x1, y)], fill="#e6e6e6")
            draw.text((8, y - 7), f"1e{tick}" if log else f"{tick:.3g}", fill="black", font=_font(12))
        for tick in range(int(self.x_range[0]), int(self.x_range[1]) + 1):
            draw.text((self.x(tick) - 4, y1 + 4), str(tick), fill="black", font=_font(12))
        draw.text(((x0 + x1) // 2 - 20, y1 + 20), xlabel, fill="black", font=_font(12))

    def x(self, value):
        x0, _, x1, _ = self.box
        lo, hi = self.x_range
        return x0 + (value - lo) / (hi - lo) * (x1 - x0)

    def y(self, value):
        _, y0, _, y1 = self.box
        lo, hi = self.y_range
        v = math.log10(max(value, 10.0 ** lo)) if self.log else value
        return y1 - (v - lo) / (hi - lo) * (y1 - y0)

    def line(self, xs, ys, color, label, slot, dashed=False, marker=True):
        points = [(self.x(a), self.y(b)) for a, b in zip(xs, ys) if b is not None and b > 0 and math.isfinite(b)]
        for p, q in zip(points, points[1:]):
            if dashed:
                for t in np.linspace(0, 1, 12)[::2]:
                    s = t + 1 / 11
                    self.draw.line([(p[0] + (q[0] - p[0]) * t, p[1] + (q[1] - p[1]) * t),
                                    (p[0] + (q[0] - p[0]) * s, p[1] + (q[1] - p[1]) * s)], fill=color, width=2)
            else:
                self.draw.line([p, q], fill=color, width=2)
        if marker:
            for px, py in points:
                self.draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=color)
        legend_y = self.top + 44 + 18 * slot
        self.draw.line([(WIDTH - 205, legend_y + 7), (WIDTH - 180, legend_y + 7)], fill=color, width=3)
        self.draw.text((WIDTH - 175, legend_y), label, fill="black", font=_font(12))


def teacher_line(diagnostics) -> str:
    """" (N steps, its error ~E)": the teacher's length, and for teacher_steps auto its estimated error."""
    teacher = diagnostics.get("teacher") or {}
    if "steps" not in teacher:
        return ""
    estimate = f", its error ~{teacher['estimate']:.1e}" if "estimate" in teacher else ""
    return f" ({teacher['steps']} steps{estimate})"


def draw_report(calibration) -> Image.Image:
    diagnostics = calibration.diagnostics
    errors = diagnostics.get("validated") or diagnostics.get("calibration_batch", {})
    steps = calibration.steps
    height = 2 * PANEL + (PANEL if errors else 60) + 40
    image = Image.new("RGB", (WIDTH, height), "white")
    draw = ImageDraw.Draw(image)
    colors = {m: COLORS[i % len(COLORS)] for i, m in enumerate(calibration.methods)}

    # 1. student sigmas on a log axis, against Karras over the same range
    sigmas = {m: [float(s) for s in calibration.fits[m]["sigmas"] if s > 0] for m in calibration.methods}
    top = max(max(s) for s in sigmas.values())
    bottom = min(min(s) for s in sigmas.values())
    reference = get_sigmas_karras(steps, bottom, top)[:-1].tolist()
    denoise = calibration.settings.get("denoise")
    passes = "" if denoise is None else f", denoise {denoise['denoise']:g} from {denoise['starts'].replace('_', ' ')}"
    panel = _Panel(draw, 0, f"Student sigmas ({calibration.family}, cfg {calibration.cfg:g}{passes})",
                   list(range(steps + 1)), [v for s in sigmas.values() for v in s] + reference,
                   xlabel="step")
    panel.line(range(len(reference)), reference, GREY, "karras", 0, dashed=True)
    for slot, (m, values) in enumerate(sigmas.items(), start=1):
        panel.line(range(len(values)), values, colors[m], m, slot)

    # 2. per-step fit error (dashed: the plain solver on the same state, where the method has one)
    curves = {m: diagnostics.get(m, {}) for m in calibration.methods}
    ys = [v for c in curves.values() for key in ("step_error", "plain_step_error") for v in c.get(key, [])]
    panel = _Panel(draw, PANEL, "Per-step fit error on the calibration batch (dashed: plain solver)",
                   list(range(1, steps + 1)), ys or [1.0], xlabel="step")
    for slot, (m, c) in enumerate(curves.items()):
        xs = range(1, len(c.get("step_error", [])) + 1)
        panel.line(xs, c.get("step_error", []), colors[m], m, slot)
        if c.get("plain_step_error"):
            panel.line(range(1, len(c["plain_step_error"]) + 1), c["plain_step_error"], colors[m], "", slot,
                       dashed=True, marker=False)

    # 3. what calibration bought: validated RMSE against the teacher's final latent (methods: on the noises they
    #    were not fitted on), beside the built-ins on the calibration batch
    y = 2 * PANEL
    if not errors:
        draw.text((MARGIN, y + 10), "No teacher run in this calibration: no comparison with built-ins.",
                  fill="black", font=_font(14))
        return image
    chosen = choose(errors, steps) if "validated" in diagnostics else None
    draw.text((MARGIN, y + 8), f"Validated RMSE against the teacher{teacher_line(diagnostics)}, {steps} steps "
              "(methods: on noises they were not fitted on); > auto's choice", fill="black", font=_font(15))
    ranked = sorted(errors.items(), key=lambda kv: kv[1]["rmse"])
    best = max(v["rmse"] for _, v in ranked) or 1.0
    row = (PANEL - 60) / max(len(ranked), 1)
    for i, (label, entry) in enumerate(ranked):
        value = entry["rmse"]
        y0 = y + 40 + i * row
        length = (WIDTH - 2 * MARGIN - 310) * value / best
        draw.rectangle([MARGIN + 230, y0, MARGIN + 230 + length, y0 + row * 0.7], fill=colors.get(label, GREY))
        plain = (diagnostics.get(label, {}).get("validation") or {}).get("kept") == "plain"
        mark = "> " if label == chosen else ""
        draw.text((MARGIN - 14, y0), f"{mark}{label}{' (plain)' if plain else ''} ({entry['evaluations']} evaluations)",
                  fill="black", font=_font(12))
        draw.text((MARGIN + 236 + length, y0), f"{value:.4f}", fill="black", font=_font(12))
    near = calibration.borrow_range("auto")
    if near:
        (low, high), (small, large) = near["cfg"], near["sides"]
        sizes = "at this latent size only" if small == large == 1 else \
            f"latent sides {small:g} to {large:g} times these"
        draw.text((MARGIN, height - 30), f"auto may be borrowed at cfg {calibration.cfg + low:g} to "
                  f"{calibration.cfg + high:g}, {sizes} (measured within 1.2x of a calibration made there)",
                  fill="black", font=_font(13))
    return image


class CalibrationReport(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CalibrationReport",
            display_name="Calibration Report",
            category=CATEGORY,
            description="A picture of a calibration: its student sigmas against Karras, the per-step fit error of "
                        "each method, and each method's validated error against the teacher (on calibration noises "
                        "it was not fitted on) next to built-in samplers, ranked, with auto's choice marked.",
            inputs=[CalibrationType.Input("calibration", tooltip="From Calibrate Sampler or Load Calibration.")],
            outputs=[io.Image.Output(display_name="image")],
        )

    @classmethod
    def execute(cls, calibration) -> io.NodeOutput:
        picture = np.asarray(draw_report(calibration), dtype=np.float32) / 255.0
        return io.NodeOutput(torch.from_numpy(picture)[None])
