"""The `Calibration` record: what was fitted, and exactly what it was fitted for.

One record holds the fits of one or more methods made from the same teacher run. It is plain data:
tensors (safetensors) plus JSON metadata, with a schema version; `from_tensors` validates
everything it reads, so a damaged or foreign file is refused with a message, never half-used.
Schema 2 (this one) names what it holds plainly: `steps`, `settings` (the teacher's inside), each
method's sigmas and model evaluations; a schema-1 record is refused by its version, to be calibrated again.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field

import torch

SCHEMA_VERSION = 2
METADATA_KEY = "calibrated_samplers"


class CalibrationMismatch(ValueError):
    """A calibration used with a model, shape or setting it was not fitted for."""


@dataclass
class Calibration:
    family: str                                  # coordinates.FAMILIES
    fingerprint: str                             # of the model: weights, patches, model_sampling
    cfg: float                                   # guidance scale the fits are valid for
    latent_shape: tuple                          # one sample's latent shape, e.g. (4, 64, 64)
    steps: int                                   # sampling steps, as KSampler's steps
    settings: dict                               # what the fits depend on besides the model: the teacher's
                                                 # settings, the methods asked for, scheduler, sampler, ...
    fits: dict = field(default_factory=dict)     # method -> {name: tensor}, always with the "sigmas" it samples on
    evaluations: dict = field(default_factory=dict)   # method -> model evaluations per sample when sampling
    diagnostics: dict = field(default_factory=dict)   # method -> JSON-able facts (per-step errors, cost)
    schema_version: int = SCHEMA_VERSION

    @property
    def methods(self) -> list[str]:
        return sorted(self.fits)

    def key(self) -> str:
        """What the record was fitted for, hashed: equal keys mean interchangeable calibrations.
        The same key is computed from a request before fitting (see `calibration_key`)."""
        return calibration_key(self.family, self.fingerprint, self.steps, self.cfg, self.latent_shape, self.settings)

    # --- (de)serialisation: tensors + one JSON string of metadata -----------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"{method}.{name}": t.detach().to("cpu").clone()
                for method, tensors in self.fits.items() for name, t in tensors.items()}

    def metadata(self) -> dict[str, str]:
        info = {"schema_version": self.schema_version, "family": self.family, "fingerprint": self.fingerprint,
                "cfg": self.cfg, "latent_shape": list(self.latent_shape), "steps": self.steps,
                "settings": self.settings, "methods": {m: sorted(t) for m, t in self.fits.items()},
                "evaluations": self.evaluations, "diagnostics": self.diagnostics}
        return {METADATA_KEY: json.dumps(info, sort_keys=True)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> "Calibration":
        """Rebuild and validate; raises ValueError naming what is wrong."""
        if not metadata or METADATA_KEY not in metadata:
            raise ValueError("not a Calibrated Samplers calibration (no metadata)")
        try:
            info = json.loads(metadata[METADATA_KEY])
        except json.JSONDecodeError as e:
            raise ValueError(f"damaged metadata: {e}") from None
        if not isinstance(info, dict):
            raise ValueError("damaged metadata: not a JSON object")
        version = info.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(f"schema version {version!r}, this version of the pack reads {SCHEMA_VERSION}: "
                             "calibrate again")
        try:
            methods = info["methods"]
            fits = {m: {n: tensors[f"{m}.{n}"] for n in names} for m, names in methods.items()}
            record = cls(family=str(info["family"]), fingerprint=str(info["fingerprint"]), cfg=float(info["cfg"]),
                         latent_shape=tuple(int(v) for v in info["latent_shape"]), steps=int(info["steps"]),
                         settings=dict(info["settings"]), fits=fits,
                         evaluations={str(m): int(n) for m, n in info["evaluations"].items()},
                         diagnostics=dict(info.get("diagnostics", {})))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"damaged or incomplete calibration: {type(e).__name__}: {e}") from None
        extra = set(tensors) - set(record.tensors())
        if extra:
            raise ValueError(f"unexpected tensors {sorted(extra)}")
        record.validate()
        return record

    def validate(self):
        from .coordinates import FAMILIES
        if self.family not in FAMILIES:
            raise ValueError(f"unknown model family {self.family!r}")
        if not math.isfinite(self.cfg) or not self.latent_shape or min(self.latent_shape) < 1 or self.steps < 1:
            raise ValueError("cfg must be finite, latent_shape and steps positive")
        if not self.fits:
            raise ValueError("a calibration holds at least one method's fit")
        for method, tensors in self.fits.items():
            if "sigmas" not in tensors:
                raise ValueError(f"{method} has no sigmas")
            check_schedule(tensors["sigmas"], f"{method}.sigmas")
            if len(tensors["sigmas"]) != self.steps + 1:
                raise ValueError(f"{method}.sigmas has {len(tensors['sigmas']) - 1} steps, the calibration "
                                 f"{self.steps}")
            if not isinstance(self.evaluations.get(method), int) or self.evaluations[method] < 1:
                raise ValueError(f"{method} has no model evaluation count")
            for name, t in tensors.items():
                if not t.is_floating_point() and t.dtype not in (torch.int64, torch.int32):
                    raise ValueError(f"{method}.{name} has dtype {t.dtype}")
                if t.is_floating_point() and not torch.isfinite(t).all():
                    raise ValueError(f"{method}.{name} holds NaN or inf")

    # --- use ------------------------------------------------------------------------------
    def borrow_range(self, label) -> dict | None:
        """The nearby settings at which `label` (a method, or "auto": what KSampler (Calibrated)'s auto picks) may be
        used: {"cfg": [low, high] offsets from this cfg, "sides": [low, high] ratios of each latent side}, as stored
        when the calibration was made; None: only its own settings."""
        return (self.diagnostics.get("borrowable") or {}).get(label)

    def check_compatible(self, *, family=None, fingerprint=None, latent_shape=None, cfg=None, steps=None,
                         borrow=None) -> list[str]:
        """Raise CalibrationMismatch naming the first setting that differs from the fitted one, unless it is the cfg
        or the latent size and within `borrow` (a `borrow_range`). Returns what is borrowed, in words (empty when
        nothing is)."""
        checks = [
            ("model family", family, self.family),
            ("model (its weights, LoRAs or sampling settings changed)", fingerprint, self.fingerprint),
            ("steps", steps, self.steps),
        ]
        for what, given, fitted in checks:
            if given is not None and given != fitted:
                raise CalibrationMismatch(f"this calibration was fitted for {what} {fitted}, not {given}: "
                                          "calibrate again for this setting")
        borrowed = []
        if latent_shape is not None and tuple(latent_shape) != self.latent_shape:
            given = tuple(latent_shape)
            low, high = (borrow or {}).get("sides", (1.0, 1.0))
            if len(given) != len(self.latent_shape) or given[0] != self.latent_shape[0] or not all(
                    low <= g / f <= high for g, f in zip(given[1:], self.latent_shape[1:])):
                within = f" (it may be borrowed for sides {low:g} to {high:g} times its own)" if borrow else ""
                raise CalibrationMismatch(f"this calibration was fitted for latent shape {self.latent_shape}, not "
                                          f"{given}{within}: calibrate again for this setting")
            borrowed.append(f"latent shape {given} (made for {self.latent_shape})")
        if cfg is not None and not math.isclose(cfg, self.cfg, rel_tol=1e-6, abs_tol=1e-6):
            low, high = (borrow or {}).get("cfg", (0.0, 0.0))
            if not low - 1e-6 <= cfg - self.cfg <= high + 1e-6:
                within = f" (it may be borrowed from cfg {self.cfg + low:g} to {self.cfg + high:g})" if borrow else ""
                raise CalibrationMismatch(f"this calibration was fitted at cfg {self.cfg:g}, not {cfg:g}{within}: "
                                          "use that cfg or calibrate again")
            borrowed.append(f"cfg {cfg:g} (made for {self.cfg:g})")
        return borrowed


def check_schedule(sigmas, name="sigmas"):
    """Raise ValueError naming `name` unless it is a finite, strictly decreasing 1-D schedule ending in 0."""
    s = torch.as_tensor(sigmas)
    if s.ndim != 1 or len(s) < 2 or not torch.isfinite(s).all() or s[-1] != 0 or not torch.all(s[1:] < s[:-1]):
        raise ValueError(f"{name} must be a 1-D schedule that is finite, decreases strictly and ends in 0 (as a "
                         "scheduler node gives them)")


def check_same_sigmas(given, fitted, what):
    """Raise ValueError unless `given` are the sigmas `what` was fitted for (to float32 rounding). The final
    sigma, 0, is not compared: ComfyUI's uni_pc writes 0.001 over it in place, so a schedule that one such run
    has used ends in 0.001."""
    ours = torch.as_tensor(fitted).detach().cpu().double()
    theirs = torch.as_tensor(given).detach().cpu().double()
    if theirs.shape != ours.shape or not torch.allclose(theirs[:-1], ours[:-1], rtol=1e-5, atol=1e-6):
        raise ValueError(f"{what} was fitted for the {len(ours) - 1}-step sigmas {[round(float(v), 4) for v in ours]}, "
                         f"not {[round(float(v), 4) for v in theirs]}: sample with its own sigmas "
                         "(Calibration Sigmas)")


def calibration_key(family, fingerprint, steps, cfg, latent_shape, settings) -> str:
    """Hash of everything a calibration is fitted for; `settings` (JSON-able) holds the teacher's settings,
    the methods asked for, the given student sigmas if any and each method's own settings."""
    text = json.dumps({"family": family, "fingerprint": fingerprint, "steps": int(steps), "cfg": round(float(cfg), 6),
                       "latent_shape": list(latent_shape), "settings": settings}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
