"""Nearby settings: the cfg offsets and latent side ratios at which a calibration may be used though it was made for
another cfg or size, per method (and for "auto", KSampler (Calibrated)'s pick), as measured by
benchmarks/transfer.py and written to nearby.json: the widest range on the measured grid where every test model's
held-out error with the borrowed calibration stayed within the tolerance of a calibration made for that setting. A
calibration stores the ranges of what it holds when it is made, so what it accepts is the measurement it was made
with (`Calibration.borrow_range`)."""
import json
from pathlib import Path

FILE = Path(__file__).with_name("nearby.json")


def ranges_for(labels) -> dict:
    """{label: {"cfg": [low, high], "sides": [low, high]}} for the labels the measurement covers."""
    table = json.loads(FILE.read_text())["methods"] if FILE.exists() else {}
    return {label: table[label] for label in labels if label in table}
