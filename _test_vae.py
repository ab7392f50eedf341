"""Tests for vae.py: parity with diffusers' AutoencoderKL, the posterior, the full-size key layout, and loading."""
import math
import re

import pytest
import torch
from safetensors.torch import save_file

from checkpoint import CheckpointError
from vae import LATENT_SCALE, AutoencoderKL, DiagonalGaussian, VAEConfig, infer_vae_config, load_vae

TINY = VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=2)  # 32x32 images <-> 8x8 latents


def randomise(model, seed=0):
    """Every parameter random (the originals zero-init nothing here, but default init hides scale bugs):
    conv weights ~ N(0, 1/fan_in) keep activations O(1); norm weights around 1; all biases non-zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g, dtype=p.dtype)
            if p.ndim > 1:
                p.copy_(r / math.sqrt(p[0].numel()))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * r)
            else:
                p.copy_(0.2 * r)
    return model


def tiny_vae(seed=0):
    return randomise(AutoencoderKL(TINY), seed).eval()


def diffusers_vae(cfg, device=None):
    from diffusers import AutoencoderKL as DiffusersKL
    n = len(cfg.ch_mult)
    with torch.device(device or "cpu"):
        return DiffusersKL(in_channels=cfg.in_channels, out_channels=cfg.out_ch, latent_channels=cfg.embed_dim,
                           norm_num_groups=32, block_out_channels=tuple(cfg.ch * m for m in cfg.ch_mult),
                           layers_per_block=cfg.num_res_blocks, down_block_types=("DownEncoderBlock2D",) * n,
                           up_block_types=("UpDecoderBlock2D",) * n).eval()


def diffusers_vae_to_ldm(sd, n_levels):
    """Test-only inverse of diffusers' convert_ldm_vae_checkpoint (references.md 1d), bare ldm names."""
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for k, v in sd.items():
        nk = k.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        nk = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)", r"encoder.down.\1.block.\2", nk)
        nk = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0", r"encoder.down.\1.downsample", nk)
        nk = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)", lambda g: f"decoder.up.{n_levels-1-int(g[1])}.block.{g[2]}", nk)
        nk = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0", lambda g: f"decoder.up.{n_levels-1-int(g[1])}.upsample", nk)
        nk = re.sub(r"mid_block\.resnets\.(\d+)", lambda g: f"mid.block_{int(g[1]) + 1}", nk)
        if g := re.match(r"(.*)mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(weight|bias)", nk):
            nk = f"{g[1]}mid.attn_1.{attn[g[2]]}.{g[3]}"
            v = v[:, :, None, None] if v.ndim == 2 else v  # Linear (C, C) -> 1x1 conv (C, C, 1, 1)
        out[nk] = v
    return out


def test_vae_parity_with_diffusers():
    """encode mean/logvar and decode equal diffusers' AutoencoderKL fed our weights through its own converter,
    in fp32 and fp64, on a random image and on a near-constant one (which exposes GroupNorm eps)."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    ours = tiny_vae()
    dif = diffusers_vae(TINY)
    n = len(TINY.ch_mult)
    conv_cfg = {"down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n}
    dif.load_state_dict(convert_ldm_vae_checkpoint(
        {"first_stage_model." + k: v for k, v in ours.state_dict().items()}, conv_cfg), strict=True)

    g = torch.Generator().manual_seed(1)
    images = {"random": torch.rand(2, 3, 32, 32, generator=g) * 2 - 1,
              "flat": 0.3 + 1e-4 * torch.randn(2, 3, 32, 32, generator=g)}
    z = torch.randn(2, 4, 8, 8, generator=g)
    worst = {}
    for dtype, tol in ((torch.float32, 2e-5), (torch.float64, 1e-10)):
        ours.to(dtype), dif.to(dtype)
        with torch.no_grad():
            for name, x in images.items():
                post, ref = ours.encode(x.to(dtype)), dif.encode(x.to(dtype)).latent_dist
                assert post.mean.shape == (2, 4, 8, 8)
                for what, a, b in (("mean", post.mean, ref.mean), ("logvar", post.logvar, ref.logvar)):
                    d = (a - b).abs().max().item()
                    worst[f"{dtype} {name} {what}"] = d
                    assert d < tol, (dtype, name, what, d)
            out, ref = ours.decode(z.to(dtype)), dif.decode(z.to(dtype)).sample
            assert out.shape == (2, 3, 32, 32) and out.abs().max() > 0.1  # a live signal, not a vanished one
            d = (out - ref).abs().max().item()
            worst[f"{dtype} decode"] = d
            assert d < tol, (dtype, "decode", d)
    print(worst)


def test_vae_posterior_sample_and_clamp():
    """sample(generator) is mean + std * randn of that generator (so seeds reproduce, and equal diffusers'
    sample); mode() is the mean; logvar is clamped to [-30, 20]."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    moments = torch.randn(2, 8, 4, 4)
    post = DiagonalGaussian(moments)
    s1 = post.sample(torch.Generator().manual_seed(7))
    s2 = post.sample(torch.Generator().manual_seed(7))
    s3 = post.sample(torch.Generator().manual_seed(8))
    noise = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(7))
    assert torch.equal(s1, s2) and not torch.equal(s1, s3)
    assert torch.equal(s1, moments[:, :4] + torch.exp(0.5 * moments[:, 4:]) * noise)
    assert torch.equal(s1, DiagonalGaussianDistribution(moments).sample(torch.Generator().manual_seed(7)))
    assert torch.equal(post.mode(), moments[:, :4])
    assert post.sample().shape == (2, 4, 4, 4) and post.sample(None).dtype == torch.float32

    huge = torch.cat([torch.zeros(1, 4, 2, 2), torch.full((1, 2, 2, 2), 1e4), torch.full((1, 2, 2, 2), -1e4)], 1)
    post = DiagonalGaussian(huge)
    assert post.logvar[:, :2].eq(20).all() and post.logvar[:, 2:].eq(-30).all()
    assert torch.isfinite(post.std).all() and torch.isfinite(post.sample(torch.Generator().manual_seed(0))).all()
    half = DiagonalGaussian(huge.half())  # clamped before exp: exp(10) is finite in fp16
    assert half.sample(torch.Generator().manual_seed(0)).dtype == torch.float16 and torch.isfinite(half.std).all()


def test_vae_full_size_keys_match_sd():
    """The default config on meta has exactly the real SD VAE's keys and shapes (diffusers' full-size VAE mapped
    back to ldm names), ~83.65M parameters, downsample factor 8, and infer_vae_config recovers the default."""
    with torch.device("meta"):
        ours = AutoencoderKL(VAEConfig())
    ref = diffusers_vae_to_ldm(diffusers_vae(VAEConfig(), device="meta").state_dict(), 4)
    sd = ours.state_dict()
    assert sorted(sd) == sorted(ref)
    assert {k: tuple(v.shape) for k, v in sd.items()} == {k: tuple(v.shape) for k, v in ref.items()}
    assert sd["encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1) and "decoder.up.3.upsample.conv.weight" in sd
    assert "decoder.up.0.upsample.conv.weight" not in sd and "encoder.down.3.downsample.conv.weight" not in sd
    n = sum(p.numel() for p in ours.parameters())
    assert n == sum(v.numel() for v in ref.values()) and round(n / 1e4) == 8365, n
    assert VAEConfig().downsample_factor == 8 and TINY.downsample_factor == 4
    assert infer_vae_config(sd) == VAEConfig()
    assert LATENT_SCALE == 0.18215


def outputs(model, dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    x, z = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1, torch.randn(1, 4, 8, 8, generator=g)
    with torch.no_grad():
        post = model.encode(x.to(dtype))
        return post.mean, post.logvar, model.decode(z.to(dtype))


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_vae_load_round_trips(tmp_path):
    """A full SD-style .safetensors (with U-Net/CLIP keys to ignore), a bare fp16 .ckpt with `state_dict`
    wrapper and loss.*/model_ema.* keys, a bare .pth and an in-memory dict all load to the same outputs."""
    model = tiny_vae()
    sd = model.state_dict()
    want = outputs(model)

    full = {"first_stage_model." + k: v for k, v in sd.items()}
    full |= {"model.diffusion_model.input_blocks.0.0.weight": torch.randn(32, 9, 3, 3),
             "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.randn(8),
             "alphas_cumprod": torch.rand(1000)}
    save_file(full, tmp_path / "sd.safetensors")
    loaded = load_vae(tmp_path / "sd.safetensors")
    assert isinstance(loaded, AutoencoderKL) and not loaded.training and loaded.cfg == TINY
    assert same(outputs(loaded), want)

    torch.save(sd, tmp_path / "vae.pth")
    assert same(outputs(load_vae(tmp_path / "vae.pth")), want)
    assert same(outputs(load_vae(dict(sd))), want)

    bare16 = {k: v.half() for k, v in sd.items()}
    bare16 |= {"loss.logvar": torch.zeros(()), "loss.discriminator.main.0.weight": torch.randn(64, 3, 4, 4).half(),
               "loss.perceptual_loss.net.slice1.0.weight": torch.randn(64, 3, 3, 3),
               "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(5, dtype=torch.int32)}
    torch.save({"state_dict": bare16, "global_step": 840000}, tmp_path / "vae.ckpt")
    as_file = load_vae(tmp_path / "vae.ckpt")
    assert {p.dtype for p in as_file.parameters()} == {torch.float16}
    upcast = load_vae(tmp_path / "vae.ckpt", dtype=torch.float32)  # dtype override
    assert {p.dtype for p in upcast.parameters()} == {torch.float32}
    rounded = tiny_vae()
    rounded.load_state_dict({k: v.half().float() for k, v in sd.items()})
    assert same(outputs(upcast), outputs(rounded))
    assert same(outputs(load_vae(tmp_path / "sd.safetensors", dtype=torch.float64), torch.float64),
                outputs(model.double(), torch.float64))


def test_vae_load_errors(tmp_path):
    """Bad inputs give one CheckpointError naming the file: missing, truncated, diffusers-format, missing/
    unexpected/wrong-shape keys, and a file with no VAE keys at all."""
    sd = tiny_vae().state_dict()
    with pytest.raises(CheckpointError, match=r"nope\.safetensors: file not found"):
        load_vae(tmp_path / "nope.safetensors")

    save_file(sd, tmp_path / "cut.safetensors")
    data = (tmp_path / "cut.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors: cannot read the file \(truncated or corrupt"):
        load_vae(tmp_path / "cut.safetensors")

    save_file(diffusers_vae(TINY).state_dict(), tmp_path / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model\.safetensors: does not match(.|\n)*"
                                              r"likely cause: this is a diffusers-format file"):
        load_vae(tmp_path / "diffusion_pytorch_model.safetensors")

    broken = {"first_stage_model." + k: v for k, v in sd.items() if k != "encoder.mid.attn_1.q.bias"}
    broken["first_stage_model.encoder.extra.weight"] = torch.zeros(1)
    broken["first_stage_model.quant_conv.weight"] = torch.zeros(8, 8, 3, 3)
    torch.save({"state_dict": broken}, tmp_path / "broken.ckpt")
    with pytest.raises(CheckpointError) as e:
        load_vae(tmp_path / "broken.ckpt")
    msg = str(e.value)
    assert msg.startswith(str(tmp_path / "broken.ckpt")) and "1 missing keys: encoder.mid.attn_1.q.bias" in msg
    assert "1 unexpected keys: encoder.extra.weight" in msg and "quant_conv.weight (8, 8, 3, 3)" in msg

    save_file({"model.diffusion_model.out.2.weight": torch.zeros(4, 32, 3, 3)}, tmp_path / "unet.safetensors")
    with pytest.raises(CheckpointError, match=r"unet\.safetensors: no first_stage_model\. or encoder\./decoder\. keys: "
                                              r"not an SD VAE or SD checkpoint"):
        load_vae(tmp_path / "unet.safetensors")
