"""Closed-form test models: a class-conditional Gaussian mixture whose exact denoiser is known.

The data are C x 8 x 8 latents drawn from a mixture of isotropic Gaussians N(mu_k, v_k I),
COMPONENTS_PER_CLASS per class: "smooth" (standard deviations 0.15-0.5, the original test mixture) or
"sharp" (0.04-0.06 against unit-scale means, like a real latent's fine detail). For a state x = a x0 + b n
(ComfyUI's EPS and V models: a = 1, b = sigma; flow models: a = 1 - sigma, b = sigma) the posterior mean is
exact:

    E[x0 | x] = sum_k r_k(x) * (mu_k + a v_k / (a^2 v_k + b^2) * (x - a mu_k)),
    r_k(x) proportional to w_k * N(x; a mu_k, (a^2 v_k + b^2) I).

`GaussianMixtureNet` is the `diffusion_model` of a real ComfyUI `BaseModel`: ComfyUI scales the input,
converts sigma to a timestep and converts our output to a denoised prediction with its own
model_sampling code, exactly as for a real checkpoint; the network undoes the input scaling with
the same model_sampling and returns whatever output (eps, v or flow velocity) makes ComfyUI's
`calculate_denoised` produce the exact posterior mean. Like ComfyUI's own nets it runs
DIFFUSION_MODEL wrappers around its forward, and it believes the noise level its timestep input
stands for: the call's sigma when the timestep is ComfyUI's `timestep(sigma)` of it, otherwise the
sigma whose timestep it is (discrete EPS/V: `model_sampling.sigma(t)`; discrete flow:
`t / multiplier`), for the input un-scaling, the posterior and the output alike (so a tuned time
input acts as it would on a trained net). The context selects the class: a one-hot
row (first NUM_CLASSES entries) conditions on that class, an all-zero row is unconditional.

`build_model(family)` is the original test model: ComfyUI's SD1.5 discrete schedule (flow: discrete flow,
shift 3), latent format of scale 1. `build_like(checkpoint)` is built like a real checkpoint: the model
config of SD1.5, SD2 (V-prediction), SDXL, SD3 (flow, shift 3) or Flux as ComfyUI defines them (their
model_sampling, latent format and channel count), sharp data; `scale_one=True` gives its twin whose
latent format is the identity, so that LATENT space and the model's own space coincide.
"""
import math

import torch

NUM_CLASSES = 10
COMPONENTS_PER_CLASS = 3
LATENT_SHAPE = (4, 8, 8)
CONTEXT_DIM = 16


# A real checkpoint's config: (comfy.supported_models class, ComfyUI ModelType)
CHECKPOINTS = {"sd15": ("SD15", "EPS"), "sd2": ("SD20", "V_PREDICTION"), "sdxl": ("SDXL", "EPS"),
               "sd3": ("SD3", "FLOW"), "flux": ("Flux", "FLUX")}
DATA = ("smooth", "sharp")


def _mixture(shape=LATENT_SHAPE, data="smooth", seed=1234):
    g = torch.Generator().manual_seed(seed)
    dim = math.prod(shape)
    k = NUM_CLASSES * COMPONENTS_PER_CLASS
    class_means = torch.randn(NUM_CLASSES, 1, dim, generator=g, dtype=torch.float64)
    offsets = 0.6 * torch.randn(NUM_CLASSES, COMPONENTS_PER_CLASS, dim, generator=g, dtype=torch.float64)
    means = (class_means + offsets).reshape(k, dim)
    low, span = {"smooth": (0.15, 0.35), "sharp": (0.04, 0.02)}[data]          # standard deviations
    variances = (low + span * torch.rand(k, generator=g, dtype=torch.float64)) ** 2
    log_weights = torch.log_softmax(torch.randn(k, generator=g, dtype=torch.float64), 0)
    classes = torch.arange(NUM_CLASSES).repeat_interleave(COMPONENTS_PER_CLASS)
    return means, variances, log_weights, classes


class GaussianMixture:
    """The data distribution, with its exact posterior mean in variance-exploding coordinates."""

    def __init__(self, shape=LATENT_SHAPE, data="smooth", seed=1234):
        self.shape = tuple(shape)
        self.means, self.variances, self.log_weights, self.classes = _mixture(self.shape, data, seed)
        self.mean_sq = (self.means * self.means).sum(1)

    def posterior_mean(self, x, a, b, labels=None):
        """E[x0 | a x0 + b n = x] in float64; a, b per sample; labels (-1: unconditional) restrict the mixture."""
        shape = x.shape
        x = x.reshape(shape[0], -1).double()
        a = torch.as_tensor(a, dtype=torch.float64).reshape(-1, 1)
        b = torch.as_tensor(b, dtype=torch.float64).reshape(-1, 1)
        var = a * a * self.variances[None, :] + b * b                              # [B, K]
        sq = (x * x).sum(1, keepdim=True) - 2 * a * (x @ self.means.T) + a * a * self.mean_sq[None]  # |x - a mu_k|^2
        logp = self.log_weights[None] - 0.5 * sq / var - 0.5 * x.shape[1] * torch.log(var)
        if labels is not None:
            labels = torch.as_tensor(labels).reshape(-1, 1)
            allowed = (labels < 0) | (self.classes[None, :] == labels)
            logp = logp.masked_fill(~allowed, -math.inf)
        r = torch.softmax(logp, dim=1)                                              # [B, K]
        gain = r * a * self.variances[None, :] / var                                # [B, K]
        mean = r @ self.means + gain.sum(1, keepdim=True) * x - (gain * a) @ self.means
        return mean.reshape(shape)

    def sample(self, n, labels=None, generator=None):
        """Exact samples of the data distribution (for tests of the closed form itself)."""
        labels = torch.full((n,), -1) if labels is None else torch.as_tensor(labels)
        logits = self.log_weights.expand(n, -1).clone()
        logits[labels >= 0] = logits[labels >= 0].masked_fill(
            self.classes[None, :] != labels[labels >= 0, None], -math.inf)
        k = torch.multinomial(torch.softmax(logits, 1), 1, generator=generator)[:, 0]
        noise = torch.randn(n, self.means.shape[1], generator=generator, dtype=torch.float64)
        return (self.means[k] + self.variances[k, None].sqrt() * noise).reshape(n, *self.shape)


def labels_from_context(context):
    """Class per sample from a context [B, T, CONTEXT_DIM]: argmax of the one-hot row, -1 if all zero."""
    row = context[:, 0, :NUM_CLASSES]
    return torch.where(row.abs().sum(1) > 0, row.argmax(1), torch.full_like(row[:, 0], -1, dtype=torch.long))


class GaussianMixtureNet(torch.nn.Module):
    """A diffusion_model for ComfyUI's BaseModel whose prediction is the mixture's exact one."""

    def __init__(self, family="flow", in_channels=LATENT_SHAPE[0], data="smooth", device=None, operations=None,
                 dtype=torch.float32, **unused):
        super().__init__()
        self.mixture = GaussianMixture((in_channels, *LATENT_SHAPE[1:]), data)
        self.family = family
        self.dtype = dtype
        self.model_sampling = None      # bound by build_model: the BaseModel's own model_sampling
        self.register_buffer("anchor", torch.zeros(1, dtype=dtype), persistent=False)

    def forward(self, xc, timesteps, context=None, transformer_options={}, **kwargs):
        # like ComfyUI's own nets: DIFFUSION_MODEL wrappers (comfy.patcher_extension) run around _forward
        import comfy.patcher_extension as pe
        return pe.WrapperExecutor.new_class_executor(
            self._forward, self, pe.get_all_wrappers(pe.WrappersMP.DIFFUSION_MODEL, transformer_options)
        ).execute(xc, timesteps, context, transformer_options, **kwargs)

    def noise_level(self, timesteps, sigmas):
        """The sigma per row that `timesteps` stands for: the call's sigmas when timesteps is their
        timestep (as ComfyUI computes it), else the sigma whose timestep it is."""
        ms = self.model_sampling
        if torch.equal(timesteps, ms.timestep(sigmas).float().to(timesteps.dtype)):
            return sigmas.to(torch.float64)
        if self.family == "flow":       # discrete flow: timestep(sigma) = sigma * multiplier; Flux: sigma itself
            return (timesteps.to(torch.float64) / getattr(ms, "multiplier", 1.0)).clamp(0, 1)
        return ms.sigma(timesteps.float()).to(torch.float64)

    def _forward(self, xc, timesteps, context=None, transformer_options={}, **kwargs):
        ms = self.model_sampling
        s = transformer_options["sigmas"]
        if len(s) != len(xc):           # cond and uncond chunks are stacked: one sigma per chunk row
            s = s.repeat(len(xc) // len(s))
        s = self.noise_level(timesteps.reshape(-1), s)
        ones = torch.ones_like(xc, dtype=torch.float64)
        x = xc.double() / ms.calculate_input(s, ones)                  # ComfyUI's state x_c
        a = 1 - s if self.family == "flow" else torch.ones_like(s)
        mean = self.mixture.posterior_mean(x, a, s, labels_from_context(context))
        base = ms.calculate_denoised(s, torch.zeros_like(x), x)
        slope = ms.calculate_denoised(s, ones, torch.zeros_like(x))
        return ((mean - base) / slope).to(xc.dtype)


def build_model(family):
    """A ModelPatcher around a real ComfyUI BaseModel with the exact mixture denoiser.

    family: "eps" or "v_prediction" (ComfyUI's discrete SD1.5 schedule) or "flow" (discrete
    flow, shift 3, as SD3); latent format of scale 1, the smooth mixture.
    """
    import comfy.latent_formats
    import comfy.supported_models

    config = comfy.supported_models.SD15({})
    if family == "flow":
        config.sampling_settings = {"shift": 3.0, "multiplier": 1000}
    config.latent_format = comfy.latent_formats.LatentFormat()     # scale 1: LATENT is the model's x
    model_type = {"eps": "EPS", "v_prediction": "V_PREDICTION", "flow": "FLOW"}[family]
    return _patcher(config, model_type, "smooth")


def build_like(checkpoint, data="sharp", scale_one=False):
    """The mixture model built like a real checkpoint (CHECKPOINTS): its model config's model_sampling,
    latent format and channel count; `scale_one`: the same model with the identity latent format."""
    import comfy.latent_formats
    import comfy.supported_models

    config_name, model_type = CHECKPOINTS[checkpoint]
    config = getattr(comfy.supported_models, config_name)({})
    if scale_one:
        identity = comfy.latent_formats.LatentFormat()
        identity.latent_channels = config.latent_format.latent_channels
        config.latent_format = identity
    return _patcher(config, model_type, data)


def _patcher(config, model_type, data):
    import comfy.model_base
    import comfy.model_patcher

    model_type = getattr(comfy.model_base.ModelType, model_type)
    family = "flow" if model_type in (comfy.model_base.ModelType.FLOW, comfy.model_base.ModelType.FLUX) else \
        model_type.name.lower()
    config.unet_extra_config = {}
    config.unet_config = {"family": family, "in_channels": config.latent_format.latent_channels, "data": data}
    config.set_inference_dtype(torch.float32, None)
    base = comfy.model_base.BaseModel(config, model_type=model_type, unet_model=GaussianMixtureNet)
    base.diffusion_model.model_sampling = base.model_sampling
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(base, load_device=cpu, offload_device=cpu)


def conditioning(labels):
    """ComfyUI CONDITIONING selecting one class per sample (a batch-1 list applies to every sample)."""
    labels = torch.as_tensor(labels).reshape(-1)
    context = torch.zeros(len(labels), 1, CONTEXT_DIM)
    context[torch.arange(len(labels)), 0, labels] = 1
    return [[context, {}]]


def null_conditioning(batch=1):
    return [[torch.zeros(batch, 1, CONTEXT_DIM), {}]]
