"""Tests for dinov2.py: parity with timm and transformers, hub-file structure, loading."""
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from checkpoint import CheckpointError
from dinov2 import PRESETS, DINOv2, DINOv2Config, infer_dinov2_config, load_dinov2


def _tiny(ffn="mlp", registers=0, embed_dim=64, num_heads=4):
    """Tiny hub-shaped config: 37x37 pos_embed grid (518 / 14) so every test size below resamples."""
    return DINOv2Config(embed_dim=embed_dim, depth=2, num_heads=num_heads, ffn=ffn, num_registers=registers,
                        interpolate_offset=0.0 if registers else 0.1, interpolate_antialias=registers > 0)


def _random_model(cfg, seed=0):
    """A model with EVERY parameter random (LayerScale gammas, tokens, pos_embed included)."""
    g = torch.Generator().manual_seed(seed)
    model = DINOv2(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            std = 1.0 if ("token" in name or "pos_embed" in name) else 0.1
            p.copy_(torch.randn(p.shape, generator=g) * std)
            if "norm" in name and name.endswith("weight"):
                p.add_(1.0)
    return model


def _orig_interp_pos(pos_embed, x, patch=14, offset=0.1):
    """The facebookresearch interpolate_pos_encoding (non-register release), transcribed with its own
    names: it unpacks `B, nc, w, h = x.shape`, so its w0 counts ROWS (H) and h0 COLUMNS (W)."""
    B, nc, w, h = x.shape
    N = pos_embed.shape[1] - 1
    npatch = (w // patch) * (h // patch)
    if npatch == N and w == h:
        return pos_embed
    pos = pos_embed.float()
    class_pos_embed, patch_pos_embed = pos[:, 0], pos[:, 1:]
    dim = pos.shape[-1]
    w0, h0 = w // patch, h // patch
    M = int(math.sqrt(N))
    out = F.interpolate(patch_pos_embed.reshape(1, M, M, dim).permute(0, 3, 1, 2), mode="bicubic",
                        antialias=False, scale_factor=((w0 + offset) / M, (h0 + offset) / M))
    assert (w0, h0) == out.shape[-2:]
    out = out.permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), out), dim=1).to(pos_embed.dtype)


def _orig_interp_pos_reg(pos_embed, x, patch=14):
    """Same function with the register release's settings: offset 0 -> size=(w0, h0), antialias=True."""
    B, nc, w, h = x.shape
    N = pos_embed.shape[1] - 1
    if (w // patch) * (h // patch) == N and w == h:
        return pos_embed
    M, dim = int(math.sqrt(N)), pos_embed.shape[-1]
    out = F.interpolate(pos_embed[:, 1:].float().reshape(1, M, M, dim).permute(0, 3, 1, 2), mode="bicubic",
                        antialias=True, size=(w // patch, h // patch))
    out = out.permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat((pos_embed[:, :1].float(), out), dim=1).to(pos_embed.dtype)


def _timm_reference(sd, cfg, x):
    """timm's DINOv2 built at x's size, pos_embed pre-resampled by the original formula, hub keys
    converted by timm's own checkpoint_filter_fn."""
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn
    D = cfg.embed_dim
    kw = dict(img_size=tuple(x.shape[-2:]), embed_dim=D, depth=cfg.depth, num_heads=cfg.num_heads, num_classes=0)
    if cfg.ffn == "swiglu":
        # timm packs SwiGLU into one fc1 of width int(D * mlp_ratio) = 2 * hidden
        kw["mlp_ratio"] = 2 * ((int(D * 4 * 2 / 3) + 7) // 8 * 8) / D
        name = "vit_giant_patch14_dinov2"
    else:
        name = "vit_small_patch14_reg4_dinov2" if cfg.num_registers else "vit_small_patch14_dinov2"
    resample = _orig_interp_pos_reg if cfg.num_registers else _orig_interp_pos
    m = timm.create_model(name, pretrained=False, **kw).eval().to(x.dtype)
    sd2 = {k: v.clone() for k, v in sd.items()}  # the filter pops keys: give it a copy
    sd2["pos_embed"] = resample(sd2["pos_embed"], x)  # before the filter, which folds row 0 into cls_token
    m.load_state_dict(checkpoint_filter_fn(sd2, m), strict=True)
    with torch.no_grad():
        return m.forward_features(x)


def _orig_to_hf(sd):
    """Hub keys -> transformers 5.x Dinov2WithRegistersModel keys (references.md §2)."""
    out = {}
    for k, v in sd.items():
        if k in ("cls_token", "mask_token", "register_tokens"):
            out["embeddings." + k] = v
        elif k == "pos_embed":
            out["embeddings.position_embeddings"] = v
        elif k.startswith("patch_embed.proj."):
            out["embeddings.patch_embeddings.projection." + k.split(".")[-1]] = v
        elif k.startswith("norm."):
            out["layernorm." + k.split(".")[-1]] = v
        else:
            _, i, *r = k.split(".")
            L, t, r = f"encoder.layer.{i}.", r[-1], ".".join(r)
            if r.startswith("attn.qkv."):
                for n, c in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3, 0)):
                    out[L + f"attention.{n}.{t}"] = c
            elif r.startswith("attn.proj."):
                out[L + "attention.o_proj." + t] = v
            elif r in ("ls1.gamma", "ls2.gamma"):
                out[L + f"layer_scale{r[2]}.lambda1"] = v
            else:
                out[L + r] = v  # norm1.*, norm2.*, mlp.fc1.*, mlp.fc2.*
    return out


SIZES = [(224, 224), (196, 280), (518, 518)]  # resampled square, resampled non-square, trained grid


@pytest.mark.parametrize("variant", ["mlp", "swiglu", "reg4"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float64, 1e-10)])
def test_dinov2_parity_timm(variant, dtype, tol):
    """Tokens equal timm's forward_features (pos_embed resampled by the original rule), incl. non-square."""
    cfg = _tiny(ffn="swiglu" if variant == "swiglu" else "mlp", registers=4 if variant == "reg4" else 0)
    model = _random_model(cfg).to(dtype)
    sd = model.state_dict()
    for i, (H, W) in enumerate(SIZES):
        x = torch.randn(2, 3, H, W, generator=torch.Generator().manual_seed(i), dtype=dtype)
        with torch.no_grad():
            ours = model(x)
        ref = _timm_reference(sd, cfg, x)
        assert ours.shape == (2, 1 + cfg.num_registers + (H // 14) * (W // 14), cfg.embed_dim)
        err = (ours - ref).abs().max().item()
        print(f"{variant} {dtype} {H}x{W}: max|d| = {err:.2e}")
        assert err < tol, (variant, H, W, err)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float64, 1e-10)])
def test_dinov2_parity_transformers_registers(dtype, tol):
    """Register models vs transformers Dinov2WithRegistersModel, which resamples by itself (size=,
    antialias=True, rows = H): an independent check of our register-model rule and H/W order."""
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel
    cfg = _tiny(registers=4)
    model = _random_model(cfg, seed=1).to(dtype)
    hf = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(
        image_size=518, patch_size=14, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=4,
        num_register_tokens=4, layerscale_value=1.0, use_swiglu_ffn=False, layer_norm_eps=1e-6,
        qkv_bias=True, hidden_act="gelu")).eval().to(dtype)
    hf.load_state_dict(_orig_to_hf(model.state_dict()), strict=True)
    for i, (H, W) in enumerate(SIZES):
        x = torch.randn(2, 3, H, W, generator=torch.Generator().manual_seed(i), dtype=dtype)
        with torch.no_grad():
            err = (model(x) - hf(pixel_values=x).last_hidden_state).abs().max().item()
        print(f"transformers reg4 {dtype} {H}x{W}: max|d| = {err:.2e}")
        assert err < tol, (H, W, err)


def test_dinov2_pos_embed_rules():
    """The trained grid returns pos_embed itself; non-square grids are (rows, cols) = (H/p, W/p), and
    swapping them (or using the other release's rule) changes the numbers, so the parity tests can fail."""
    model = _random_model(_tiny())
    assert model.resized_pos_embed(37, 37) is model.pos_embed
    x = torch.zeros(1, 3, 196, 280)
    torch.testing.assert_close(model.resized_pos_embed(14, 20), _orig_interp_pos(model.pos_embed, x), rtol=0, atol=0)
    assert (model.resized_pos_embed(20, 14) - model.resized_pos_embed(14, 20)).abs().max() > 0.1
    reg = _random_model(_tiny(registers=4))
    with torch.no_grad():
        reg.pos_embed.copy_(model.pos_embed)
    assert (reg.resized_pos_embed(16, 16) - model.resized_pos_embed(16, 16)).abs().max() > 0.1
    with pytest.raises(ValueError, match="225x224 is not a multiple of the patch size 14"):
        model(torch.zeros(1, 3, 225, 224))


def _hub_shapes_from_timm(name):
    """Hub key -> shape for a full-size hub file, from timm's model mapped back to hub names."""
    import timm
    with torch.device("meta"):
        m = timm.create_model(name, pretrained=False, img_size=518, num_classes=0)
    out = {}
    for k, v in m.state_dict().items():
        k = k.replace("mlp.fc1.", "mlp.w12.").replace("mlp.fc2.", "mlp.w3.") if "giant" in name else k
        if k == "reg_token":
            k = "register_tokens"
        shape = tuple(v.shape)
        if k == "pos_embed" and "reg4" in name:  # timm drops the CLS row for register models
            shape = (1, shape[1] + 1, shape[2])
        out[k] = shape
    out["mask_token"] = (1, out["cls_token"][-1])  # timm drops mask_token; the hub files have it
    return out


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_dinov2_full_size_structure(preset):
    """Our S/B/L/g (+reg4) have exactly the hub files' key names and shapes."""
    size = {"s": "small", "b": "base", "l": "large", "g": "giant"}[preset[3]]
    name = f"vit_{size}_patch14_{'reg4_' if 'reg4' in preset else ''}dinov2"
    with torch.device("meta"):
        model = DINOv2(PRESETS[preset])
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == _hub_shapes_from_timm(name)
    assert infer_dinov2_config(model.state_dict()) == PRESETS[preset]
    if preset == "vitg14":
        n = sum(p.numel() for p in model.parameters())
        assert len(ours) == 567
        # timm's card says 1136.5M = 1,136,479,232 without mask_token; we keep it (1536 more)
        assert n == 1_136_480_768 and n - 1536 == 1_136_479_232
        assert ours["blocks.0.mlp.w12.weight"] == (8192, 1536) and ours["blocks.0.mlp.w3.weight"] == (1536, 4096)


@pytest.mark.parametrize("ffn,registers", [("mlp", 0), ("swiglu", 0), ("mlp", 4), ("swiglu", 4)])
def test_dinov2_infer_config(ffn, registers):
    """infer_dinov2_config recovers tiny configs (heads = width / 64, as in every hub model)."""
    cfg = _tiny(ffn=ffn, registers=registers, embed_dim=128, num_heads=2)
    with torch.device("meta"):
        sd = DINOv2(cfg).state_dict()
    assert infer_dinov2_config(sd) == cfg


def test_dinov2_load_files(tmp_path):
    """A hub-style bare state dict loads from .pth and .safetensors and gives the same tokens; fp16 stays fp16."""
    model = _random_model(_tiny(embed_dim=64, num_heads=1))  # 64-wide head, as the loader assumes
    sd = model.state_dict()
    x = torch.randn(1, 3, 224, 196)
    with torch.no_grad():
        ref = model(x)
    torch.save(sd, tmp_path / "dinov2_tiny_pretrain.pth")
    save_file(sd, tmp_path / "tiny.safetensors")
    for path in (tmp_path / "dinov2_tiny_pretrain.pth", tmp_path / "tiny.safetensors"):
        loaded = load_dinov2(path)
        assert not loaded.training and loaded.pos_embed.dtype == torch.float32
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), ref, rtol=0, atol=0)
    torch.save({k: v.half() for k, v in sd.items()}, tmp_path / "half.pth")
    half = load_dinov2(tmp_path / "half.pth")
    assert all(p.dtype == torch.float16 for p in half.parameters())
    assert load_dinov2(sd, dtype=torch.float64).pos_embed.dtype == torch.float64
    with torch.no_grad():
        assert (half(x.half()).float() - ref).abs().max() < 0.05


def test_dinov2_load_errors(tmp_path):
    """Bad files give one CheckpointError naming the file and the problem."""
    sd = _random_model(_tiny(embed_dim=64, num_heads=1)).state_dict()

    def fails(obj, name, *words):
        path = tmp_path / name
        torch.save(obj, path)
        with pytest.raises(CheckpointError) as e:
            load_dinov2(path)
        msg = str(e.value)
        assert str(path) in msg and all(w in msg for w in words), msg

    fails(_orig_to_hf(sd), "hf.pth", "transformers-format")
    fails({k.replace("blocks.", "blocks.0."): v for k, v in sd.items()}, "chunked.pth", "block_chunks")
    timm_reg = {k: v for k, v in _random_model(_tiny(registers=4)).state_dict().items() if k != "register_tokens"}
    fails({**timm_reg, "reg_token": torch.zeros(1, 4, 64)}, "timm.pth", "timm-format")
    fails({"teacher.backbone." + k: v for k, v in sd.items()}, "teacher.pth", "teacher.backbone.")
    fails({k: v for k, v in sd.items() if k != "blocks.1.attn.proj.bias"}, "missing.pth", "missing keys", "blocks.1.attn.proj.bias")
    fails({**sd, "head.weight": torch.zeros(10, 64)}, "extra.pth", "unexpected keys", "head.weight")
    fails({**sd, "pos_embed": sd["pos_embed"][:, :-1]}, "pos.pth", "wrong shapes", "pos_embed")
    with pytest.raises(CheckpointError, match="nowhere.pth: file not found"):
        load_dinov2(tmp_path / "nowhere.pth")
