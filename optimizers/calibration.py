"""The `Calibration` record: what was fitted, and exactly what it was fitted for.

One record holds the fits of one or more methods made from the same teacher run. It is plain data:
tensors (safetensors) plus JSON metadata, with a schema version; `from_tensors` validates
everything it reads, so a damaged or foreign file is refused with a message, never half-used.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field

import torch

SCHEMA_VERSION = 1
METADATA_KEY = "calibrated_samplers"


class CalibrationMismatch(ValueError):
    """A calibration used with a model, shape or setting it was not fitted for."""


@dataclass
class Calibration:
    family: str                                  # coordinates.FAMILIES
    fingerprint: str                             # of the model: weights, patches, model_sampling
    sigmas: torch.Tensor                         # the student schedule, descending, ending in 0
    cfg: float                                   # guidance scale the fits are valid for
    latent_shape: tuple                          # one sample's latent shape, e.g. (4, 64, 64)
    teacher: dict                                # steps, solver, seed, batch, methods, fixed sigmas
    fits: dict = field(default_factory=dict)     # method -> {name: tensor}
    diagnostics: dict = field(default_factory=dict)  # method -> JSON-able facts (per-step errors, cost)
    schema_version: int = SCHEMA_VERSION

    @property
    def nfe(self) -> int:
        return len(self.sigmas) - 1

    @property
    def methods(self) -> list[str]:
        return sorted(self.fits)

    def key(self) -> str:
        """What the record was fitted for, hashed: equal keys mean interchangeable calibrations.
        The same key is computed from a request before fitting (see `calibration_key`)."""
        return calibration_key(self.family, self.fingerprint, self.nfe, self.cfg, self.latent_shape, self.teacher)

    # --- (de)serialisation: tensors + one JSON string of metadata -----------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"sigmas": self.sigmas.detach().to("cpu", torch.float32).clone()}
        for method, tensors in self.fits.items():
            for name, t in tensors.items():
                out[f"{method}.{name}"] = t.detach().to("cpu").clone()
        return out

    def metadata(self) -> dict[str, str]:
        info = {"schema_version": self.schema_version, "family": self.family, "fingerprint": self.fingerprint,
                "cfg": self.cfg, "latent_shape": list(self.latent_shape), "teacher": self.teacher,
                "methods": {m: sorted(t) for m, t in self.fits.items()}, "diagnostics": self.diagnostics}
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
            sigmas = tensors["sigmas"]
            methods = info["methods"]
            fits = {m: {n: tensors[f"{m}.{n}"] for n in names} for m, names in methods.items()}
            record = cls(family=str(info["family"]), fingerprint=str(info["fingerprint"]), sigmas=sigmas,
                         cfg=float(info["cfg"]), latent_shape=tuple(int(v) for v in info["latent_shape"]),
                         teacher=dict(info["teacher"]), fits=fits, diagnostics=dict(info.get("diagnostics", {})))
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
        _check_schedule("sigmas", self.sigmas)
        if not math.isfinite(self.cfg) or not self.latent_shape or min(self.latent_shape) < 1:
            raise ValueError("cfg must be finite and latent_shape positive")
        for method, tensors in self.fits.items():
            if "sigmas" in tensors:
                _check_schedule(f"{method}.sigmas", tensors["sigmas"])
            for name, t in tensors.items():
                if not t.is_floating_point() and t.dtype not in (torch.int64, torch.int32):
                    raise ValueError(f"{method}.{name} has dtype {t.dtype}")
                if t.is_floating_point() and not torch.isfinite(t).all():
                    raise ValueError(f"{method}.{name} holds NaN or inf")

    # --- use ------------------------------------------------------------------------------
    def check_compatible(self, *, family=None, fingerprint=None, latent_shape=None, cfg=None, nfe=None):
        """Raise CalibrationMismatch naming the first setting that differs from the fitted one."""
        checks = [
            ("model family", family, self.family),
            ("model (its weights, LoRAs or sampling settings changed)", fingerprint, self.fingerprint),
            ("latent shape", None if latent_shape is None else tuple(latent_shape), self.latent_shape),
            ("steps (NFE)", nfe, self.nfe),
        ]
        for what, given, fitted in checks:
            if given is not None and given != fitted:
                raise CalibrationMismatch(f"this calibration was fitted for {what} {fitted}, not {given}: "
                                          "calibrate again for this setting")
        if cfg is not None and not math.isclose(cfg, self.cfg, rel_tol=1e-6, abs_tol=1e-6):
            raise CalibrationMismatch(f"this calibration was fitted at cfg {self.cfg:g}, not {cfg:g}: "
                                      "use that cfg or calibrate again")


def _check_schedule(name, s):
    if s.ndim != 1 or len(s) < 2 or not torch.isfinite(s).all() or s[-1] != 0 or not torch.all(s[1:] < s[:-1]):
        raise ValueError(f"{name} must be a finite, strictly decreasing 1-D schedule ending in 0")


def calibration_key(family, fingerprint, nfe, cfg, latent_shape, teacher) -> str:
    """Hash of everything a calibration is fitted for; `teacher` holds the teacher settings, the
    methods asked for and the fixed student sigmas if any (JSON-able)."""
    text = json.dumps({"family": family, "fingerprint": fingerprint, "nfe": int(nfe), "cfg": round(float(cfg), 6),
                       "latent_shape": list(latent_shape), "teacher": teacher}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
