"""A tiny class-conditional diffusion model of scikit-learn's `digits`, run through ComfyUI's real model code.

Two trained versions share one UNet config:
- "eps":  SD1.5-style epsilon prediction on ComfyUI's default discrete schedule
          (scaled-linear betas 0.00085..0.012, 1000 steps);
- "flow": rectified flow (ComfyUI's ModelSamplingDiscreteFlow + CONST, shift 3, multiplier 1000).

Latent: each 8x8 digit (0..16) is scaled to [-1, 1], upsampled bilinearly to 16x16 and packed with
pixel_unshuffle(2) into a 4x8x8 latent. The model's latent format has scale factor 1, so the latents
ComfyUI passes around are exactly the ones the network was trained on.

Class conditioning goes through cross-attention: a learned table of shape [11, TOKENS, 16] (row 10 is
the null embedding, the negative prompt for classifier-free guidance), stored in each weights file
under the key `class_embedding`. The two models were trained jointly on one shared table, so
`conditioning(labels)` is the same for both kinds.

Import comfy only after the host is set up (tests/conftest.py does this; train_digits.py too).
"""
import os
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F

import comfy.latent_formats
import comfy.model_base
import comfy.model_patcher
import comfy.supported_models

HERE = Path(__file__).resolve().parent
KINDS = ("eps", "flow")
NUM_CLASSES = 10
NULL_CLASS = 10
TOKENS = 2
CONTEXT_DIM = 16
EMBEDDING_KEY = "class_embedding"
LATENT_SHAPE = (4, 8, 8)
FLOW_SHIFT = 3.0
FLOW_MULTIPLIER = 1000

UNET_CONFIG = dict(
    image_size=8, in_channels=4, out_channels=4, model_channels=32, num_res_blocks=1,
    channel_mult=[1, 2], num_heads=4, num_head_channels=-1, transformer_depth=[1, 1],
    transformer_depth_output=[1, 1, 1, 1], transformer_depth_middle=1, context_dim=CONTEXT_DIM,
    use_linear_in_transformer=True, use_spatial_transformer=True, adm_in_channels=None,
    use_temporal_attention=False, legacy=False, dtype=torch.float32)


def weights_path(kind):
    return HERE / f"digits_{kind}.safetensors"


def _model_config(kind):
    cfg = comfy.supported_models.SD15(UNET_CONFIG)
    # SD15's unet_extra_config forces num_heads=8 / num_head_channels=-1 over ours: restore ours.
    cfg.unet_config["num_heads"] = UNET_CONFIG["num_heads"]
    cfg.unet_config["num_head_channels"] = UNET_CONFIG["num_head_channels"]
    # SD15's latent format scales by 0.18215 on the way in and out of sampling; ours is the identity.
    cfg.latent_format = comfy.latent_formats.LatentFormat()
    cfg.set_inference_dtype(torch.float32, None)
    if kind == "flow":
        cfg.sampling_settings = {"shift": FLOW_SHIFT, "multiplier": FLOW_MULTIPLIER}
    elif kind != "eps":
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    return cfg


def build_base(kind):
    """An untrained (uninitialised) BaseModel; used by training, and by build_model before loading."""
    model_type = comfy.model_base.ModelType.FLOW if kind == "flow" else comfy.model_base.ModelType.EPS
    return comfy.model_base.BaseModel(_model_config(kind), model_type=model_type)


def init_parameters(base, seed=0):
    """comfy.ops turns weight init off; put torch's default init back (and zero the output conv)."""
    torch.manual_seed(seed)
    layer_types = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm)
    for module in base.diffusion_model.modules():
        for layer_type in layer_types:
            if isinstance(module, layer_type):
                layer_type.reset_parameters(module)
                break
    out_conv = base.diffusion_model.out[-1]
    torch.nn.init.zeros_(out_conv.weight)
    torch.nn.init.zeros_(out_conv.bias)


def new_class_embedding(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(NUM_CLASSES + 1, TOKENS, CONTEXT_DIM, generator=g)


def save_weights(path, diffusion_state_dict, class_embedding, dtype=torch.float16):
    """Atomic write: the UNet state dict plus the class-embedding table in one safetensors file."""
    tensors = {k: v.detach().to(dtype).contiguous() for k, v in diffusion_state_dict.items()}
    tensors[EMBEDDING_KEY] = class_embedding.detach().to(dtype).contiguous()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    safetensors.torch.save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def load_weights(kind):
    """(diffusion_model state dict, class embedding), both float32."""
    tensors = {k: v.float() for k, v in safetensors.torch.load_file(str(weights_path(kind))).items()}
    embedding = tensors.pop(EMBEDDING_KEY)
    return tensors, embedding


_EMBEDDING = None


def build_model(kind):
    """A ModelPatcher around a real ComfyUI BaseModel with the committed trained weights."""
    base = build_base(kind)
    state_dict, _ = load_weights(kind)
    base.diffusion_model.load_state_dict(state_dict, strict=True)
    base.eval()
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(base, load_device=cpu, offload_device=cpu)


def class_embedding():
    """The [11, TOKENS, 16] class table; both weights files hold the same one (trained jointly)."""
    global _EMBEDDING
    if _EMBEDDING is None:
        kind = next((k for k in KINDS if weights_path(k).exists()), KINDS[0])
        _EMBEDDING = load_weights(kind)[1]
    return _EMBEDDING


def _labels_tensor(labels):
    if isinstance(labels, (int, np.integer)):
        labels = [int(labels)]
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long).reshape(-1)
    if labels.numel() and (labels.min() < 0 or labels.max() > NULL_CLASS):
        raise ValueError("labels must lie in 0..10 (10 = null)")
    return labels


def conditioning(labels):
    """ComfyUI CONDITIONING for these class labels: context [len(labels), TOKENS, 16], one row per sample.

    ComfyUI repeats (tiles) a conditioning's batch up to the latent batch, so a single label
    conditions every sample, and a batch equal to the latent batch gives each sample its own class.
    """
    context = class_embedding()[_labels_tensor(labels)]
    return [[context, {}]]


def null_conditioning(batch=1):
    """The unconditional (negative) CONDITIONING."""
    return conditioning([NULL_CLASS] * batch)


# ---------------------------------------------------------------- data, latent, classifier

def load_digits():
    """(images float32 [N, 8, 8] in 0..16, labels int64 [N]) from scikit-learn's bundled copy."""
    from sklearn.datasets import load_digits as sk_load_digits

    data = sk_load_digits()
    return data.images.astype(np.float32), data.target.astype(np.int64)


def encode(images):
    """Digit images [N, 8, 8] in 0..16 (array or tensor) -> latents [N, 4, 8, 8]."""
    x = torch.as_tensor(np.asarray(images, dtype=np.float32)).reshape(-1, 1, 8, 8)
    x = x / 8.0 - 1.0
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    return F.pixel_unshuffle(x, 2)


def decode(latent):
    """Latents [N, 4, 8, 8] -> images [N, 16, 16] in about [-1, 1]."""
    return F.pixel_shuffle(latent.float(), 2)[:, 0]


def to_digit_images(latent):
    """Latents -> 8x8 images on the digits scale 0..16, as the classifier sees them."""
    x = F.avg_pool2d(decode(latent).unsqueeze(1), 2)[:, 0]
    return ((x + 1.0) * 8.0).clamp(0.0, 16.0)


_CLASSIFIER = None


def classifier():
    """An RBF SVC fitted on all of `digits`, passed through the same encode/decode round trip."""
    global _CLASSIFIER
    if _CLASSIFIER is None:
        from sklearn.svm import SVC

        images, labels = load_digits()
        seen = to_digit_images(encode(images)).reshape(len(images), -1).numpy()
        _CLASSIFIER = SVC(gamma=0.001, C=10.0).fit(seen, labels)
    return _CLASSIFIER


def classify(latent):
    """Predicted digit (int64 array) for each latent in the batch."""
    x = to_digit_images(latent).reshape(latent.shape[0], -1).numpy()
    return classifier().predict(x).astype(np.int64)
