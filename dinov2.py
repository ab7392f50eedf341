"""
DINOv2 vision transformer (Oquab et al. 2023, arXiv 2304.07193), written from scratch.

DTC encodes the reference image with a frozen DINOv2 ViT-g/14 and uses its final-LayerNorm-ed
tokens (CLS + 256 patch tokens at 224x224) as the U-Net's cross-attention context. Every module
is named after the keys of the facebookresearch hub files (`dinov2_vit{s,b,l,g}14[_reg4]_pretrain.pth`,
bare state dicts), so loading is a strict load with no rename table.

One detail matters numerically: the position embedding is trained on a 37x37 grid (518x518
input) and is resampled bicubically for other sizes, and the two hub releases do this
differently (see `DINOv2Config.interpolate_offset`). We copy each exactly.
"""
import math
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import CheckpointError, cast_floats, likely_cause, load_strict, read_state_dict

# DINOv2 expects [0, 1] RGB images normalised with the ImageNet statistics
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class DINOv2Config:
    embed_dim: int = 1536       # defaults are ViT-g/14, the encoder DTC uses
    depth: int = 40
    num_heads: int = 24         # the hub models all use 64-wide heads; tiny test models may not
    ffn: str = "swiglu"         # 'mlp' (fc1, GELU, fc2: S/B/L) or 'swiglu' (w12, SiLU gate, w3: g)
    num_registers: int = 0      # the '_reg4' models add 4 register tokens
    patch_size: int = 14
    img_size: int = 518         # the size the pos_embed grid was trained at: 518 // 14 = 37
    in_chans: int = 3
    # How pos_embed is resampled to another grid. The first release keeps DINO's historical
    # kludge: bicubic with scale_factor=(n + 0.1) / 37 and no antialiasing. The register models
    # were released later with offset 0, meaning bicubic to an exact size=, with antialiasing.
    # The two give different numbers, and each file has to be run the way it was trained.
    interpolate_offset: float = 0.1
    interpolate_antialias: bool = False


def _hub_config(embed_dim, depth, ffn, registers=0, **rest):
    # hub models: 64-wide heads; the files with registers are those of the size=/antialias release
    return DINOv2Config(embed_dim=embed_dim, depth=depth, num_heads=max(1, embed_dim // 64), ffn=ffn,
                        num_registers=registers, interpolate_offset=0.0 if registers else 0.1,
                        interpolate_antialias=registers > 0, **rest)


# the hub files, by the name they are published under (dinov2_<name>_pretrain.pth)
PRESETS = {
    "vits14": _hub_config(384, 12, "mlp"),
    "vitb14": _hub_config(768, 12, "mlp"),
    "vitl14": _hub_config(1024, 24, "mlp"),
    "vitg14": _hub_config(1536, 40, "swiglu"),
    "vits14_reg4": _hub_config(384, 12, "mlp", registers=4),
    "vitb14_reg4": _hub_config(768, 12, "mlp", registers=4),
    "vitl14_reg4": _hub_config(1024, 24, "mlp", registers=4),
    "vitg14_reg4": _hub_config(1536, 40, "swiglu", registers=4),
}


class PatchEmbed(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x):
        # (B, 3, H, W) -> (B, D, H/p, W/p) -> (B, H/p * W/p, D), rows first
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.embed_dim, 3 * cfg.embed_dim)
        self.proj = nn.Linear(cfg.embed_dim, cfg.embed_dim)

    def forward(self, x):
        B, N, D = x.shape
        # (B, N, 3D) -> (3, B, heads, N, D/heads)
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(D/heads)) v
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class LayerScale(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))  # the hub models were trained with init_values=1.0

    def forward(self, x):
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.fc1 = nn.Linear(cfg.embed_dim, 4 * cfg.embed_dim)
        self.fc2 = nn.Linear(4 * cfg.embed_dim, cfg.embed_dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class SwiGLU(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        # 2/3 of the usual 4*D keeps the parameter count of an MLP; rounded up to a multiple of 8.
        # ViT-g: 4 * 1536 * 2/3 = 4096, so w12 is 1536 -> 8192 (gate and value packed) and w3 4096 -> 1536
        hidden = (int(4 * cfg.embed_dim * 2 / 3) + 7) // 8 * 8
        self.w12 = nn.Linear(cfg.embed_dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, cfg.embed_dim)

    def forward(self, x):
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.attn = Attention(cfg)
        self.ls1 = LayerScale(cfg.embed_dim)
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.mlp = SwiGLU(cfg) if cfg.ffn == "swiglu" else Mlp(cfg)
        self.ls2 = LayerScale(cfg.embed_dim)

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DINOv2(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        assert cfg.ffn in ("mlp", "swiglu"), cfg.ffn
        self.cfg = cfg
        D, grid = cfg.embed_dim, cfg.img_size // cfg.patch_size
        self.cls_token = nn.Parameter(torch.randn(1, 1, D).mul_(0.02))
        # one row for the CLS token, then the grid x grid patches row by row; registers get none
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + grid * grid, D).mul_(0.02))
        if cfg.num_registers:
            self.register_tokens = nn.Parameter(torch.randn(1, cfg.num_registers, D).mul_(0.02))
        # replaces masked patches in DINOv2's own training (iBOT loss); unused here, but it is in
        # every hub file, so we keep it and the load stays strict
        self.mask_token = nn.Parameter(torch.zeros(1, D))
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(D, eps=1e-6)

    def resized_pos_embed(self, rows, cols):
        """pos_embed (1, 1 + rows*cols, D) for a rows x cols patch grid, resampled as the original does."""
        cfg, M = self.cfg, self.cfg.img_size // self.cfg.patch_size
        if (rows, cols) == (M, M):
            return self.pos_embed  # untouched: the offset formula would move it even at the trained size
        D = self.pos_embed.shape[-1]
        # (1, M*M, D) -> (1, D, M, M), interpolated in float32 as the original does
        grid = self.pos_embed[:, 1:].float().reshape(1, M, M, D).permute(0, 3, 1, 2)
        # The original calls these w0 = H // p and h0 = W // p (it unpacks `B, C, w, h = x.shape`),
        # so its scale_factor=(sx, sy) is (rows, cols) and matches dims (-2, -1) of this tensor.
        if cfg.interpolate_offset:
            target = dict(scale_factor=((rows + cfg.interpolate_offset) / M, (cols + cfg.interpolate_offset) / M))
        else:
            target = dict(size=(rows, cols))
        grid = F.interpolate(grid, mode="bicubic", antialias=cfg.interpolate_antialias, **target)
        # (1, D, rows, cols) -> (1, rows*cols, D), rows first like the patch tokens
        patches = grid.permute(0, 2, 3, 1).reshape(1, rows * cols, D).to(self.pos_embed.dtype)
        return torch.cat([self.pos_embed[:, :1], patches], dim=1)

    def forward(self, x):
        """x: (B, 3, H, W) ImageNet-normalised, H and W multiples of the patch size.
        Returns the final-LayerNorm-ed tokens (B, 1 + R + N, D) ordered [CLS, registers, patches]."""
        B, _, H, W = x.shape
        p = self.cfg.patch_size
        if H % p or W % p:
            raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {p}")
        x = self.patch_embed(x)                                            # (B, N, D)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)       # (B, 1 + N, D)
        x = x + self.resized_pos_embed(H // p, W // p).to(x.dtype)
        if self.cfg.num_registers:  # inserted after the position embedding, so they have none
            x = torch.cat([x[:, :1], self.register_tokens.expand(B, -1, -1), x[:, 1:]], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def infer_dinov2_config(sd):
    """The DINOv2Config of a hub state dict, read from tensor shapes.

    The head count is not stored anywhere; every hub model uses 64-wide heads. The resampling
    rule is not stored either: the hub files with registers are the ones released with the
    size-based, antialiased rule.
    """
    D = sd["cls_token"].shape[-1]
    patch = sd["patch_embed.proj.weight"].shape[-1]
    registers = sd["register_tokens"].shape[1] if "register_tokens" in sd else 0
    grid = math.isqrt(sd["pos_embed"].shape[1] - 1)  # a non-square count fails the strict load's shape check
    depth = 1 + max(int(m[1]) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    ffn = "swiglu" if "blocks.0.mlp.w12.weight" in sd else "mlp"
    return _hub_config(D, depth, ffn, registers, patch_size=patch, img_size=grid * patch,
                       in_chans=sd["patch_embed.proj.weight"].shape[1])


def _dinov2_likely_cause(keys):
    """Why a file is not a hub state dict, for the usual wrong files ('' when none applies)."""
    keys = set(keys)
    if any(re.match(r"blocks\.\d+\.\d+\.", k) for k in keys):
        return ("the blocks are nested as blocks.<chunk>.<i>. (a model built with block_chunks>0); "
                "the hub layout is blocks.<i>. (block_chunks=0): drop the chunk index")
    if "reg_token" in keys or ("cls_token" in keys and "mask_token" not in keys):
        return ("this is a timm-format DINOv2 (no mask_token; reg_token, cls_token with its position folded in, "
                "mlp.fc1/fc2 for SwiGLU); pass the original hub file (dinov2_vit*14*_pretrain.pth)")
    if cause := likely_cause(keys):  # transformers-format and the like
        return cause
    if "cls_token" not in keys and (prefixed := [k for k in keys if k.endswith(".cls_token")]):
        return f"the weights sit under the prefix '{prefixed[0][:-len('cls_token')]}'; pass the bare backbone state dict"
    return ""


def load_dinov2(path_or_state_dict, dtype=None):
    """A DINOv2 in eval mode from a hub file (.pth bare state dict, or the same keys in .safetensors).

    Keeps the file's dtype unless `dtype` is given.
    """
    sd, source = read_state_dict(path_or_state_dict)
    cause = _dinov2_likely_cause(sd)
    if cause:
        raise CheckpointError(f"{source}: not a DINOv2 hub state dict: {cause}")
    needed = [k for k in ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.norm1.weight") if k not in sd]
    if needed:
        raise CheckpointError(f"{source}: not a DINOv2 hub state dict: no {', '.join(needed)}")
    with torch.device("meta"):
        model = DINOv2(infer_dinov2_config(sd))
    return load_strict(model, cast_floats(sd, dtype), source).eval()
