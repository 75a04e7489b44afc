"""The model fingerprint: what a calibration is fitted for on the model's side (weights, LoRA and other
patches, the model_sampling object that shift nodes replace, wrappers and CFG functions)."""
import hashlib

import torch


def _digest_value(digest, value, depth=0):
    if depth > 6:
        return
    if torch.is_tensor(value):
        flat = value.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        sample = flat[::step].to("cpu", torch.float64)
        digest.update(f"{tuple(value.shape)}{value.dtype}".encode())
        digest.update(sample.numpy().tobytes())
    elif isinstance(value, (list, tuple)):
        for v in value:
            _digest_value(digest, v, depth + 1)
    elif isinstance(value, dict):
        for k in sorted(value, key=str):
            digest.update(str(k).encode())
            _digest_value(digest, value[k], depth + 1)
    elif isinstance(value, (int, float, str, bool)) or value is None:
        digest.update(repr(value).encode())
    else:
        digest.update(getattr(value, "__qualname__", type(value).__qualname__).encode())


_WEIGHTS_DIGEST = "_calibrated_samplers_weights_digest"


def _weights_digest(model) -> bytes:
    """A hash of the diffusion model's own weights (a strided sample of every tensor), made once per model.

    ComfyUI applies LoRA and other weight patches in place while a model is loaded, keeping the original
    tensors in the patcher's `backup` (shared by its clones); those originals are hashed, so the hash is
    the same loaded or not, and the patches are hashed on their own (`model_fingerprint`)."""
    base = model.model
    cached = base.__dict__.get(_WEIGHTS_DIGEST)
    if cached is None:
        digest = hashlib.sha256()
        backup = getattr(model, "backup", {})
        for name, t in base.diffusion_model.state_dict().items():
            original = backup.get(f"diffusion_model.{name}")
            digest.update(name.encode())
            _digest_value(digest, t if original is None else original.weight)
        cached = digest.digest()
        base.__dict__[_WEIGHTS_DIGEST] = cached
    return cached


def model_fingerprint(model) -> str:
    """A hash of what changes the model's output: weights (`_weights_digest`), LoRA and other weight patches
    with their strengths, the model_sampling object (shift nodes replace it), and the names of installed
    wrappers and CFG functions."""
    digest = hashlib.sha256()
    base = model.model
    digest.update(f"{type(base).__name__}:{base.model_type.name}".encode())
    digest.update(_weights_digest(model))
    _digest_value(digest, model.patches)
    ms = model.get_model_object("model_sampling")
    digest.update(type(ms).__mro__[1].__name__.encode())
    _digest_value(digest, dict(ms.state_dict()))
    for attr in ("shift", "multiplier", "sigma_data"):
        _digest_value(digest, getattr(ms, attr, None))
    _digest_value(digest, {k: v for k, v in model.model_options.items() if k != "transformer_options"})
    _digest_value(digest, model.model_options.get("transformer_options", {}).get("patches", {}))
    return digest.hexdigest()[:20]
