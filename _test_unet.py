"""Tests for unet.py: parity with diffusers, the encode/decode split, gradient checkpointing, the full-size
key layout, config inference and the checkpoint loader (good and bad files)."""
import os
import re

import pytest
import torch
from safetensors.torch import save_file

import unet
from checkpoint import CheckpointError
from unet import UNet, UNetConfig, infer_unet_config, ldm_prefix, load_unet


def tiny_cfg(**kw):
    """SD 1.5's topology at width 32 (GroupNorm needs multiples of 32) and a 64-wide context."""
    return UNetConfig(**{"model_channels": 32, "context_dim": 64, **kw})


def randomised(model, seed=0):
    """Every parameter random: the originals zero-init out.2, proj_out and out_layers.3, which would hide bugs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            for name, p in m.named_parameters(recurse=False):  # norm scales around 1 keep the signal alive
                one = isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and name == "weight"
                p.copy_(torch.randn(p.shape, generator=g) * 0.05 + one)
    return model.eval()


def inputs(cfg, batch=2, hw=(16, 16), tokens=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, *hw, generator=g)
    ctx = torch.randn(batch, tokens, cfg.context_dim, generator=g)
    return x, torch.tensor([1, 981][:batch]), ctx


def diffusers_unet(cfg, **kw):
    """diffusers' UNet2DConditionModel for an SD 1.x-topology UNetConfig (see references.md §1a)."""
    from diffusers import UNet2DConditionModel
    n = len(cfg.channel_mult)
    return UNet2DConditionModel(
        sample_size=32, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        block_out_channels=tuple(cfg.model_channels * m for m in cfg.channel_mult), layers_per_block=cfg.num_res_blocks,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        cross_attention_dim=cfg.context_dim, attention_head_dim=cfg.num_heads,  # diffusers' name for the head count
        norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0, **kw)


def diffusers_unet_to_ldm(sd, layers_per_block=2):
    """diffusers U-Net keys -> original keys (bare, no prefix): the inverse of convert_ldm_unet_checkpoint (references.md §1c)."""
    def res(k):
        return (k.replace("norm1", "in_layers.0").replace("conv1", "in_layers.2")
                .replace("norm2", "out_layers.0").replace("conv2", "out_layers.3")
                .replace("time_emb_proj", "emb_layers.1").replace("conv_shortcut", "skip_connection"))
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    n, out = layers_per_block + 1, {}
    for k, v in sd.items():
        m = k.rsplit(".", 1)[0]
        if m in fixed:
            nk = fixed[m] + k[len(m):]
        elif g := re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", k):
            nk = f"input_blocks.{1 + int(g[1]) * n + int(g[2])}.0.{res(g[3])}"
        elif g := re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", k):
            nk = f"input_blocks.{1 + int(g[1]) * n + int(g[2])}.1.{g[3]}"
        elif g := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", k):
            nk = f"input_blocks.{(int(g[1]) + 1) * n}.0.op.{g[2]}"
        elif g := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", k):
            nk = f"middle_block.{2 * int(g[1])}.{res(g[2])}"
        elif g := re.match(r"mid_block\.attentions\.0\.(.*)", k):
            nk = f"middle_block.1.{g[1]}"
        elif g := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", k):
            nk = f"output_blocks.{int(g[1]) * n + int(g[2])}.0.{res(g[3])}"
        elif g := re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", k):
            nk = f"output_blocks.{int(g[1]) * n + int(g[2])}.1.{g[3]}"
        elif g := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", k):
            b = int(g[1])
            has_attn = any(x.startswith(f"up_blocks.{b}.attentions.") for x in sd)
            nk = f"output_blocks.{b * n + layers_per_block}.{2 if has_attn else 1}.conv.{g[2]}"
        else:
            raise KeyError(k)
        out[nk] = v
    return out


@pytest.mark.parametrize("in_channels,hw", [(4, (16, 16)), (9, (16, 24))])
def test_unet_parity_diffusers(in_channels, hw):
    """Our U-Net with random weights, converted by diffusers' own single-file converter, gives diffusers' output."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    cfg = tiny_cfg(in_channels=in_channels)
    ours = randomised(UNet(cfg))
    dif = diffusers_unet(cfg).eval()
    converted = convert_ldm_unet_checkpoint({ldm_prefix + k: v for k, v in ours.state_dict().items()}, {"layers_per_block": 2})
    dif.load_state_dict(converted, strict=True)
    x, t, ctx = inputs(cfg, hw=hw)
    with torch.no_grad():
        a, b = ours(x, t, ctx), dif(x, t, encoder_hidden_states=ctx).sample
        assert a.shape == (2, 4, *hw) and a.std() > 0.1  # a signal, not a near-zero output
        err32 = (a - b).abs().max().item()
        ours.double(), dif.double()
        a, b = ours(x.double(), t, ctx.double()), dif(x.double(), t, encoder_hidden_states=ctx.double()).sample
        err64 = (a - b).abs().max().item()
    print(f"in_channels {in_channels}: max|ours - diffusers| fp32 {err32:.2e}, fp64 {err64:.2e}")
    assert err32 < 2e-5 and err64 < 1e-10


def test_unet_encode_decode_split():
    """encode + decode equals forward exactly; the skips have SD's count and shapes; decode leaves them untouched;
    the encoder-only U-Net is the first half of the full one; any token count and non-square latents work."""
    cfg = tiny_cfg(in_channels=9)
    model = randomised(UNet(cfg))
    x, t, ctx = inputs(cfg)
    with torch.no_grad():
        full = model(x, t, ctx)
        emb = model.time_embedding(t)
        h, skips = model.encode(x, emb, ctx)
        kept = list(skips)
        assert torch.equal(model.decode(h, skips, emb, ctx), full)
        assert len(skips) == len(kept) and all(a is b for a, b in zip(skips, kept))
        widths = [32] * 4 + [64] * 3 + [128] * 5
        sizes = [16] * 3 + [8] * 3 + [4] * 3 + [2] * 3
        assert [tuple(s.shape) for s in skips] == [(2, c, n, n) for c, n in zip(widths, sizes)]
        assert h.shape == (2, 128, 2, 2)

        # one timestep for the whole batch broadcasts
        assert torch.allclose(model(x, torch.tensor(500), ctx), model(x, torch.tensor([500, 500]), ctx), atol=1e-5)
        for tokens, hw in ((1, (16, 24)), (257, (8, 32))):  # PBE's 1 token, DTC's 257 DINOv2 tokens
            xx, tt, cc = inputs(cfg, hw=hw, tokens=tokens)
            assert model(xx, tt, cc).shape == (2, 4, *hw)

        enc = UNet(cfg, encoder_only=True)
        assert not hasattr(enc, "output_blocks") and not hasattr(enc, "out")
        full_sd = model.state_dict()
        assert all(full_sd[k].shape == v.shape for k, v in enc.state_dict().items())
        enc.load_state_dict({k: full_sd[k] for k in enc.state_dict()}, strict=True)
        h2, skips2 = enc.encode(x, enc.time_embedding(t), ctx)
        assert torch.equal(h2, h) and all(torch.equal(a, b) for a, b in zip(skips2, skips))


def test_unet_grad_checkpointing(monkeypatch):
    """With grad_checkpointing every block goes through torch.utils.checkpoint; loss and gradients are unchanged."""
    cfg = tiny_cfg()
    model = randomised(UNet(cfg)).train()
    x, t, ctx = inputs(cfg)
    calls = []

    def counting_checkpoint(*a, **kw):
        calls.append(kw["use_reentrant"])
        return torch.utils.checkpoint.checkpoint(*a, **kw)
    monkeypatch.setattr(unet, "checkpoint", counting_checkpoint)

    def loss_and_grads():
        model.zero_grad()
        loss = model(x, t, ctx).square().mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
    loss0, grads0 = loss_and_grads()
    assert calls == []
    model.grad_checkpointing = True
    loss1, grads1 = loss_and_grads()
    assert calls == [False] * (12 + 1 + 12)  # input blocks, middle block, output blocks
    assert torch.equal(loss0, loss1)
    assert grads0.keys() == grads1.keys() and all(torch.equal(grads0[k], grads1[k]) for k in grads0)
    with torch.no_grad():  # nothing to recompute without autograd
        model(x, t, ctx)
    assert len(calls) == 25


@pytest.mark.parametrize("in_channels", [4, 9])
def test_unet_full_size_layout(in_channels):
    """UNet(SD 1.5) has exactly the original key names and shapes (from diffusers' model, mapped back) and
    859.52M parameters; at 64x64 its skips have the shapes DTC's FiLM expects."""
    cfg = UNetConfig(in_channels=in_channels)
    with torch.device("meta"):
        ours = UNet(cfg)
        dif = diffusers_unet(cfg)
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    ref_shapes = {k: tuple(v.shape) for k, v in diffusers_unet_to_ldm(dif.state_dict()).items()}
    assert len(ours_shapes) == 686 and ours_shapes == ref_shapes
    n = sum(p.numel() for p in ours.parameters())
    assert n == sum(p.numel() for p in dif.parameters())
    if in_channels == 4:
        assert round(n / 1e6, 2) == 859.52
    assert infer_unet_config(ours.state_dict()) == cfg

    x, c = torch.empty(1, in_channels, 64, 64, device="meta"), torch.empty(1, 77, 768, device="meta")
    emb = ours.time_embedding(torch.tensor([10], device="meta"))
    h, skips = ours.encode(x, emb, c)
    expected = [(320, 64)] * 3 + [(320, 32), (640, 32), (640, 32), (640, 16), (1280, 16), (1280, 16)] + [(1280, 8)] * 3
    assert [tuple(s.shape) for s in skips] == [(1, ch, n, n) for ch, n in expected]
    assert h.shape == (1, 1280, 8, 8) and ours.decode(h, skips, emb, c).shape == (1, 4, 64, 64)


@pytest.mark.parametrize("cfg", [
    tiny_cfg(),
    tiny_cfg(in_channels=9, channel_mult=(1, 2), attention_levels=(1,), transformer_depth=2, context_dim=48),
    tiny_cfg(channel_mult=(1, 2, 4), num_res_blocks=3, attention_levels=(0, 2), out_channels=8, model_channels=64),
    tiny_cfg(channel_mult=(2, 3), num_res_blocks=1, attention_levels=()),
])
def test_unet_infer_config(cfg):
    """The config is recovered from tensor shapes alone (num_heads stays the SD 1.x default)."""
    with torch.device("meta"):
        sd = UNet(cfg).state_dict()
    assert infer_unet_config(sd) == cfg


def write_ckpt_extras(sd):
    """What real LatentDiffusion files carry beside the U-Net (all ignored by load_unet)."""
    return {**{ldm_prefix + k: v for k, v in sd.items()},
            "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None],
            "cond_stage_model.mapper.weight": torch.randn(8, 8),
            "first_stage_model.encoder.conv_in.weight": torch.randn(8, 3, 3, 3),
            "model_ema.decay": torch.tensor(0.9999),
            "model_ema.input_blocks00weight": torch.randn(32, 4, 3, 3),
            "alphas_cumprod": torch.rand(1000), "betas": torch.rand(1000), "posterior_mean_coef1": torch.rand(1000),
            "proj_out.weight": torch.randn(64, 16), "learnable_vector": torch.randn(1, 1, 64)}


def test_unet_load_round_trips(tmp_path):
    """The same weights as .safetensors (prefixed), Lightning .ckpt (fp16, with the other parts of a real file)
    and bare .pth all load to the same model; dtype=... overrides the stored dtype."""
    cfg = tiny_cfg()
    ref = randomised(UNet(cfg))
    sd = ref.state_dict()
    x, t, ctx = inputs(cfg)
    with torch.no_grad():
        want = ref(x, t, ctx)

    save_file({ldm_prefix + k: v.contiguous() for k, v in sd.items()}, tmp_path / "unet.safetensors")
    fp16 = {k: v.half() if v.is_floating_point() else v for k, v in write_ckpt_extras(sd).items()}
    torch.save({"state_dict": fp16, "global_step": 3}, tmp_path / "model.ckpt")
    torch.save(sd, tmp_path / "bare.pth")

    for source in (tmp_path / "unet.safetensors", tmp_path / "bare.pth", sd):
        model = load_unet(source)
        assert not model.training and infer_unet_config(model.state_dict()) == cfg
        assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.state_dict().values())
        with torch.no_grad():
            assert torch.equal(model(x, t, ctx), want)

    half = load_unet(tmp_path / "model.ckpt")
    assert all(v.dtype == torch.float16 for v in half.state_dict().values())  # fp16 kept, and no integer tensor
    with torch.no_grad():
        err = (half.float()(x, t, ctx) - want).abs().max().item()
    assert 0 < err < 0.02 * want.abs().max().item()  # fp16 weight rounding only

    override = load_unet(tmp_path / "model.ckpt", dtype=torch.float32)
    assert all(v.dtype == torch.float32 for v in override.state_dict().values())
    with torch.no_grad():
        assert torch.allclose(override(x, t, ctx), half.float()(x, t, ctx), atol=1e-6)
    assert load_unet(tmp_path / "unet.safetensors", in_channels=4).cfg.in_channels == 4


class RunsCode:
    """Pickled as a call to os.system: loading it must be refused without running it."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_unet_load_errors(tmp_path):
    """Each bad input gives a CheckpointError naming the file and the problem."""
    cfg = tiny_cfg()
    sd = randomised(UNet(cfg)).state_dict()

    def fails(path, *words, **kw):
        with pytest.raises(CheckpointError) as e:
            load_unet(path, **kw)
        msg = str(e.value)
        assert str(path) in msg and all(w in msg for w in words), msg
        return msg

    fails(tmp_path / "missing.safetensors", "not found")

    save_file({ldm_prefix + k: v.contiguous() for k, v in sd.items()}, tmp_path / "cut.safetensors")
    torch.save({"state_dict": {ldm_prefix + k: v for k, v in sd.items()}}, tmp_path / "cut.ckpt")
    for name in ("cut.safetensors", "cut.ckpt"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(data[: len(data) // 2])
        fails(tmp_path / name, "truncated or corrupt")

    marker = tmp_path / "ran"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "hook": RunsCode(marker)}, tmp_path / "evil.ckpt")
    fails(tmp_path / "evil.ckpt", "refused")
    assert not marker.exists()

    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    torch.save(convert_ldm_unet_checkpoint({ldm_prefix + k: v for k, v in sd.items()}, {"layers_per_block": 2}),
               tmp_path / "diffusion_pytorch_model.pth")
    fails(tmp_path / "diffusion_pytorch_model.pth", "diffusers")

    sd2 = dict(sd)
    sd2["middle_block.1.proj_in.weight"] = sd2["middle_block.1.proj_in.weight"][:, :, 0, 0]  # SD 2.x: Linear proj_in
    torch.save(sd2, tmp_path / "sd2.pth")
    fails(tmp_path / "sd2.pth", "SD 2")
    with torch.device("meta"):
        sd2 = UNet(tiny_cfg(context_dim=1024)).state_dict()
    with pytest.raises(CheckpointError, match="SD 2"):
        load_unet(sd2)

    broken = {ldm_prefix + k: v for k, v in sd.items() if k != "output_blocks.3.0.emb_layers.1.bias"}
    broken[ldm_prefix + "output_blocks.3.0.extra.weight"] = torch.zeros(1)
    save_file(broken, tmp_path / "broken.safetensors")
    fails(tmp_path / "broken.safetensors", "1 missing keys: output_blocks.3.0.emb_layers.1.bias",
          "1 unexpected keys: output_blocks.3.0.extra.weight")
    torch.save({**{ldm_prefix + k: v for k, v in sd.items()}, "control_model.zero_convs.0.0.weight": torch.zeros(1)},
               tmp_path / "stray.ckpt")
    fails(tmp_path / "stray.ckpt", "unexpected keys", "control_model.zero_convs.0.0.weight")

    torch.save({"state_dict": {ldm_prefix + k: v for k, v in sd.items()}}, tmp_path / "v1-5-pruned-emaonly.ckpt")
    fails(tmp_path / "v1-5-pruned-emaonly.ckpt", "has 4 input channels, 9 needed", "text-to-image", "inpainting",
          in_channels=9)
