"""Calibrated Samplers: few-step samplers and schedules fitted to your own model (ComfyUI entry point)."""
if __package__:     # ComfyUI imports the pack as a package; pytest may import this file alone (folder named
    from .nodes import comfy_entrypoint     # e.g. "calibrated-samplers"): nothing to register then

    __all__ = ["comfy_entrypoint"]
