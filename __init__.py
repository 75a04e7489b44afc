"""Calibrated Samplers: few-step samplers and schedules fitted to your own model (ComfyUI entry point)."""
from .nodes import comfy_entrypoint

__all__ = ["comfy_entrypoint"]
