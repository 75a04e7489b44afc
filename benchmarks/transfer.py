"""How a calibration transfers to nearby settings: made at cfg 3 and an 8x8 latent, used at another cfg or latent
size, against a calibration made for that setting, on held-out seeds.

    make bench-transfer                                  # digits and closed-form models, NFE 5
    make bench-transfer ARGS="--models sharp_sd15 --write"

Each calibration is made by the nodes' own `fit` as KSampler (Calibrated) makes it (method auto, scheduler auto,
teacher_steps auto, calibration batch 8). At each setting, every method both calibrations hold, and `auto`'s
choice, are sampled on 16 held-out noises (the calibration's prompts) and measured against a 500-step teacher at
that setting; the ratio is the borrowed calibration's error over the own calibration's. Latent sizes change on the
digits models only (a U-Net of any size; the closed-form mixture is 8x8 only).

`--write` turns the measurement into the ranges the pack accepts (nodes/nearby.json): per method, the widest cfg
offsets and latent side ratios around the calibration's own, on the measured grid, inside which every model's ratio
stays at most TOLERANCE. A calibration stores the ranges of its methods when it is made.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import common
import torch

from calibrated_samplers.nodes.calibrate import fit
from calibrated_samplers.nodes.validation import choose

MODELS = ["digits_eps", "digits_flow", "sharp_sd15", "sharp_flux"]
SIZED = ["digits_eps", "digits_flow"]
BASE_CFG, BASE_SIDES = 3.0, (8, 8)
CFG_OFFSETS = [-2.0, -1.0, -0.5, 0.5, 1.0, 2.0]
SIDE_RATIOS = [(0.5, 0.5), (2.0, 2.0), (1.0, 2.0), (2.0, 1.0)]
TOLERANCE = 1.2
CALIBRATION_BATCH = 8
BORROW_FILE = Path(__file__).resolve().parents[1] / "nodes" / "nearby.json"


def case_for(name, cfg, sides, batch):
    case = common.Case.make(name, cfg, batch, labels=torch.arange(batch) % CALIBRATION_BATCH)
    case.noise = common.noise_batch(batch, common.HELD_OUT_SEED, (case.noise.shape[1], *sides))
    return case


def calibrate(case, nfe):
    run = common.calibration_run(case, CALIBRATION_BATCH, nfe, 0, method="auto", scheduler="auto",
                                 labels=torch.arange(CALIBRATION_BATCH) % 10)
    with torch.inference_mode():
        return fit(run, tuple(case.noise.shape[1:]))


def errors(case, calibration, nfe):
    """{method or "auto": held-out RMSE at the case's setting}."""
    out = {}
    for label in [*calibration.fits, "auto"]:
        chosen = choose(calibration.diagnostics["validated"], nfe) if label == "auto" else label
        sampler, sigmas = common.candidate_sampler(calibration, chosen, case.schedule)
        out[label] = common.rmse(case.sample(sampler, sigmas), case.reference)
    return out


def measure(name, nfe, batch):
    start = time.perf_counter()
    base = calibrate(case_for(name, BASE_CFG, BASE_SIDES, CALIBRATION_BATCH), nfe)
    targets = [("cfg", offset, BASE_CFG + offset, BASE_SIDES) for offset in CFG_OFFSETS]
    if name in SIZED:
        targets += [("sides", list(r), BASE_CFG, (int(BASE_SIDES[0] * r[0]), int(BASE_SIDES[1] * r[1])))
                    for r in SIDE_RATIOS]
    rows = []
    for kind, change, cfg, sides in targets:
        case = case_for(name, cfg, sides, batch)
        case.reference = case.teacher(500)
        own = calibrate(case_for(name, cfg, sides, CALIBRATION_BATCH), nfe)
        borrowed, fitted = errors(case, base, nfe), errors(case, own, nfe)
        ratios = {m: borrowed[m] / fitted[m] for m in borrowed if m in fitted}
        rows.append({"model": name, "nfe": nfe, "kind": kind, "change": change, "cfg": cfg, "sides": list(sides),
                     "borrowed": borrowed, "own": fitted, "ratio": ratios})
        print(f"{name:12s} NFE {nfe} {kind} {change}: " + ", ".join(f"{m} {r:.2f}" for m, r in ratios.items()),
              flush=True)
    print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)
    return rows


def widest(points):
    """The widest [low, high] around the own setting (0 offset, or side ratio 1) whose measured points all pass:
    `points` {value: passed}, the own setting counted as passing."""
    below = sorted((v for v in points if v < 0), reverse=True)
    above = sorted(v for v in points if v > 0)
    low = high = 0.0
    for v in below:
        if not points[v]:
            break
        low = v
    for v in above:
        if not points[v]:
            break
        high = v
    return [low, high]


def ranges(rows):
    """{method: {"cfg": [low offset, high offset], "sides": [low ratio, high ratio]}} from the measured rows: every
    model's ratio at most TOLERANCE (a method some model did not hold is judged on those that did). Sides: a ratio
    range passes where every measured size whose side ratios both lie in it passed."""
    methods = sorted({m for r in rows for m in r["ratio"]})
    out = {}
    for m in methods:
        cfg = {}
        for r in rows:
            if r["kind"] == "cfg" and m in r["ratio"]:
                cfg[r["change"]] = cfg.get(r["change"], True) and r["ratio"][m] <= TOLERANCE
        sized = [r for r in rows if r["kind"] == "sides" and m in r["ratio"]]
        sides = [1.0, 1.0]
        for low, high in ([0.5, 2.0], [1.0, 2.0], [0.5, 1.0]):
            inside = [r for r in sized if all(low <= v <= high for v in r["change"])]
            if inside and all(r["ratio"][m] <= TOLERANCE for r in inside):
                sides = [low, high]
                break
        out[m] = {"cfg": widest(cfg), "sides": sides}
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="*", default=MODELS, help="models to measure (none: only --merge)")
    parser.add_argument("--nfe", nargs="+", type=int, default=[5])
    parser.add_argument("--batch", type=int, default=16, help="held-out samples per setting")
    parser.add_argument("--out", default=str(common.RESULTS / "transfer"))
    parser.add_argument("--merge", nargs="*", default=[], help="earlier --out JSON files to add to the ranges")
    parser.add_argument("--write", action="store_true", help=f"write the accepted ranges to {BORROW_FILE.name}")
    args = parser.parse_args()
    rows = [row for path in args.merge for row in json.loads(Path(path).read_text())]
    measured = [row for name in args.models for nfe in args.nfe for row in measure(name, nfe, args.batch)]
    rows += measured
    Path(args.out + ".json").write_text(json.dumps(rows, indent=1))
    accepted = ranges(rows)
    lines = [f"Borrowed calibration (cfg {BASE_CFG:g}, 8x8) / own calibration, held-out RMSE at the new setting; "
             f"accepted where every model is at most {TOLERANCE}x.", "",
             "| model | NFE | change | " + " | ".join(sorted(accepted)) + " |",
             "|---|---|---|" + "---|" * len(accepted)]
    for r in rows:
        change = f"cfg {r['change']:+g}" if r["kind"] == "cfg" else f"{r['sides'][0]}x{r['sides'][1]}"
        lines.append(f"| {r['model']} | {r['nfe']} | {change} | " +
                     " | ".join(f"{r['ratio'][m]:.2f}" if m in r["ratio"] else "" for m in sorted(accepted)) + " |")
    lines += ["", "| method | cfg offsets accepted | latent side ratios accepted |", "|---|---|---|"]
    lines += [f"| {m} | {a['cfg'][0]:+g} to {a['cfg'][1]:+g} | {a['sides'][0]:g} to {a['sides'][1]:g} |"
              for m, a in accepted.items()]
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if args.write:
        models = sorted({r["model"] for r in rows})
        BORROW_FILE.write_text(json.dumps({"tolerance": TOLERANCE, "measured_on": models, "base_cfg": BASE_CFG,
                                           "command": "benchmarks/transfer.py " + " ".join(sys.argv[1:]),
                                           "methods": accepted},
                                          indent=1, sort_keys=True) + "\n")
        print(f"wrote {BORROW_FILE}")


if __name__ == "__main__":
    main()
