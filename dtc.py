"""
Diffuse to Choose (Seyfioglu et al., 2024, arXiv 2401.13795), read top to bottom.

DTC is Paint-by-Example (PBE) style image-conditioned inpainting on Stable Diffusion 1.5, plus:
  - image tokens: all DINOv2 tokens (CLS + patches) -> one Linear -> cross-attention context (paper §3.2, supp. §5.2);
  - a hint branch: the reference pasted into the largest rectangle of the mask, a 4-layer conv adapter to
    latent size, added to the masked-source latent, encoded by a trainable copy of the U-Net encoder, and
    fused into the main U-Net's 13 skip taps with FiLM (paper §3.2, Fig. 2, Fig. 4).
Choices the paper leaves open are marked UNSTATED where made; docs/method.md gives each one and its reason.

Sections, in the order a reader of the paper meets them: 1 the hint image, 2 the hint adapter, 3 the image tokens
and the rest of what is computed once per image, 4 the model, 5 the fusion, 6 the losses, 7 sampling, 8 building
from the original files (8b: from scratch, the tiny architecture), 9 DTC checkpoints. The SD 1.5 schedule and the
DDIM / DDPM steps, which are not DTC's, are diffusion.py.

Conventions: images are (B,3,H,W) in [-1,1]; masks are PBE's, (B,1,H,W) with 1 = keep, 0 = region to fill;
latents are VAE latents times LATENT_SCALE. The U-Net predicts eps (SD 1.5 and the paper) or v (cfg.prediction, the
teaching model); the loss trains it against its own target, and everything after it converts its output to eps.
"""
import json
import math
import os
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from checkpoint import (CheckpointError, cast_floats, config_from_metadata, load_strict, not_a_file, read_state_dict,
                        strip_prefix)
from diffusion import Schedule
from dinov2 import IMAGENET_MEAN, IMAGENET_STD, DINOv2, DINOv2Config, load_dinov2
from unet import UNet, UNetConfig, infer_unet_config, load_unet
from vae import LATENT_SCALE, AutoencoderKL, VAEConfig, load_vae


# -----------------------------------------------------------------------------
# 1. Masks and the hint image (paper §3.2 and supplement §5.1)


def largest_rectangle(mask):
    """The largest axis-aligned rectangle inside the region to fill of one mask (H,W), 1 = keep.

    Row by row, `heights[x]` counts the fill pixels ending at this row in column x; the largest
    rectangle under that histogram is found with a stack of increasing heights. Linear in pixels.
    Returns (top, left, bottom, right) with exclusive ends, or None when there is nothing to fill.
    """
    fill = (mask < 0.5).tolist()
    W = len(fill[0])
    heights = [0] * (W + 1)  # one extra zero column flushes the stack at the end of each row
    best, best_area = None, 0
    for y, row in enumerate(fill):
        for x in range(W):
            heights[x] = heights[x] + 1 if row[x] else 0
        stack = []  # columns with increasing heights
        for x in range(W + 1):
            start = x
            while stack and heights[stack[-1][1]] >= heights[x]:
                start, col = stack.pop()
                area = heights[col] * (x - start)
                if area > best_area:
                    best_area, best = area, (y + 1 - heights[col], start, y + 1, x)
            stack.append((start, x))
    return best


def make_hint(reference, mask, canvas=None):
    """The hint image: a black canvas the size of the source, the reference stretched into the largest
    rectangle of the region to fill (paper supplement §5.1). (B,3,h,w) [-1,1], (B,1,H,W) -> (B,3,H,W) in [0,1].
    canvas: (B,3,H,W) in [0,1] to paste into instead of black (the latent hint's masked source).
    UNSTATED: value range and aspect; docs/method.md §2.1 (black [0,1] canvas, stretch resize)."""
    B, _, H, W = mask.shape
    hint = reference.new_zeros(B, 3, H, W) if canvas is None else canvas.to(reference.dtype).clone()
    for i in range(B):
        rect = largest_rectangle(mask[i, 0])
        if rect is None:
            raise ValueError(f"mask {i} of the batch has no region to fill")
        top, left, bottom, right = rect
        ref = F.interpolate(reference[i:i + 1].float(), size=(bottom - top, right - left), mode="bilinear",
                            antialias=True, align_corners=False)
        hint[i, :, top:bottom, left:right] = ((ref[0] + 1) / 2).clamp(0, 1).to(hint.dtype)
    return hint


def sobel_edges(image):
    """Per-channel Sobel edges (the paper's supplement; its main text names Canny, thresholds 30/140, which needs
    OpenCV): (B,3,h,w) [-1,1] -> the gradient magnitude of each channel, (B,3,h,w) [-1,1], -1 where flat (black on
    the hint's canvas) and 1 at a full black-to-white step. Borders replicated, so the canvas edge is not an edge."""
    x = F.pad((image.float() + 1) / 2, (1, 1, 1, 1), mode="replicate")
    C = x.shape[1]
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=x.device)
    kernels = torch.stack([kx, kx.T]).repeat(C, 1, 1)[:, None]  # (2C,1,3,3): d/dx and d/dy of each channel
    g = F.conv2d(x, kernels, groups=C).unflatten(1, (C, 2))  # (B,C,2,h,w)
    magnitude = g.pow(2).sum(2).sqrt() / 4  # a unit step gives 4 across the Sobel kernel
    return (magnitude.clamp(0, 1) * 2 - 1).to(image.dtype)


HINT_KINDS = ("image", "edges", "latent")


def hint_image(kind, reference, mask, source):
    """The hint branch's input image (B,3,H,W) in [0,1], for DTCConfig.hint_kind (paper §3.2 and §4.3):
    "image" the reference in the mask's largest rectangle on black (DTC); "edges" its Sobel edges so; "latent" the
    reference pasted into the masked source (hole mid-grey), which prepare then encodes with the VAE: the hint
    encoder reads that latent directly, with no adapter."""
    if kind == "image":
        return make_hint(reference, mask)
    if kind == "edges":
        return make_hint(sobel_edges(reference), mask)
    return make_hint(reference, mask, canvas=(source * mask + 1) / 2)


# -----------------------------------------------------------------------------
# 2. Hint adapter: hint image -> latent shape (paper §3.2: "a shallow convolutional network of four layers")


class HintAdapter(nn.Module):
    """One stride-2 conv per factor of 2 of the VAE (3 for SD's 8x), then a conv to the latent channels:
    (B,3,H,W) -> (B,C_lat,H/f,W/f). Ordinary (non-zero) init: FiLM is already zero-initialised (docs/method.md §2.2)."""

    def __init__(self, latent_channels=4, downsample_factor=8, width=32):
        super().__init__()
        layers, ch = [], 3
        for i in range(int(math.log2(downsample_factor))):
            layers += [nn.Conv2d(ch, width * 2 ** i, 3, stride=2, padding=1), nn.SiLU()]
            ch = width * 2 ** i
        layers.append(nn.Conv2d(ch, latent_channels, 3, padding=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, hint):
        return self.layers(hint * 2 - 1)  # centre the [0,1] canvas, as the latents are centred


# -----------------------------------------------------------------------------
# 3. Image tokens, and the conditioning computed once per image by the frozen VAE and image encoder


def encode_image_tokens(image_encoder, reference, encoder_input_size):
    """Reference (B,3,h,w) [-1,1] -> DINOv2 tokens (B,1+R+N,D). UNSTATED preprocessing; docs/method.md §2.5:
    a direct resize (no crop, the whole product stays visible), ImageNet normalisation."""
    x = F.interpolate(reference.float(), size=(encoder_input_size,) * 2, mode="bicubic", antialias=True,
                      align_corners=False)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    x = ((x + 1) / 2 - mean) / std
    dtype = next(image_encoder.parameters()).dtype
    return image_encoder(x.to(dtype))


def fresh_null_context(context_dim):
    """The learned null context's first value (1,1,context_dim), N(0, 1): a model built from scratch and one built
    from an SD file (init_new_parts) start from the same draw; a Paint-by-Example file's learnable_vector replaces it."""
    return torch.randn(1, 1, context_dim)


@dataclass
class Frozen:
    vae: AutoencoderKL
    image_encoder: DINOv2


def latent_mask(mask, size):
    """Mask at latent size. UNSTATED; docs/method.md §2.6: PBE's bilinear Resize, not re-binarised."""
    return F.interpolate(mask, size=size, mode="bilinear", align_corners=False)


@torch.no_grad()
def prepare(frozen, source, mask, reference, encoder_input_size, generator=None, target=None, encoder_reference=None,
            tokens=True, hint_kind="image", hint=None):
    """Everything computed once per image, without gradients (the VAE and the image encoder are frozen).
    Returns a dict of z0 (latents of the target, for training), z_masked, mask_lat, tokens, hint (the [0,1] hint
    image, or with hint_kind "latent" the latent of the reference pasted into the masked source).
    encoder_reference: what the image encoder sees instead of `reference` (training: the rotated copy,
    data.augment); the hint is always built from `reference`. tokens=False: without the tokens (an image encoder
    that trains computes them itself, with gradients). hint: hint_image's result, given ready (sample.py builds it
    once, to show it too; fake tensors have no values for make_hint to search); with hint_kind "latent" it is still
    encoded here."""
    vae = frozen.vae
    dtype = next(vae.parameters()).dtype
    masked = source * mask  # PBE: the hole becomes 0, mid-grey
    z_masked = vae.encode(masked.to(dtype)).sample(generator) * LATENT_SCALE
    hint = (hint_image(hint_kind, reference, mask, source) if hint is None else hint).to(dtype)
    if hint_kind == "latent":  # drawn between z_masked and z0, as train.drawn_conditioning draws them
        hint = vae.encode(hint * 2 - 1).sample(generator) * LATENT_SCALE
    out = dict(z_masked=z_masked, mask_lat=latent_mask(mask, z_masked.shape[-2:]).to(dtype), hint=hint)
    if tokens:
        out["tokens"] = encode_image_tokens(frozen.image_encoder, reference if encoder_reference is None
                                            else encoder_reference, encoder_input_size)
    if target is not None:  # PBE: the latents of the training target are a posterior sample too
        out["z0"] = vae.encode(target.to(dtype)).sample(generator) * LATENT_SCALE
    return out


# -----------------------------------------------------------------------------
# 4. The model: image tokens to context, main U-Net, hint U-Net encoder (paper §3.2, Fig. 2)


@dataclass
class DTCConfig:
    unet: UNetConfig = field(default_factory=lambda: UNetConfig(in_channels=9))
    image_encoder_dim: int = 1536  # DINOv2 g/14 width
    encoder_input_size: int = 224  # the side the reference is resized to for the image encoder (supp. §5.2: 224 ->
                                   # 257 tokens); read from checkpoints that call it image_size
    image_tokens: str = "all"      # "all": CLS + patches (DTC); "cls": CLS only (PBE-style baseline)
    hint: bool = True              # False: no hint branch (the PBE-style baseline)
    hint_input: str = "full"       # "full": [z_t, z_masked + A(hint), mask], t, context; "latent_only": z_masked + A(hint)
    hint_kind: str = "image"       # the hint's content (dtc.hint_image): "image" (DTC), "edges", "latent" (no adapter)
    fusion: str = "film"           # "film": skip * (1 + gamma) + beta (DTC); "add": skip + conv(f); "xattn": skip
                                   # + attention(skip -> f) (the other two rows of the paper's Table 1)
    mask_channel: str = "keep"     # the U-Net's mask input: "keep" (PBE, 1 = keep) or "fill" (SD-inpainting weights)
    latent_channels: int = 4
    vae_factor: int = 8
    # what the U-Net predicts: "eps" (SD 1.5 and the paper) or "v" = sqrt(a_t) eps - sqrt(1 - a_t) z0 (Salimans &
    # Ho 2022). The tiny preset uses v: at high noise v is about -z0, so a network trained for minutes can carry
    # z_masked into its prediction; an eps network must instead reproduce z_t to ~1% before its x0 means anything
    prediction: str = "eps"
    train_size: int = 512          # the (square) image size it was trained at: sample.py and evaluate.py work at it
    guidance: float = 5.0          # the classifier-free guidance scale to sample with, unless a command is given one
                                   # (the paper's 5; checkpoints written before it was stored read as 5)

    @staticmethod
    def from_dict(d):
        d = dict(d)
        if "image_size" in d:  # its name in checkpoints written before 2026-12-08 (the bundled ones)
            d["encoder_input_size"] = d.pop("image_size")
        unet = UNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.pop("unet").items()})
        # checkpoints written before train_size was stored: SD-width U-Nets were trained at 512, the tiny one at 64
        d.setdefault("train_size", 512 if unet.model_channels >= 320 else 64)
        return DTCConfig(unet=unet, **d)

    @property
    def size_multiple(self):
        """What an image side must be a multiple of to pass the VAE's and the U-Net's downsamplings whole
        (tiny: 16, SD: 64)."""
        return self.vae_factor * 2 ** (len(self.unet.channel_mult) - 1)

    def working_size(self, w, h, longer=None):
        """(w, h) scaled so the longer side is `longer` (None: train_size), each side rounded to a multiple of
        size_multiple (at least one): the size sample.py and evaluate.py work at."""
        longer, m = longer or self.train_size, self.size_multiple
        s = longer / max(w, h)
        return max(m, round(w * s / m) * m), max(m, round(h * s / m) * m)


def baseline_config(cfg):
    """The Paint-by-Example-style baseline of the paper's ablation: CLS token only, no hint branch."""
    return replace(cfg, image_tokens="cls", hint=False)


class DiffuseToChoose(nn.Module):
    """The trainable parts of DTC. The frozen VAE and image encoder live outside (see `Frozen`)."""

    def __init__(self, cfg):
        super().__init__()
        # the main U-Net takes [z_t, z_masked, mask]: 9 channels for SD's 4-channel latents
        assert cfg.unet.in_channels == 2 * cfg.latent_channels + 1, "U-Net input must be [z_t, z_masked, mask]"
        self.cfg = cfg
        # image tokens -> context (supp. §5.2: one Linear trained from scratch) and the learned null context
        # for classifier-free guidance (PBE's learnable_vector). One null token is exact for any token count:
        # attention over T identical keys/values equals attention over one of them.
        self.token_proj = nn.Linear(cfg.image_encoder_dim, cfg.unet.context_dim)
        self.null_context = nn.Parameter(fresh_null_context(cfg.unet.context_dim))
        # main U-Net, 9 input channels in PBE's order [z_t, z_masked, mask]
        self.unet = UNet(cfg.unet)
        if cfg.hint:
            # hint encoder: a trainable copy of input blocks + middle block (13 taps for SD)
            hint_in = cfg.unet.in_channels if cfg.hint_input == "full" else cfg.latent_channels
            self.hint_encoder = UNet(replace(cfg.unet, in_channels=hint_in), encoder_only=True)
            if cfg.hint_kind != "latent":  # the latent hint is a VAE latent already
                self.adapter = HintAdapter(cfg.latent_channels, cfg.vae_factor)
            # fusion at the 13 taps (section 5), zero-initialised so that a fresh DTC computes exactly its base U-Net
            self.fusion = fusion_layers(cfg)

    def context(self, features, drop=None):
        """(B,T,D_enc) image-encoder tokens -> (B,T',ctx). `drop` (B,) bool replaces a sample's tokens by the
        null context (guidance dropout in training)."""
        if self.cfg.image_tokens == "cls":
            features = features[:, :1]
        ctx = self.token_proj(features)
        if drop is not None:
            ctx = torch.where(drop[:, None, None], self.null_context.to(ctx.dtype).expand_as(ctx), ctx)
        return ctx

    def uncond_context(self, context):
        return self.null_context.to(context.dtype).expand(context.shape[0], 1, -1)

    def unet_input(self, z_t, z, mask_lat):
        """[z_t, z, mask]: the main U-Net's input (z = z_masked) and the full hint input (z = z_masked + A(hint)),
        the mask channel in the polarity the weights expect (cfg.mask_channel)."""
        return torch.cat([z_t, z, mask_lat if self.cfg.mask_channel == "keep" else 1 - mask_lat], 1)

    def hint_latent(self, z_masked, hint):
        """What the hint encoder reads in place of z_masked: z_masked + adapter(hint image) (paper §3.2), or the
        latent hint as it is (hint_kind "latent"); in z_masked's dtype either way."""
        hint = hint.to(z_masked.dtype)
        return hint if self.cfg.hint_kind == "latent" else z_masked + self.adapter(hint)

    def hint_features(self, z_hint, z_t=None, t=None, mask_lat=None, context=None):
        """The hint encoder's 13 taps (12 skips + middle). z_hint = z_masked + adapter(hint), (B,4,h,w).
        "full" (UNSTATED; docs/method.md §2.3, as ControlNet): input [z_t, z_hint, mask] with t and the context.
        "latent_only": z_hint alone at t = 0 with the null context, so it can be computed once per image."""
        enc = self.hint_encoder
        if self.cfg.hint_input == "full":
            x = self.unet_input(z_t, z_hint, mask_lat)
        else:
            x, context = z_hint, self.null_context.to(z_hint.dtype).expand(z_hint.shape[0], 1, -1)
            t = torch.zeros(z_hint.shape[0], dtype=torch.long, device=z_hint.device)
        h, skips = enc.encode(x, enc.time_embedding(t).to(x.dtype), context)
        return skips + [h]

    def fuse(self, skips, h, feats):
        """FiLM (paper §3.2, UNSTATED form, docs/method.md §2.4): gamma, beta = conv(f); s * (1 + gamma) + beta,
        at the 12 skips and the middle block output. "add": s + conv(f). "xattn": s + attention(s -> f)."""
        fused = []
        for s, f, layer in zip(skips + [h], feats, self.fusion):
            if self.cfg.fusion == "film":
                gamma, beta = layer(f).chunk(2, 1)
                fused.append(s * (1 + gamma) + beta)
            else:  # add and xattn are both residual: the layer returns what is added to the skip
                fused.append(s + (layer(f) if self.cfg.fusion == "add" else layer(s, f)))
        return fused[:-1], fused[-1]

    def forward(self, z_t, t, z_masked, mask_lat, context, hint=None, hint_feats=None):
        """The U-Net's prediction (B,4,h,w): eps, or v with cfg.prediction = "v". z_t, z_masked (B,4,h,w);
        mask_lat (B,1,h,w) 1 = keep; context (B,T,ctx); hint (B,3,H,W) the [0,1] hint image, or hint_feats
        precomputed by `hint_features`."""
        emb = self.unet.time_embedding(t).to(z_t.dtype)
        h, skips = self.unet.encode(self.unet_input(z_t, z_masked, mask_lat), emb, context)
        if self.cfg.hint:
            if hint_feats is None:
                hint_feats = self.hint_features(self.hint_latent(z_masked, hint), z_t, t, mask_lat, context)
            skips, h = self.fuse(skips, h, hint_feats)
        return self.unet.decode(h, skips, emb, context)


# What trains (train.py --train; bench.py's memory rows): "all", every part of DiffuseToChoose (the paper); "hint",
# the main U-Net frozen as initialised, so that only the hint encoder, adapter (none with hint_kind "latent"), fusion,
# token projection and null context train (ControlNet's recipe, the one-GPU recipe: a third of the trained parameters)
TRAINED = ("all", "hint")


def freeze_for(model, train):
    """model with requires_grad set for `train` (one of TRAINED); returns model."""
    model.requires_grad_(True)
    model.unet.requires_grad_(train == "all")
    return model


# -----------------------------------------------------------------------------
# 5. Fusion: the hint encoder's features into the main U-Net's 13 skip taps (paper §3.2, Fig. 4, Table 1)


def fusion_layers(cfg):
    """The 13 fusion layers of a config, their outputs zero-initialised so that a fresh DTC computes exactly its base
    U-Net (the pretrained one keeps its quality while the hint branch learns): FiLM a 1x1 conv to (gamma, beta), add
    a 1x1 conv, xattn a CrossAttentionFusion."""
    layers = []
    for c in tap_channels(cfg.unet):
        if cfg.fusion == "xattn":
            layers.append(CrossAttentionFusion(c))
        else:
            conv = nn.Conv2d(c, (2 if cfg.fusion == "film" else 1) * c, 1)
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)
            layers.append(conv)
    return nn.ModuleList(layers)


class CrossAttentionFusion(nn.Module):
    """fusion="xattn", the third fusion of the paper's Table 1: at one tap, every pixel of the main U-Net's skip
    attends to the hint encoder's features at the same tap (queries from the skip, keys and values from the hint
    features; multi-head, 64 channels a head as SD's attention; pre-LayerNorm over channels). The paper says only
    "cross-attention". Ours attends within a window x window neighbourhood of the pixel's own place, with a learned
    bias per head and offset (Swin's relative position bias), so a pixel finds the hint where it is and, among its
    neighbours, by what it looks like. Tried first and dropped: attention over the whole map with no positions (a
    pixel can find the hint only by its look: no better than no hint in the teaching world), and over the whole map
    with 2-D sinusoidal positions on queries and keys (still no better than no hint after 250 steps: matching places
    through random projections is learned slowly). Returns what is added to the skip; proj_out starts at zero, so a
    fresh model is its base U-Net."""

    def __init__(self, channels, head_dim=64, window=5):
        super().__init__()
        self.heads, self.window = max(1, channels // head_dim), window
        self.norm_q, self.norm_kv = nn.LayerNorm(channels), nn.LayerNorm(channels)
        self.to_q = nn.Linear(channels, channels, bias=False)
        self.to_k = nn.Linear(channels, channels, bias=False)
        self.to_v = nn.Linear(channels, channels, bias=False)
        self.position_bias = nn.Parameter(torch.zeros(self.heads, window * window))
        self.proj_out = nn.Linear(channels, channels)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, skip, feats):
        B, C, H, W = skip.shape
        heads, k = self.heads, self.window
        q = self.to_q(self.norm_q(skip.flatten(2).transpose(1, 2)))  # (B,HW,C)
        kv = self.norm_kv(feats.flatten(2).transpose(1, 2))
        # each pixel's k x k neighbourhood of keys and values: (B,HW,C) -> (B,heads,C/heads,k*k,HW), zero outside
        around = lambda x: F.unfold(x.transpose(1, 2).reshape(B, C, H, W), k, padding=k // 2).view(
            B, heads, C // heads, k * k, H * W)
        inside = F.unfold(skip.new_ones(1, 1, H, W), k, padding=k // 2).view(1, 1, k * k, H * W) > 0
        q = q.transpose(1, 2).reshape(B, heads, C // heads, 1, H * W)
        scores = (q * around(self.to_k(kv))).sum(2) / math.sqrt(C // heads) + self.position_bias[:, :, None]
        attention = scores.masked_fill(~inside, float("-inf")).softmax(2)  # (B,heads,k*k,HW), over the window
        out = (attention[:, :, None] * around(self.to_v(kv))).sum(3).reshape(B, C, H * W)  # (B,C,HW)
        return self.proj_out(out.transpose(1, 2)).transpose(1, 2).reshape(B, C, H, W)


def tap_channels(cfg):
    """Channels of the 12 skips + middle output of a U-Net config (320,320,320,320,640,... for SD)."""
    chans, ch = [cfg.model_channels], cfg.model_channels
    for level, mult in enumerate(cfg.channel_mult):
        ch = cfg.model_channels * mult
        chans += [ch] * cfg.num_res_blocks
        if level != len(cfg.channel_mult) - 1:
            chans.append(ch)
    return chans + [ch]


# -----------------------------------------------------------------------------
# 6. Losses: the diffusion loss (paper Eq. 1), and the VGG perceptual loss on the decoded x0 (paper §3.1:
# "a refinement loss similar to DCI-VTON")


def diffusion_loss(model, schedule, cond, generator=None, drop=None):
    """Eq. 1 of the paper: ||eps - eps_theta(z_t, t, z_masked, c, hint)||^2, t uniform, plain mean over latents
    (with prediction "v": the same against v). Returns (loss, eps_pred, z_t, t), eps_pred as eps either way, so the
    caller can add the perceptual loss on x0."""
    z0 = cond["z0"]
    B = z0.shape[0]
    t = torch.randint(0, schedule.num_steps, (B,), generator=generator).to(z0.device)
    noise = torch.randn(z0.shape, generator=generator).to(z0.device, z0.dtype)
    z_t = schedule.add_noise(z0, noise, t)
    context = model.context(cond["tokens"].to(z0.dtype), drop)
    out = model(z_t, t, cond["z_masked"], cond["mask_lat"], context, hint=cond["hint"])
    target = noise if model.cfg.prediction == "eps" else schedule.v_target(z0, noise, t)
    return F.mse_loss(out.float(), target.float()), schedule.eps_from(out, z_t, t, model.cfg.prediction), z_t, t


class VGGLoss(nn.Module):
    """VGG-19 relu1_2, relu2_2, relu3_2, relu4_2, relu5_2 with weights 1/32 ... 1 and L1 distance
    (UNSTATED layers and weights; docs/method.md §3.1: DCI-VTON's). Weights from a local torchvision file."""

    TAPS = (3, 8, 13, 22, 31)
    WEIGHTS = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1.0)

    def __init__(self, weights_path=None):
        super().__init__()
        import torchvision
        # with a file, built on meta and the file's tensors assigned: no random init of 143M parameters to overwrite
        with torch.device("meta" if weights_path is not None else torch.get_default_device()):
            features = torchvision.models.vgg19(weights=None).features[:self.TAPS[-1] + 1]
        for layer in features:
            if isinstance(layer, nn.ReLU):
                layer.inplace = False  # the taps must survive the next layer
        if weights_path is not None:
            sd, source = read_state_dict(weights_path)
            sd = {k: v for k, v in strip_prefix(sd, "features.").items() if int(k.split(".")[0]) <= self.TAPS[-1]}
            load_strict(features, cast_floats(sd, torch.float32), source,
                        "expected torchvision's vgg19 file (vgg19-dcbb9e9d.pth)")
        self.features = features.requires_grad_(False).eval()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x, y):
        h = torch.cat([x, y]).float()
        h = ((h + 1) / 2 - self.mean) / self.std
        loss, taps = 0.0, dict(zip(self.TAPS, self.WEIGHTS))
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in taps:
                a, b = h.chunk(2)
                loss = loss + taps[i] * F.l1_loss(a, b.detach())
        return loss


# -----------------------------------------------------------------------------
# 7. Diffusion: sampling with classifier-free guidance (the schedule and the DDIM / DDPM steps are diffusion.py)


def guided_eps(model, schedule, z, t, cond, context, guidance, hint_feats=None):
    """The U-Net's prediction at (z, t) as eps, with classifier-free guidance eps(null) + s (eps(c) - eps(null)),
    the hint kept in both branches (docs/method.md §4). The two branches run as one batch [null, conditional] (one
    forward of twice the batch is faster than two of one); guidance 1 is the conditional branch alone."""
    tt = torch.full((z.shape[0],), t, device=z.device, dtype=torch.long)
    if guidance == 1.0:
        out = model(z, tt, cond["z_masked"], cond["mask_lat"], context, hint=cond["hint"], hint_feats=hint_feats)
        return schedule.eps_from(out, z, tt, model.cfg.prediction)
    two = lambda x: torch.cat([x, x])  # the batch of both branches, [null, conditional]
    null = model.uncond_context(context).expand(-1, context.shape[1], -1)
    feats = None if hint_feats is None else [two(f) for f in hint_feats]
    z2, t2 = two(z), two(tt)
    out = model(z2, t2, two(cond["z_masked"]), two(cond["mask_lat"]), torch.cat([null, context]),
                hint=two(cond["hint"]), hint_feats=feats)
    eps_null, eps_cond = schedule.eps_from(out, z2, t2, model.cfg.prediction).chunk(2)
    return eps_null + guidance * (eps_cond - eps_null)


@torch.no_grad()
def sample_latents(model, schedule, cond, steps=40, guidance=5.0, eta=0.0, sampler="ddim", generator=None,
                   progress=True, trace=None):
    """Denoise from pure noise: at each step the guided eps, then one DDIM step (paper §4.1 / supp. §5.2: 40 steps,
    guidance 5, eta UNSTATED: 0) or one DDPM step (sampler "ddpm": every one of the schedule's 1000 steps; `steps`
    is not used). trace: a list that receives (t, z_t, guided x0 estimate) at every step (sample.py --explain)."""
    z_masked = cond["z_masked"]
    context = model.context(cond["tokens"].to(z_masked.dtype))
    z = torch.randn(z_masked.shape, generator=generator, dtype=torch.float32).to(z_masked.device, z_masked.dtype)
    hint_feats = None
    if model.cfg.hint and model.cfg.hint_input == "latent_only":  # independent of t and c: computed once
        hint_feats = model.hint_features(model.hint_latent(z_masked, cond["hint"]))
    ts = schedule.ddim_timesteps(steps) if sampler == "ddim" else list(range(schedule.num_steps))[::-1]
    for i, t in enumerate(tqdm(ts, desc=f"{sampler} sampling", disable=not progress, leave=False)):
        eps = guided_eps(model, schedule, z, t, cond, context, guidance, hint_feats)
        if trace is not None:
            trace.append((t, z, schedule.predict_x0(z, eps.to(z.dtype), torch.full((z.shape[0],), t, device=z.device))))
        if sampler == "ddim":
            z = schedule.ddim_step(z, eps, t, ts[i + 1] if i + 1 < len(ts) else -1, eta, generator)
        else:
            z = schedule.ddpm_step(z, eps, t, generator)
    return z


@torch.no_grad()
def generate(model, frozen, source, mask, reference, generator, steps=40, guidance=None, eta=0.0, sampler="ddim",
             hint=None, zero_hint=False, trace=None, progress=True):
    """One call from images to results: prepare, sample_latents, VAE decode. Returns the results (B,3,H,W) in [-1,1],
    float32, before any paste-back. guidance None: the model's own (DTCConfig.guidance); hint: hint_image's result,
    when the caller has built it already (to show it); zero_hint: the hint all zeros (an empty canvas), to measure
    what the hint contributes; trace: see sample_latents."""
    guidance = model.cfg.guidance if guidance is None else guidance
    cond = prepare(frozen, source, mask, reference, model.cfg.encoder_input_size, generator,
                   hint_kind=model.cfg.hint_kind, hint=hint)
    if zero_hint:
        cond["hint"] = torch.zeros_like(cond["hint"])
    z = sample_latents(model, Schedule(), cond, steps, guidance, eta, sampler, generator, progress, trace)
    return frozen.vae.decode(z / LATENT_SCALE).float().clamp(-1, 1)


# -----------------------------------------------------------------------------
# 8. Building from the original files


def from_original(sd_file, dinov2_file, dtype=None, seed=0, **overrides):
    """A fresh DTC from an SD 1.5, SD 1.5-inpainting or Paint-by-Example file and a DINOv2 hub file.
    Returns (model, frozen). The VAE comes from the same SD file; the hint encoder is copied from the
    main encoder (ControlNet's recipe, paper §3.2 "trainable replica"). The parts the file lacks are drawn
    from `seed`, so the same files and seed give the same model."""
    sd, source = read_state_dict(sd_file)
    image_encoder = load_dinov2(dinov2_file, dtype=dtype)
    vae = load_vae(sd, dtype, source)  # the keys under first_stage_model.; errors name the SD file
    unet_sd, kind = to_pbe_layout(load_unet(sd, dtype, source=source).state_dict(), sd, source)
    cfg = DTCConfig(unet=infer_unet_config(unet_sd), image_encoder_dim=image_encoder.cfg.embed_dim,
                    mask_channel="fill" if kind == "sd15-inpainting" else "keep",
                    latent_channels=vae.cfg.embed_dim, vae_factor=vae.cfg.downsample_factor)
    cfg = replace(cfg, **overrides)
    with torch.device("meta"):
        model = DiffuseToChoose(cfg)
    with torch.random.fork_rng(devices=[]):  # seeded draws, and the caller's global RNG left as it was
        torch.manual_seed(seed)
        new = init_new_parts(cfg, unet_sd, sd)
    load_strict(model, {**{"unet." + k: v for k, v in unet_sd.items()}, **new}, source)
    return model.train(), Frozen(vae=vae.requires_grad_(False), image_encoder=image_encoder.requires_grad_(False))


def to_pbe_layout(unet_sd, full_sd, source):
    """conv_in to PBE's 9-channel order [z_t, z_masked, mask]. Returns (unet_sd, kind)."""
    w = unet_sd["input_blocks.0.0.weight"]
    if w.shape[1] == 4:  # SD 1.5 text-to-image: 5 zero channels, as PBE's scripts/modify_checkpoints.py did
        unet_sd = dict(unet_sd, **{"input_blocks.0.0.weight": torch.cat([w, w.new_zeros(w.shape[0], 5, *w.shape[2:])], 1)})
        return unet_sd, "sd15"
    if w.shape[1] != 9:
        raise CheckpointError(f"{source}: the U-Net takes {w.shape[1]} input channels; expected 4 (SD 1.5) or 9 "
                              "(SD 1.5-inpainting, Paint-by-Example)")
    if "learnable_vector" in full_sd or any(k.startswith("cond_stage_model.mapper.") for k in full_sd):
        return unet_sd, "paint-by-example"  # already [z_t, z_masked, mask], mask 1 = keep
    # SD 1.5-inpainting: [z_t, mask, z_masked] with mask 1 = fill -> permute to [z_t, z_masked, mask];
    # the polarity is kept by feeding the U-Net 1 - mask (DTCConfig.mask_channel = "fill"), which is exact
    unet_sd = dict(unet_sd, **{"input_blocks.0.0.weight": torch.cat([w[:, :4], w[:, 5:9], w[:, 4:5]], 1)})
    return unet_sd, "sd15-inpainting"


def init_new_parts(cfg, unet_sd, full_sd):
    """Initial weights of everything the original file lacks, keyed as in DiffuseToChoose."""
    sd = {}
    dtype = unet_sd["input_blocks.0.0.weight"].dtype
    # token projection: fresh (supp. §5.2: "trained from scratch"); null context: PBE's learnable_vector if present
    proj = nn.Linear(cfg.image_encoder_dim, cfg.unet.context_dim)
    sd["token_proj.weight"], sd["token_proj.bias"] = proj.weight.detach(), proj.bias.detach()
    null = full_sd.get("learnable_vector")
    sd["null_context"] = null.reshape(1, 1, -1).clone() if null is not None and null.shape[-1] == cfg.unet.context_dim \
        else fresh_null_context(cfg.unet.context_dim)
    if cfg.hint:
        enc = {k: v.clone() for k, v in unet_sd.items() if k.startswith(("time_embed.", "input_blocks.", "middle_block."))}
        w = enc["input_blocks.0.0.weight"]
        if cfg.hint_input == "latent_only":  # a 4-channel conv_in reading latents: the pretrained z_t channels
            enc["input_blocks.0.0.weight"] = w[:, :4].clone()
        elif w[:, 4:8].abs().sum() == 0:  # SD text-to-image init: give the hint a path (docs/method.md §2.3)
            enc["input_blocks.0.0.weight"] = torch.cat([w[:, :4], w[:, :4], w[:, 8:]], 1)
        sd.update({"hint_encoder." + k: v for k, v in enc.items()})
        if cfg.hint_kind != "latent":
            adapter = HintAdapter(cfg.latent_channels, cfg.vae_factor)
            sd.update({"adapter." + k: v.detach() for k, v in adapter.state_dict().items()})
        sd.update({"fusion." + k: v for k, v in fusion_layers(cfg).state_dict().items()})
    return {k: v.to(dtype) for k, v in sd.items()}


# -----------------------------------------------------------------------------
# 8b. Building from scratch: the tiny architecture

# The tiny architecture: DTC's, narrow, trained from scratch by train.py's tiny preset (the bundled models) and
# timed by bench.py --arch=tiny. The encoder's img_size and DTC's encoder_input_size follow the training size.
# 4x downsampling: 64x64 -> 16x16. One norm group: a narrow VAE with SD's 32 groups normalises colour away. 8 latent
# channels (SD: 4): 4 kept too little of the teaching world's edges (held-out targets: 22.9 dB and 0.57 of their
# edge energy after 3000 steps; 8 with train_vae's recipe: see README, "The teaching world")
TINY_VAE = VAEConfig(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, norm_groups=1, z_channels=8, embed_dim=8)
TINY_UNET = UNetConfig(in_channels=2 * TINY_VAE.embed_dim + 1, out_channels=TINY_VAE.embed_dim, model_channels=32,
                       channel_mult=(1, 2, 2), num_res_blocks=1, attention_levels=(1, 2), num_heads=4, context_dim=64)
TINY_ENCODER = DINOv2Config(embed_dim=64, depth=3, num_heads=4, ffn="mlp", patch_size=8, img_size=64,
                            interpolate_offset=0.0)


def tiny_config(size, **variant):
    """The tiny DTC's config at a training size (square images of `size`); `variant` as DTCConfig's fields."""
    return DTCConfig(unet=TINY_UNET, image_encoder_dim=TINY_ENCODER.embed_dim, encoder_input_size=size, prediction="v",
                     latent_channels=TINY_VAE.embed_dim, vae_factor=TINY_VAE.downsample_factor, train_size=size,
                     **variant)


@torch.no_grad()
def init_from_scratch(module, generator):
    """The tiny preset's init for the SD-shaped networks it trains from scratch (the VAE, the U-Net and the hint
    encoder). With PyTorch's default init (each conv shrinks a signal by about sqrt(3)) and random residual
    branches, a fresh tiny VAE passes a flat colour to its output at 2-19% of its size (seed-dependent), and
    training spends its first thousand steps finding the colours: reconstructions stay grey. Here every conv is
    variance-preserving, N(0, 1/fan_in), and the last conv of every residual branch starts at zero, as ldm's
    zero_module does in its U-Net (ResBlock out_layers, SpatialTransformer proj_out, the output conv): a fresh
    network is a short chain of convs that passes its input through. On the teaching world the VAE reaches
    25.0 dB PSNR after 750 steps instead of 21.6 dB."""
    for name, m in module.named_modules():
        if isinstance(m, nn.Conv2d):
            zero = name.endswith(("conv2", "proj_out", "out_layers.3")) or name == "out.2"
            nn.init.normal_(m.weight, std=0.0 if zero else m.weight[0].numel() ** -0.5, generator=generator)
            nn.init.zeros_(m.bias)


# -----------------------------------------------------------------------------
# 9. DTC checkpoints: the trainable parts as safetensors, the config in the metadata


def save_dtc(model, path, frozen=None):
    """Writes the trainable parts (and, for models trained from scratch, the frozen ones under `vae.` and
    `image_encoder.`) to `path`, through a temporary file so an existing checkpoint is never half-written."""
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if frozen is not None:
        sd.update({"vae." + k: v.contiguous() for k, v in frozen.vae.state_dict().items()})
        sd.update({"image_encoder." + k: v.contiguous() for k, v in frozen.image_encoder.state_dict().items()})
    meta = {"format": "dtc", "dtc_config": json.dumps(asdict(model.cfg))}
    if frozen is not None:
        meta["vae_config"] = json.dumps(asdict(frozen.vae.cfg))
        meta["image_encoder_config"] = json.dumps(asdict(frozen.image_encoder.cfg))
    tmp = f"{path}.tmp"
    save_file(sd, tmp, metadata=meta)
    umask = os.umask(0)  # (read by setting it, then put back)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # safetensors writes mode 0600; every other output gets the user's usual mode
    os.replace(tmp, path)


def load_dtc(path, dtype=None):
    """Returns (model, frozen or None). Strict: a file that is not a DTC checkpoint gets a clear error."""
    from safetensors import safe_open
    source = str(path)
    if why := not_a_file(source):
        raise CheckpointError(f"{source}: {why}")
    try:
        with safe_open(source, "pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise CheckpointError(f"{source}: not a DTC checkpoint (expected the .safetensors file written by train.py; "
                              f"this one does not open as safetensors: {str(e).splitlines()[0]})") from None
    if meta.get("format") != "dtc":
        raise CheckpointError(f"{source}: not a DTC checkpoint (no dtc_config in its metadata); "
                              "SD, DINOv2 and VAE files go to --sd and --dinov2")
    sd, _ = read_state_dict(source)
    sd = cast_floats(sd, dtype)
    cfg = config_from_metadata(meta, "dtc_config", DTCConfig.from_dict, source)
    with torch.device("meta"):
        model = DiffuseToChoose(cfg)
    load_strict(model, {k: v for k, v in sd.items() if not k.startswith(("vae.", "image_encoder."))}, source)
    frozen = None
    if "vae_config" in meta or "image_encoder_config" in meta:  # a model trained from scratch: both are there
        vcfg = config_from_metadata(meta, "vae_config", lambda d: VAEConfig(
            **{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}), source)
        icfg = config_from_metadata(meta, "image_encoder_config", lambda d: DINOv2Config(**d), source)
        with torch.device("meta"):
            vae = AutoencoderKL(vcfg)
            enc = DINOv2(icfg)
        load_strict(vae, strip_prefix(sd, "vae."), source)
        load_strict(enc, strip_prefix(sd, "image_encoder."), source)
        frozen = Frozen(vae=vae.eval().requires_grad_(False), image_encoder=enc.eval().requires_grad_(False))
    return model.eval(), frozen


def load_for_sampling(dtc_file, sd_file=None, dinov2_file=None, dtype=None, device="cpu", seed=0):
    """(model, frozen) on `device`, ready to sample (what sample.py and evaluate.py load): a DTC checkpoint with its
    frozen VAE and image encoder, which a model trained from scratch carries and a model trained from SD takes from
    the SD and DINOv2 files; with dtc_file None, an untrained DTC built from those files (its new parts drawn from
    `seed`: useful only to check the wiring)."""
    if dtc_file is None:
        model, frozen = from_original(sd_file, dinov2_file, dtype=dtype, seed=seed)
    else:
        model, frozen = load_dtc(dtc_file, dtype=dtype)
        if frozen is None:
            if sd_file is None or dinov2_file is None:
                raise CheckpointError(f"{dtc_file}: holds only the trainable parts; give --sd and --dinov2 for the "
                                      "frozen VAE and image encoder")
            frozen = Frozen(vae=load_vae(sd_file, dtype), image_encoder=load_dinov2(dinov2_file, dtype=dtype))
    frozen.vae.to(device)
    frozen.image_encoder.to(device)
    return model.eval().to(device), frozen
