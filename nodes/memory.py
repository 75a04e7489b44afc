"""What a calibration needs in memory, estimated from its request before the first model call.

Host: the teacher's whole trajectory (every state and output of the calibration batch, float32 or, above
2 GiB, float16), the teacher states the fits target (float32, a few per student step), OLSS's Gram work
buffers (256 MiB at most) and the sampling runs' own latents. Device: one batched model call on the
calibration batch with its unconditional half (the model's `memory_required` for twice the batch, as ComfyUI
estimates a guided call), beside the model's weights. Validation holds half the trajectory again (the fitting
half's copy).
"""
import math

import psutil

import comfy.model_management

from ..optimizers.teacher import Trajectory
from .run import auto_start

GRAM_WORKSPACE = 256 << 20          # olss.gram_matrix reads the trajectory in buffers of at most this size


def _teacher_steps(request, teacher_steps=None) -> int:
    """The teacher length an estimate is for: the one given, the request's, or teacher_steps auto's first."""
    return teacher_steps or request.teacher_steps or auto_start(request.steps)


def estimate(model, request, latent_shape, teacher_steps=None) -> dict:
    """{"host": bytes, "device": bytes} a calibration of this request needs at its peak, with a teacher of
    `teacher_steps` (default: the request's, or for teacher_steps auto the first length it tries)."""
    numel = request.calibration_batch * math.prod(latent_shape)
    teacher_steps = _teacher_steps(request, teacher_steps)
    trajectory = Trajectory.bytes_for(teacher_steps, numel) if request.needs_teacher else 0
    host = trajectory + trajectory // 2                       # validation's copy of the fitting half
    host += 4 * numel * (2 * request.steps + 8)               # fit targets, sampling runs' latents and outputs
    host += GRAM_WORKSPACE if request.needs_teacher else 0
    shape = [2 * request.calibration_batch, *latent_shape]
    device = int(model.model.memory_required(shape)) + int(model.model_size())
    return {"host": host, "device": device}


def check(model, request, latent_shape, teacher_steps=None):
    """Raise ValueError with the estimate, what is free and which input to lower, where the calibration would not
    fit: host memory against what is available now, the device against its total memory."""
    teacher_steps = _teacher_steps(request, teacher_steps)
    need = estimate(model, request, latent_shape, teacher_steps)
    free = psutil.virtual_memory().available
    gib = 2 ** 30
    if need["host"] > free:
        raise ValueError(f"this calibration needs about {need['host'] / gib:.1f} GiB of host memory (the teacher's "
                         f"{teacher_steps} steps of {request.calibration_batch} latents of "
                         f"{'x'.join(map(str, latent_shape))}), {free / gib:.1f} GiB are free: lower teacher_steps "
                         "or calibration_batch")
    device = model.load_device
    total = comfy.model_management.get_total_memory(device)
    if need["device"] > total:
        raise ValueError(f"this calibration's model calls need about {need['device'] / gib:.1f} GiB on {device}, which "
                         f"has {total / gib:.1f} GiB: lower calibration_batch (or the latent size)")
