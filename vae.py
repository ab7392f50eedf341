"""
The Stable Diffusion v1 autoencoder (ldm's AutoencoderKL), written from scratch.

It maps a (B, 3, H, W) image in [-1, 1] to a diagonal Gaussian over (B, 4, H/8, W/8) latents and back.
DTC keeps it frozen: it encodes the target, the masked source and the hint canvas, and decodes the
final latent. Every submodule is named as the original keys after `first_stage_model.`
(`encoder.down.0.block.1.conv2.weight`, `decoder.up.3.upsample.conv.bias`, `quant_conv.weight`, ...),
so loading is a prefix strip and a strict load.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from checkpoint import CheckpointError, cast_floats, likely_cause, load_strict, read_state_dict, strip_prefix

# SD v1's `scale_factor`: the U-Net works on VAE latents times this, which brings them to about unit variance.
# Encode: z = LATENT_SCALE * vae.encode(x).sample(); decode: vae.decode(z / LATENT_SCALE).
LATENT_SCALE = 0.18215


@dataclass
class VAEConfig:
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128                      # channels at full resolution; level i has ch * ch_mult[i]
    ch_mult: tuple = (1, 2, 4, 4)      # one entry per resolution; all but the last halve H and W
    num_res_blocks: int = 2            # per encoder level (the decoder has one more per level)
    z_channels: int = 4                # the encoder outputs 2 * z_channels (mean and logvar: ldm's double_z=True)
    embed_dim: int = 4                 # latent channels after quant_conv, the ones the U-Net sees
    norm_groups: int = 32              # SD's. A narrow VAE needs fewer: with one channel per group every norm
                                       # removes each channel's mean, and with it the image's colours

    @property
    def downsample_factor(self):
        return 2 ** (len(self.ch_mult) - 1)  # 8 for SD: 512x512 images <-> 64x64 latents


def group_norm(channels, groups):
    return nn.GroupNorm(groups, channels, eps=1e-6)  # every VAE norm in ldm: 32 groups, eps 1e-6 (the U-Net uses 1e-5)


class ResnetBlock(nn.Module):
    """norm-SiLU-conv twice, plus the input; a 1x1 conv `nin_shortcut` where the width changes. No time embedding."""

    def __init__(self, in_ch, out_ch, groups):
        super().__init__()
        self.norm1 = group_norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = group_norm(out_ch, groups)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)  # SD's dropout before this conv is 0.0: left out
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels; q, k, v and proj_out are 1x1 convs, as in the checkpoint."""

    def __init__(self, ch, groups):
        super().__init__()
        self.norm = group_norm(ch, groups)
        self.q = nn.Conv2d(ch, ch, 1)
        self.k = nn.Conv2d(ch, ch, 1)
        self.v = nn.Conv2d(ch, ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x):
        H = x.shape[2]
        h = self.norm(x)
        # (B, C, H, W) -> (B, 1 head, H*W tokens, C); SDPA's default scale is C**-0.5, as in ldm
        q, k, v = (rearrange(conv(h), "b c h w -> b 1 (h w) c") for conv in (self.q, self.k, self.v))
        h = rearrange(F.scaled_dot_product_attention(q, k, v), "b 1 (h w) c -> b c h w", h=H)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x):
        # ldm pads only right and bottom, then convolves with stride 2 and no padding: H -> H/2 for even H
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """The only attention in SD's VAE (attn_resolutions is empty): at the lowest resolution, between two ResnetBlocks."""

    def __init__(self, ch, groups):
        super().__init__()
        self.block_1 = ResnetBlock(ch, ch, groups)
        self.attn_1 = AttnBlock(ch, groups)
        self.block_2 = ResnetBlock(ch, ch, groups)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = cfg.ch
        for i, width in enumerate(widths):
            level = nn.Module()  # a bare container, so the keys read down.{i}.block.{j} and down.{i}.downsample
            level.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                level.block.append(ResnetBlock(block_in, width, cfg.norm_groups))
                block_in = width
            if i != len(widths) - 1:
                level.downsample = Downsample(width)
            self.down.append(level)
        self.mid = MidBlock(block_in, cfg.norm_groups)
        self.norm_out = group_norm(block_in, cfg.norm_groups)
        self.conv_out = nn.Conv2d(block_in, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for i, level in enumerate(self.down):
            for block in level.block:
                h = block(h)
            if i != len(self.down) - 1:
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 2*z_channels, H/f, W/f)


class Decoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        block_in = widths[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = MidBlock(block_in, cfg.norm_groups)
        # up.{i} belongs to resolution level i (up.0 is full resolution), although the data flows from the
        # last level to the first; as in ldm, build in data order and insert at the front
        self.up = nn.ModuleList()
        for i in reversed(range(len(widths))):
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                level.block.append(ResnetBlock(block_in, widths[i], cfg.norm_groups))
                block_in = widths[i]
            if i != 0:
                level.upsample = Upsample(block_in)
            self.up.insert(0, level)
        self.norm_out = group_norm(block_in, cfg.norm_groups)
        self.conv_out = nn.Conv2d(block_in, cfg.out_ch, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for i in reversed(range(len(self.up))):
            for block in self.up[i].block:
                h = block(h)
            if i != 0:
                h = self.up[i].upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, out_ch, H, W)


class DiagonalGaussian:
    """The posterior q(z|x) from the encoder's moments (B, 2*embed_dim, h, w): first half mean, second half logvar."""

    def __init__(self, moments):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)  # as ldm: keeps exp() finite in any dtype
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator=None):
        # the noise is drawn on the generator's device (a CPU generator gives the same latents on any
        # device, as in diffusers), then moved to the mean's device and dtype
        device = generator.device if generator is not None else self.mean.device
        noise = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.device)

    def mode(self):
        return self.mean


class AutoencoderKL(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def encode(self, x):
        """x: (B, 3, H, W) in [-1, 1], H and W multiples of cfg.downsample_factor -> DiagonalGaussian over
        (B, embed_dim, H/f, W/f) UNscaled latents (multiply a sample by LATENT_SCALE before the U-Net)."""
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z):
        """z: (B, embed_dim, h, w) UNscaled latents (the caller divides the U-Net's latents by LATENT_SCALE)
        -> (B, 3, h*f, w*f) image, nominally in [-1, 1] (not clamped)."""
        return self.decoder(self.post_quant_conv(z))


@torch.no_grad()
def fold_latent_scale(vae, s):
    """Makes the VAE's latents s times larger, exactly: the posterior's mean x s (logvar + 2 log s) in quant_conv,
    and post_quant_conv / s, so decode(s z) is the old decode(z). A VAE trained from scratch (train.py's tiny
    preset) has latents of its own scale; folding 1 / (LATENT_SCALE x their std) into it lets every other part use
    SD's LATENT_SCALE unchanged, with unit-variance latents."""
    E = vae.cfg.embed_dim  # quant_conv's outputs: E means, then E logvars
    vae.quant_conv.weight[:E] *= s
    vae.quant_conv.bias[:E] *= s
    vae.quant_conv.bias[E:] += 2 * math.log(s)
    vae.post_quant_conv.weight /= s


def infer_vae_config(sd):
    """The VAEConfig of a bare VAE state dict (keys encoder.*, decoder.*, ...), read from tensor shapes."""
    ch, in_channels = sd["encoder.conv_in.weight"].shape[:2]
    n_levels = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.down."))
    n_blocks = 1 + max(int(k.split(".")[4]) for k in sd if k.startswith("encoder.down.0.block."))
    return VAEConfig(in_channels=in_channels, out_ch=sd["decoder.conv_out.weight"].shape[0], ch=ch,
                     ch_mult=tuple(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in range(n_levels)),
                     num_res_blocks=n_blocks, z_channels=sd["decoder.conv_in.weight"].shape[1],
                     embed_dim=sd["post_quant_conv.weight"].shape[1])


def load_vae(path_or_state_dict, dtype=None, source="<state dict>"):
    """An AutoencoderKL in eval mode from a full SD / Paint-by-Example checkpoint (the keys under
    `first_stage_model.`; the rest of the file is ignored) or a bare VAE file such as
    vae-ft-mse-840000-ema-pruned.{ckpt,safetensors}. Keeps the file's dtype unless `dtype` is given."""
    sd, source = read_state_dict(path_or_state_dict, source)
    if any(k.startswith("first_stage_model.") for k in sd):
        sd = strip_prefix(sd, "first_stage_model.")
    # the original VAE .ckpt also carries its training loss (LPIPS and discriminator) and EMA copies: not the model
    sd = {k: v for k, v in sd.items() if not k.startswith(("loss.", "model_ema."))}
    if not any(k.startswith(("encoder.", "decoder.")) for k in sd):
        raise CheckpointError(f"{source}: no first_stage_model. or encoder./decoder. keys: "
                              f"not an SD VAE or SD checkpoint")
    try:
        cfg = infer_vae_config(sd)
    except (KeyError, ValueError):  # not ldm's layout (e.g. diffusers names): compare with SD's to list the differences
        cfg = VAEConfig()
    with torch.device("meta"):
        model = AutoencoderKL(cfg)
    return load_strict(model, cast_floats(sd, dtype), source, likely_cause(sd)).eval()
