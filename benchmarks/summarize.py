"""Markdown summaries of a quality benchmark's JSON (benchmarks/results/*.json), as quoted in the README.

    $VENV/bin/python benchmarks/summarize.py benchmarks/results/calibrated.json

Table 1: each calibrated method's held-out RMSE against the teacher, as a ratio to its plain solver on
the same sigmas (IIA-DDIM to ddim, IIA/BIIA-Heun to heun, TimeTuner(X) to X), per scheduler.
Table 2: the best of each method (over schedulers) and the best built-in, per model and NFE.
Table 3 (the README's headline): each method at its best scheduler (TimeTuner: and base sampler) as a
ratio to the best built-in, per model and NFE. With `auto` records: `auto` against the held-out oracle and
against the built-in the calibration itself found best, then every validated error beside its held-out one.
"""
import itertools
import json
import sys
from collections import defaultdict

PLAIN = {"iia_ddim": "ddim", "biia_heun": "heun", "iia_heun": "heun"}
SHORT = {"karras": "K", "beta": "B", "simple": "S", "kl_optimal": "KL"}


def plain_of(sampler):
    return sampler[len("timetuner("):-1] if sampler.startswith("timetuner(") else PLAIN.get(sampler)


def label(record):
    """A method's name without its calibration batch; auto calibrated on seed s > 0 ("auto_b8_s3") is "auto s3"."""
    name, _, batch = record["method"].rpartition("_b")
    name = f"{name} s{batch.split('_s')[1]}" if "_s" in batch else name or batch
    return f"{name}({plain_of(record['sampler'])})" if record["sampler"].startswith("timetuner(") else name


def best_by(records, name_of):
    """{(model, NFE): {name: lowest-RMSE record}}, name "built-in" for every built-in, else name_of(record)."""
    best = defaultdict(dict)
    for r in records:
        key = (r["model"], r["nfe"])
        name = "built-in" if r["method"] == "builtin" else name_of(r)
        if name not in best[key] or r["rmse"] < best[key][name]["rmse"]:
            best[key][name] = r
    return best


def tables(records):
    plain = {(r["model"], r["nfe"], r["sampler"], r["scheduler"]): r["rmse"] for r in records
             if r["method"] == "builtin"}
    ratios = defaultdict(dict)
    best = best_by(records, label)
    for r in records:
        base = plain_of(r["sampler"]) if r["method"] != "builtin" else None
        if base and (r["model"], r["nfe"], base, r["scheduler"]) in plain:
            ratios[(r["model"], label(r))][(r["nfe"], r["scheduler"])] = r["rmse"] / plain[
                (r["model"], r["nfe"], base, r["scheduler"])]
    nfes = sorted({r["nfe"] for r in records})
    out = ["Ratio of held-out RMSE to the plain solver on the same sigmas (schedulers: "
           + ", ".join(f"{v} {k}" for k, v in SHORT.items()) + "; below 1 is better)", "",
           "| model | method | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---|---|" + "---|" * len(nfes)]
    for (model, name), values in sorted(ratios.items()):
        cells = []
        for n in nfes:
            cell = [f"{SHORT.get(s, s)} {v:.2f}" for (k, s), v in sorted(values.items()) if k == n]
            cells.append(" ".join(cell))
        out.append(f"| {model} | {name} | " + " | ".join(cells) + " |")
    methods = sorted({m for v in best.values() for m in v} - {"built-in"})
    out += ["", best_table(best, methods, "Best held-out RMSE of each method over schedulers, and the best built-in "
                                          "(14 samplers x 11+ schedulers)",
                           lambda b: f"{b['rmse']:.4f} ({b['sampler']}/{b['scheduler']})",
                           lambda r, b: f"{r['rmse']:.4f}")]
    return "\n".join(out)


def best_table(best, methods, title, builtin_cell, cell):
    """A table per (model, NFE) of `best_by`'s records: the best built-in's `builtin_cell(b)`, then each method's
    `cell(record, b)`."""
    out = [title, "", "| model | NFE | best built-in | " + " | ".join(methods) + " |",
           "|---|---|---|" + "---|" * len(methods)]
    for (model, n), found in sorted(best.items()):
        b = found["built-in"]
        cells = [cell(found[m], b) if m in found else "" for m in methods]
        out.append(f"| {model} | {n} | {builtin_cell(b)} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def family(record):
    """The method a record belongs to in the headline: timetuner(X) -> timetuner, iia_ddim_teacher -> iia_ddim."""
    name = label(record)
    return "timetuner" if name.startswith("timetuner(") else name.removesuffix("_teacher")


def headline(records, methods=("olss", "olss_p", "iia_ddim", "iia_heun", "timetuner", "trust_region", "auto")):
    best = best_by(records, family)
    methods = [m for m in methods if any(m in found for found in best.values())]
    return best_table(best, methods, "Each method at its best scheduler against the best built-in, `(x)`: ratio of "
                                     "held-out RMSE",
                      lambda b: f"{b['rmse']:.4f} {b['sampler']}/{b['scheduler']}",
                      lambda r, b: f"{r['rmse']:.4f} ({r['rmse'] / b['rmse']:.2f}x)")


def validation(entries):
    """Each method's (and built-in's) validated error on the calibration batch beside its held-out error."""
    out = ["Validated (calibration batch: methods on the half they were not fitted on) against held-out RMSE", "",
           "| model | NFE | label | evaluations | validated | held-out | held-out / validated |", "|---|---|---|---|---|---|---|"]
    for v in entries:
        out.append(f"| {v['model']} | {v['nfe']} | {v['label']} | {v['evaluations']} | {v['validated']:.4f} | "
                   f"{v['held_out']:.4f} | {v['held_out'] / max(v['validated'], 1e-12):.2f} |")
    return "\n".join(out)


def auto_against_knowable(records, entries):
    """`auto` per model and NFE (ratio of held-out RMSE) against two built-ins: the best on the held-out noises
    themselves (chosen by looking at the test set: what no calibration can know), and the one that did best on
    the calibration noises (what the same calibration knows; `auto` could always have sampled it). Last, the best
    of auto's own candidates on the held-out noises against that oracle: what a perfect choice would reach."""
    best = best_by(records, family)
    out = ["`auto` against the best built-in on the held-out noises (an oracle) and against the built-in that did "
           "best on the calibration noises, ratio of held-out RMSE; last, the best of auto's candidates on the "
           "held-out noises (a perfect choice) against the oracle", "",
           "| model | NFE | auto's choice | auto | oracle built-in | vs oracle | calibration's best built-in | "
           "vs it | best candidate | vs oracle |", "|---|---|---|---|---|---|---|---|---|---|"]
    seeds = sorted({v.get("seed", 0) for v in entries})
    for ((model, n), found), seed in itertools.product(sorted(best.items()), seeds):
        name = f"auto s{seed}" if seed else "auto"
        own = [v for v in entries if v["model"] == model and v["nfe"] == n and v.get("seed", 0) == seed
               and v["evaluations"] <= n]
        known = [v for v in own if "/" in v["label"]]
        if name not in found or not known:
            continue
        ours, oracle = found[name], found["built-in"]
        knowable = min(known, key=lambda v: v["validated"])
        perfect = min(own, key=lambda v: v["held_out"])
        row = f"{model} (seed {seed})" if len(seeds) > 1 else model
        out.append(f"| {row} | {n} | {ours['sampler'][5:-1]} | {ours['rmse']:.4f} | {oracle['rmse']:.4f} "
                   f"{oracle['sampler']}/{oracle['scheduler']} | {ours['rmse'] / oracle['rmse']:.2f}x | "
                   f"{knowable['held_out']:.4f} {knowable['label']} | {ours['rmse'] / knowable['held_out']:.2f}x | "
                   f"{perfect['held_out']:.4f} {perfect['label']} | {perfect['held_out'] / oracle['rmse']:.2f}x |")
    return "\n".join(out)


def trust_region_against_its_sampler(records):
    """The trust-region schedule (no calibration) against the best built-in schedule of the same sampler."""
    best = defaultdict(lambda: float("inf"))
    for r in records:
        if r["method"] == "builtin":
            key = (r["model"], r["nfe"], r["sampler"])
            best[key] = min(best[key], r["rmse"])
    ratios = defaultdict(dict)
    for r in records:
        key = (r["model"], r["nfe"], r["sampler"])
        if r["method"] == "trust_region" and key in best:
            ratios[(r["model"], r["sampler"])][r["nfe"]] = r["rmse"] / best[key]
    nfes = sorted({n for v in ratios.values() for n in v})
    out = ["Trust-region sigmas against the same sampler's best built-in schedule, ratio of held-out RMSE", "",
           "| model | sampler | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---|---|" + "---|" * len(nfes)]
    for (model, sampler), values in sorted(ratios.items()):
        out.append(f"| {model} | {sampler} | " + " | ".join(f"{values[n]:.2f}" if n in values else "" for n in nfes)
                   + " |")
    return "\n".join(out)


if __name__ == "__main__":
    data = json.load(open(sys.argv[1]))
    records = data["records"]
    print(tables(records) + "\n\n" + headline(records))
    if any(r["method"] == "trust_region" for r in records):
        print("\n" + trust_region_against_its_sampler(records))
    if data.get("validation"):
        print("\n" + auto_against_knowable(records, data["validation"]))
        print("\n" + validation(data["validation"]))
