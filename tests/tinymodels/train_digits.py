"""Train the tiny digits diffusion models (see digits.py) on CPU with ComfyUI's real model code.

    python tests/tinymodels/train_digits.py [--kind eps|flow|both] [--minutes M] [--steps N]

Run it with the host venv's python. With --kind both (the default) the two UNets are trained side by
side and share one learned class-embedding table, so `digits.conditioning(labels)` serves both models.
Training a single kind keeps the table of the other kind's existing weights file frozen, if there is
one. Training is deterministic for a fixed --steps; --minutes only cuts it short (with a warning).

Measured for the committed weights (defaults: 1600 steps of batch 64, EPS updated on every step and
flow on every second one, 1 thread): 1195 s on the 2-core dev machine while other jobs kept its load
average at 2.4-3.2; about 0.15-0.2 s per model update when the CPU is free.
"""
import argparse
import copy
import os
import sys
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
COMFYUI_DIR = Path(os.environ.get("COMFYUI_DIR", Path(sys.prefix) / "comfyui"))
sys.path.insert(0, str(COMFYUI_DIR))
sys.path.insert(0, str(TESTS))

import comfy.options  # noqa: E402

comfy.options.enable_args_parsing(False)
import comfy.cli_args  # noqa: E402

comfy.cli_args.args.cpu = True

import torch  # noqa: E402

from tinymodels import digits  # noqa: E402

SEED = 20240611
BATCH = 64
LR = 2e-3
WARMUP = 50
LABEL_DROPOUT = 0.15
EMA_DECAY = 0.998
# The flow model learns several times faster than the EPS one: it trains on every FLOW_EVERY-th step.
FLOW_EVERY = 2
STEPS = 1600


class Trainer:
    """One kind's UNet, its loss and the EMA of its weights."""

    def __init__(self, kind, seed, every=1):
        self.kind = kind
        self.base = digits.build_base(kind)
        digits.init_parameters(self.base, seed=seed)
        self.net = self.base.diffusion_model
        self.net.train()
        self.ms = self.base.model_sampling
        self.ema = copy.deepcopy(self.net.state_dict())
        self.every = every
        self.updates = 0

    def loss(self, x0, context, gen):
        n = x0.shape[0]
        noise = torch.randn(x0.shape, generator=gen)
        if self.kind == "eps":
            # A discrete training timestep on the model's own schedule; the network predicts the noise.
            index = torch.randint(0, len(self.ms.sigmas), (n,), generator=gen)
            sigma = self.ms.sigmas[index]
            s = sigma.view(-1, 1, 1, 1)
            xc = self.ms.calculate_input(sigma, x0 + s * noise)
            target = noise
            # Truncated-SNR weighting: the error is counted in x0 units (sigma^2 * eps error) where
            # sigma > 1. Plain eps-MSE leaves the high-noise predictions too coarse: an eps error of 0.1
            # at sigma 14.6 is an x0 error of 1.5, which sampling turns into speckle noise.
            weight = s.clamp(min=1.0) ** 2
        else:
            # A uniform timestep through the model's shift-3 sigma(t): the schedule samplers step on.
            sigma = self.ms.sigma(torch.rand(n, generator=gen) * self.ms.multiplier)
            s = sigma.view(-1, 1, 1, 1)
            xc = self.ms.calculate_input(sigma, (1.0 - s) * x0 + s * noise)
            target = noise - x0  # CONST: denoised = x - sigma * output
            weight = torch.ones_like(s)
        out = self.net(xc, self.ms.timestep(sigma).float(), context=context)
        return (weight * (out - target) ** 2).mean()

    @torch.no_grad()
    def update_ema(self):
        decay = min(EMA_DECAY, (1.0 + self.updates) / (10.0 + self.updates))
        self.updates += 1
        for key, value in self.net.state_dict().items():
            if value.dtype.is_floating_point:
                self.ema[key].mul_(decay).add_(value, alpha=1.0 - decay)
            else:
                self.ema[key].copy_(value)


def existing_embedding(kinds):
    """The class table of an untrained kind's weights file, to keep fixed; None to learn one."""
    for other in digits.KINDS:
        if other not in kinds and digits.weights_path(other).exists():
            return digits.load_weights(other)[1]
    return None


def train(kinds, steps, minutes, batch=BATCH):
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    images, labels = digits.load_digits()
    latents = digits.encode(images)
    labels = torch.as_tensor(labels)

    if kinds == ["flow"]:
        steps //= FLOW_EVERY
    every = {"eps": 1, "flow": FLOW_EVERY if "eps" in kinds else 1}
    trainers = [Trainer(kind, SEED + i, every[kind]) for i, kind in enumerate(kinds)]
    fixed = existing_embedding(kinds)
    embedding = torch.nn.Parameter(digits.new_class_embedding(SEED) if fixed is None else fixed.clone(),
                                   requires_grad=fixed is None)
    ema_embedding = embedding.detach().clone()
    groups = [list(t.net.parameters()) for t in trainers] + ([[embedding]] if fixed is None else [])
    params = [p for group in groups for p in group]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)

    def lr_at(step):
        if step < WARMUP:
            return LR * (step + 1) / WARMUP
        progress = (step - WARMUP) / max(1, steps - WARMUP)
        return LR * (0.05 + 0.95 * 0.5 * (1.0 + torch.cos(torch.tensor(progress * torch.pi)).item()))

    start = time.time()
    deadline = start + minutes * 60.0
    running = {t.kind: 0.0 for t in trainers}
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        for t in trainers:
            if step % t.every:
                continue
            idx = torch.randint(0, len(latents), (batch,), generator=gen)
            y = labels[idx].clone()
            y[torch.rand(batch, generator=gen) < LABEL_DROPOUT] = digits.NULL_CLASS
            loss = t.loss(latents[idx], embedding[y], gen)
            loss.backward()
            running[t.kind] = 0.98 * running[t.kind] + 0.02 * loss.item() if t.updates else loss.item()
        for group in groups:
            torch.nn.utils.clip_grad_norm_(group, 1.0)
        opt.step()
        for t in trainers:
            if step % t.every == 0:
                t.update_ema()
        with torch.no_grad():
            decay = min(EMA_DECAY, (1.0 + step) / (10.0 + step))
            ema_embedding.mul_(decay).add_(embedding.detach(), alpha=1.0 - decay)
        if step % 100 == 0 or step == steps - 1:
            losses = " ".join(f"{k}={v:.4f}" for k, v in running.items())
            print(f"step {step:5d}  lr {lr_at(step):.2e}  loss {losses}  {time.time() - start:6.1f}s", flush=True)
        if time.time() > deadline:
            print(f"WARNING: --minutes {minutes} reached after {step + 1} of {steps} steps", flush=True)
            break

    elapsed = time.time() - start
    for t in trainers:
        path = digits.weights_path(t.kind)
        digits.save_weights(path, t.ema, ema_embedding if fixed is None else fixed)
        print(f"saved {path} ({path.stat().st_size / 1e6:.2f} MB)")
    print(f"trained {'+'.join(kinds)} for {step + 1} steps in {elapsed:.1f} s", flush=True)
    return elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=["eps", "flow", "both"], default="both")
    parser.add_argument("--steps", type=int, default=STEPS, help="optimiser steps (EPS trains on each)")
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1 measured fastest for these tiny tensors, and robust to a busy CPU")
    parser.add_argument("--minutes", type=float, default=30.0, help="wall-time safety cap for the whole run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kinds = list(digits.KINDS) if args.kind == "both" else [args.kind]
    train(kinds, args.steps, args.minutes, args.batch)


if __name__ == "__main__":
    main()
