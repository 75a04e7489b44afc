"""The tiny digits diffusion models (tests/tinymodels/digits.py) sampled through ComfyUI's own sampling."""
import numpy as np
import pytest
import safetensors.torch
import torch

import comfy.model_patcher
import comfy.sample
import comfy.samplers
from tinymodels import digits

# Measured with 100 samples (10 per class), 50 Euler steps, Karras sigmas: 100% of both models' samples
# are recognised at cfg 3 (89% EPS / 94% flow at cfg 1); an untrained model scores about chance (10%).
MIN_ACCURACY = 0.8


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tensors are tiny: one thread is fastest, and two collapse (5x-8x slower) on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=digits.KINDS)
def model(request):
    return digits.build_model(request.param)


def sample(model, labels, cfg=3.0, steps=50, scheduler="karras", seed=0):
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps)
    latent = torch.zeros(len(labels), *digits.LATENT_SHAPE)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))
    return comfy.sample.sample_custom(
        model, noise, cfg, comfy.samplers.sampler_object("euler"), sigmas,
        digits.conditioning(labels), digits.null_conditioning(), latent, disable_pbar=True, seed=seed)


def accuracy(latent, labels):
    return float(np.mean(digits.classify(latent) == np.asarray(labels)))


def test_samples_show_their_class(model):
    labels = np.repeat(np.arange(10), 2)
    out = sample(model, labels)
    assert out.shape == (20, *digits.LATENT_SHAPE)
    assert torch.isfinite(out).all()
    assert accuracy(out, labels) >= MIN_ACCURACY


def test_untrained_model_fails_the_threshold():
    base = digits.build_base("flow")
    digits.init_parameters(base, seed=1)
    # A non-zero output layer so the untrained network actually predicts something.
    torch.nn.init.normal_(base.diffusion_model.out[-1].weight, std=0.05)
    cpu = torch.device("cpu")
    untrained = comfy.model_patcher.ModelPatcher(base, load_device=cpu, offload_device=cpu)
    labels = np.repeat(np.arange(10), 2)
    assert accuracy(sample(untrained, labels, steps=20), labels) < MIN_ACCURACY


def test_each_sample_gets_its_own_class(model):
    """A conditioning batch equal to the latent batch is split row by row over the samples."""
    labels = [7, 1, 4, 0]
    batched = sample(model, labels, steps=8)
    for i, label in enumerate(labels):
        # Same per-sample noise as row i of the batched run.
        noise = torch.randn(len(labels), *digits.LATENT_SHAPE, generator=torch.Generator().manual_seed(0))[i:i + 1]
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "karras", 8)
        alone = comfy.sample.sample_custom(
            model, noise, 3.0, comfy.samplers.sampler_object("euler"), sigmas, digits.conditioning(label),
            digits.null_conditioning(), torch.zeros_like(noise), disable_pbar=True, seed=0)
        torch.testing.assert_close(batched[i:i + 1], alone, atol=1e-4, rtol=1e-4)


def test_conditioning_shapes():
    (context, extra), = digits.conditioning(3)
    assert context.shape == (1, digits.TOKENS, digits.CONTEXT_DIM) and extra == {}
    (context, _), = digits.conditioning([1, 2, 3])
    assert context.shape == (3, digits.TOKENS, digits.CONTEXT_DIM)
    (null, _), = digits.null_conditioning(2)
    assert null.shape == (2, digits.TOKENS, digits.CONTEXT_DIM)
    torch.testing.assert_close(null[0], digits.class_embedding()[digits.NULL_CLASS])


@pytest.mark.parametrize("kind", digits.KINDS)
def test_weights_are_small_and_load_strictly(kind):
    path = digits.weights_path(kind)
    assert path.stat().st_size < 8 * 1024 * 1024
    tensors = safetensors.torch.load_file(str(path))
    embedding = tensors.pop(digits.EMBEDDING_KEY)
    assert embedding.shape == (digits.NUM_CLASSES + 1, digits.TOKENS, digits.CONTEXT_DIM)
    base = digits.build_base(kind)
    assert set(tensors) == set(base.diffusion_model.state_dict())
    base.diffusion_model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True)


def test_both_files_share_the_class_table():
    tables = [digits.load_weights(kind)[1] for kind in digits.KINDS]
    torch.testing.assert_close(tables[0], tables[1], atol=0, rtol=0)


def test_latent_round_trip_keeps_the_digits_recognisable():
    images, labels = digits.load_digits()
    latent = digits.encode(images[:200])
    assert latent.shape == (200, *digits.LATENT_SHAPE)
    assert latent.min() >= -1.0 and latent.max() <= 1.0
    assert digits.decode(latent).shape == (200, 16, 16)
    assert accuracy(latent, labels[:200]) >= 0.98
