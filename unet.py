"""
The Stable Diffusion 1.x latent U-Net (the noise predictor of SD 1.5, SD 1.5-inpainting and Paint-by-Example).

References:
1) the original code, CompVis/stable-diffusion: ldm/modules/diffusionmodules/openaimodel.py (UNetModel, ResBlock)
   and ldm/modules/attention.py (SpatialTransformer, BasicTransformerBlock, CrossAttention)
   https://github.com/CompVis/stable-diffusion
2) its config, configs/stable-diffusion/v1-inference.yaml: model_channels 320, channel_mult [1,2,4,4],
   num_res_blocks 2, attention_resolutions [4,2,1], num_heads 8, context_dim 768

Every submodule is named as in the original files after the `model.diffusion_model.` prefix, so loading is a
prefix strip plus a strict load (load_unet). The forward is split in two halves, encode and decode, because DTC
modulates the 12 skip tensors and the middle-block output between them, and its hint encoder is a second copy
of the first half (UNet(cfg, encoder_only=True)).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import checkpoint

from checkpoint import CheckpointError, cast_floats, likely_cause, load_strict, read_state_dict, strip_prefix

ldm_prefix = "model.diffusion_model."  # where the U-Net sits in a LatentDiffusion checkpoint


@dataclass
class UNetConfig:
    in_channels: int = 4  # the noisy latent; 9 for inpainting U-Nets (latent, masked-image latent, mask)
    out_channels: int = 4  # the predicted noise, one per latent channel
    model_channels: int = 320  # width of level 0; level i is model_channels * channel_mult[i] wide
    channel_mult: tuple = (1, 2, 4, 4)  # one entry per resolution: 64, 32, 16, 8 for a 64x64 latent
    num_res_blocks: int = 2  # ResBlocks per level in the encoder (the decoder has one more per level)
    attention_levels: tuple = (0, 1, 2)  # levels whose ResBlocks are followed by a SpatialTransformer
    num_heads: int = 8  # SD 1.x: 8 heads at every width (head size = width / 8)
    transformer_depth: int = 1  # transformer blocks per SpatialTransformer
    context_dim: int = 768  # width of the cross-attention tokens (CLIP ViT-L/14 text tokens in SD 1.5)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm over 32 groups, computed in at least float32 whatever the input dtype (fp16 statistics are unstable)."""

    def __init__(self, channels):
        super().__init__(32, channels, eps=1e-5)

    def forward(self, x):
        dt = torch.promote_types(x.dtype, torch.float32)  # fp16/bf16 -> fp32; fp32 and fp64 stay
        return F.group_norm(x.to(dt), self.num_groups, self.weight.to(dt), self.bias.to(dt), self.eps).to(x.dtype)


class ResBlock(nn.Module):
    """Two 3x3 convs with the timestep embedding added in between, plus a residual connection."""

    def __init__(self, channels, emb_channels, out_channels):
        super().__init__()
        self.in_layers = nn.Sequential(GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        # the Dropout (p=0 in SD) keeps the conv at index 3, as in the checkpoint
        self.out_layers = nn.Sequential(GroupNorm32(out_channels), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        # a 1x1 conv matches the widths where the block changes them
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x, emb):
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).to(h.dtype)[:, :, None, None]  # (B, C) -> (B, C, 1, 1): one shift per channel
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(nn.Module):
    """Multi-head attention of x (B, N, dim) over context (B, M, context_dim); over x itself when context is None."""

    def __init__(self, dim, heads, context_dim):
        super().__init__()
        assert dim % heads == 0, f"width {dim} is not divisible into {heads} heads"
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim))  # a Sequential only for the checkpoint's name `to_out.0`

    def forward(self, x, context=None):
        context = x if context is None else context
        # (B, N, heads * d) -> (B, heads, N, d)
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads)
                   for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d)) v
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class GEGLU(nn.Module):
    """Linear to twice the hidden width; one half, gated by GELU of the other (Shazeer 2020)."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * hidden)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim):
        super().__init__()
        # keys ff.net.0.proj and ff.net.2; the Dropout (p=0) holds index 1
        self.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Dropout(0.0), nn.Linear(4 * dim, dim))

    def forward(self, x):
        return self.net(x)


class TransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the context, and feed-forward, each residual."""

    def __init__(self, dim, heads, context_dim):
        super().__init__()
        self.norm1, self.attn1 = nn.LayerNorm(dim), CrossAttention(dim, heads, dim)
        self.norm2, self.attn2 = nn.LayerNorm(dim), CrossAttention(dim, heads, context_dim)
        self.norm3, self.ff = nn.LayerNorm(dim), FeedForward(dim)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer blocks over the pixels of a feature map, between 1x1 convs, added back to the input."""

    def __init__(self, channels, heads, depth, context_dim):
        super().__init__()
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(TransformerBlock(channels, heads, context_dim) for _ in range(depth))
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x, context):
        h, w = x.shape[2:]
        t = rearrange(self.proj_in(self.norm(x)), "b c h w -> b (h w) c")  # one token per pixel
        for block in self.transformer_blocks:
            t = block(t, context)
        return x + self.proj_out(rearrange(t, "b (h w) c -> b c h w", h=h, w=w))


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class TimestepBlock(nn.Sequential):
    """One entry of input_blocks / middle_block / output_blocks: its layers in order, each given what it uses."""

    def forward(self, x, emb, context):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNet(nn.Module):
    def __init__(self, cfg, encoder_only=False):
        super().__init__()
        self.cfg = cfg
        self.grad_checkpointing = False  # recompute each block in backward instead of storing its activations
        mc, emb_dim = cfg.model_channels, 4 * cfg.model_channels
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        def res_attn(level, ch_in, ch):  # a ResBlock, followed by a SpatialTransformer on the attention levels
            layers = [ResBlock(ch_in, emb_dim, ch)]
            if level in cfg.attention_levels:
                layers.append(SpatialTransformer(ch, cfg.num_heads, cfg.transformer_depth, cfg.context_dim))
            return layers

        # encoder: conv_in, then per level num_res_blocks blocks and a stride-2 downsample (not after the last level)
        self.input_blocks = nn.ModuleList([TimestepBlock(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
        skip_channels, ch = [mc], mc  # the width of each input block's output, which the decoder concatenates
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                self.input_blocks.append(TimestepBlock(*res_attn(level, ch, mult * mc)))
                ch = mult * mc
                skip_channels.append(ch)
            if level < len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepBlock(Downsample(ch)))
                skip_channels.append(ch)
        # the middle block always carries attention, whatever attention_levels says
        self.middle_block = TimestepBlock(
            ResBlock(ch, emb_dim, ch),
            SpatialTransformer(ch, cfg.num_heads, cfg.transformer_depth, cfg.context_dim),
            ResBlock(ch, emb_dim, ch))
        if encoder_only:  # DTC's hint encoder: the state dict is a subset of the full U-Net's
            return

        # decoder: per level (deepest first) num_res_blocks + 1 blocks, each taking one skip; the last one upsamples
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = res_attn(level, ch + skip_channels.pop(), mult * mc)
                ch = mult * mc
                if level > 0 and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepBlock(*layers))
        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), nn.Conv2d(ch, cfg.out_channels, 3, padding=1))

    def time_embedding(self, timesteps):
        """Timesteps (B,) (or one timestep, broadcast over the batch) -> embedding (B, 4 * model_channels).

        Sinusoids [cos | sin] at periods 1 .. 10000 (the original's order), computed in float32 because the phases
        t * freq reach ~1000 radians, too coarse in fp16; then cast to the weights' dtype for the MLP.
        """
        w = self.time_embed[0].weight
        t = torch.as_tensor(timesteps, device=w.device).reshape(-1).float()
        half = self.cfg.model_channels // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=w.device) / half)
        args = t[:, None] * freqs[None]  # (B, half)
        return self.time_embed(torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(w.dtype))

    def _run(self, block, h, emb, context):
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, h, emb, context, use_reentrant=False)
        return block(h, emb, context)

    def encode(self, x, emb, context):
        """x (B, in_channels, H, W), emb from time_embedding, context (B, M, context_dim) with any M.

        Returns h, the middle block's output (B, C, H/8, W/8 for SD), and skips, every input block's output
        (12 for SD: 320x64x64, 320, 320, 320x32x32, 640, 640, 640x16x16, 1280, 1280, 1280x8x8, 1280, 1280 at H=W=64).
        """
        f = 2 ** (len(self.cfg.channel_mult) - 1)
        assert x.shape[2] % f == 0 and x.shape[3] % f == 0, f"latent size {tuple(x.shape[2:])} is not divisible by {f}"
        skips, h = [], x
        for block in self.input_blocks:
            h = self._run(block, h, emb, context)
            skips.append(h)
        return self._run(self.middle_block, h, emb, context), skips

    def decode(self, h, skips, emb, context):
        """The output blocks take the skips last-in first-out, each concatenated to h on channels; -> eps."""
        assert len(skips) == len(self.output_blocks), f"{len(skips)} skips for {len(self.output_blocks)} output blocks"
        for block, skip in zip(self.output_blocks, reversed(skips)):
            h = self._run(block, torch.cat([h, skip], dim=1), emb, context)
        return self.out(h)

    def forward(self, x, timesteps, context):
        emb = self.time_embedding(timesteps)
        h, skips = self.encode(x, emb, context)
        return self.decode(h, skips, emb, context)


# -----------------------------------------------------------------------------
# loading the original files

def infer_unet_config(sd, source="<state dict>"):
    """The UNetConfig of a bare U-Net state dict (prefix already stripped), read from tensor shapes.

    num_heads cannot be read from shapes (to_q/k/v are (C, C) whatever the head count), so it keeps
    SD 1.x's 8. SD 2.x (Linear proj_in, 1024-wide context, 64-channel heads) is refused.
    """
    def need(key):
        if key not in sd:
            cause = likely_cause(sd)
            raise CheckpointError(f"{source}: not an SD 1.x U-Net: no '{key}'" + (f"; likely cause: {cause}" if cause else ""))
        return sd[key]

    conv_in = need("input_blocks.0.0.weight")  # (model_channels, in_channels, 3, 3)
    to_k = need("middle_block.1.transformer_blocks.0.attn2.to_k.weight")  # (C, context_dim)
    if need("middle_block.1.proj_in.weight").ndim == 2 or to_k.shape[1] == 1024:
        raise CheckpointError(f"{source}: this is an SD 2.x U-Net (Linear proj_in or 1024-wide context); "
                              f"SD 2.x is not supported (SD 1.x only)")
    mc = conv_in.shape[0]
    # input_blocks: 0 is conv_in; then each level has num_res_blocks blocks, all but the last level a downsample
    n_levels = 1 + sum(k.startswith("input_blocks.") and k.endswith(".0.op.weight") for k in sd)
    n_res = 0
    while f"input_blocks.{n_res + 1}.0.in_layers.2.weight" in sd:
        n_res += 1
    first = [1 + level * (n_res + 1) for level in range(n_levels)]  # each level's first ResBlock
    return UNetConfig(
        in_channels=conv_in.shape[1],
        out_channels=need("out.2.weight").shape[0],
        model_channels=mc,
        channel_mult=tuple(need(f"input_blocks.{n}.0.in_layers.2.weight").shape[0] // mc for n in first),
        num_res_blocks=n_res,
        attention_levels=tuple(level for level, n in enumerate(first) if f"input_blocks.{n}.1.proj_in.weight" in sd),
        transformer_depth=sum(k.startswith("middle_block.1.transformer_blocks.") and k.endswith(".norm1.weight") for k in sd),
        context_dim=to_k.shape[1])


# What a LatentDiffusion file holds besides the U-Net: the VAE, the text (SD) or image (Paint-by-Example) encoder,
# the EMA copy (non-emaonly files), Paint-by-Example's CLIP->768 projection and learned null token, DDPM schedule buffers.
other_prefixes = ("first_stage_model.", "cond_stage_model.", "model_ema.", "proj_out.")
other_keys = {"betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
              "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
              "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
              "logvar", "lvlb_weights", "scale_factor", "learnable_vector"}
file_kind = {4: "a text-to-image SD file (e.g. v1-5-pruned-emaonly)",
             9: "an inpainting file (sd-v1-5-inpainting.ckpt or Paint-by-Example's model.ckpt)"}


def load_unet(path_or_state_dict, dtype=None, in_channels=None, source="<state dict>"):
    """A UNet in eval mode from a .safetensors / .ckpt / .pth file or a state dict, with or without `model.diffusion_model.`.

    Tensors keep the file's dtype unless `dtype` is given. `in_channels`, when given, is checked against the file.
    `source` names a state dict's file in errors.
    """
    sd, source = read_state_dict(path_or_state_dict, source)
    if any(k.startswith(ldm_prefix) for k in sd):  # a whole LatentDiffusion checkpoint: keep the U-Net part
        left = [k for k in sd if not k.startswith((ldm_prefix,) + other_prefixes) and k not in other_keys]
        if left:
            more = f" ... and {len(left) - 5} more" if len(left) > 5 else ""
            raise CheckpointError(f"{source}: {len(left)} unexpected keys beside the U-Net: {', '.join(left[:5])}{more}")
        sd = strip_prefix(sd, ldm_prefix)
    cfg = infer_unet_config(sd, source)
    if in_channels is not None and cfg.in_channels != in_channels:
        raise CheckpointError(f"{source}: has {cfg.in_channels} input channels, {in_channels} needed: this is "
                              f"{file_kind.get(cfg.in_channels, 'not an SD 1.x file')}, not "
                              f"{file_kind.get(in_channels, f'a {in_channels}-channel one')}")
    with torch.device("meta"):  # no memory and no init for weights about to be replaced
        model = UNet(cfg)
    return load_strict(model, cast_floats(sd, dtype), source, likely_cause(sd)).eval()
