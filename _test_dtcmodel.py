# ----------------------------------------------------------------------------- dtc.py and sample.py
import itertools
import json
import os
import subprocess
import sys

import pytest
import torch

import dtc
from checkpoint import CheckpointError
from dinov2 import DINOv2, DINOv2Config
from unet import UNet, UNetConfig
from vae import AutoencoderKL, VAEConfig

HERE = os.path.dirname(os.path.abspath(__file__))
TINY_UNET = dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,), num_heads=4,
                 context_dim=32)
TINY_VAE = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1)  # 2x downsampling
TINY_VIT = DINOv2Config(embed_dim=64, depth=1, num_heads=1,  # 64-wide heads, as the loader assumes
                         ffn="mlp", patch_size=14, img_size=56)


def tiny_dtc_config(**kw):
    return dtc.DTCConfig(unet=UNetConfig(in_channels=9, **TINY_UNET), image_encoder_dim=64, image_size=28,
                         vae_factor=2, **kw)


def randomise(module, std=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def brute_largest_rectangle(fill):
    H, W = fill.shape
    best = 0
    for t, b in itertools.combinations_with_replacement(range(H), 2):
        for l, r in itertools.combinations_with_replacement(range(W), 2):
            if fill[t:b + 1, l:r + 1].all():
                best = max(best, (b + 1 - t) * (r + 1 - l))
    return best


def test_dtc_largest_rectangle_matches_brute_force():
    """Random, box and free-form masks: the found rectangle is inside the region and as large as brute force."""
    g = torch.Generator().manual_seed(0)
    masks = [torch.rand(9, 11, generator=g) < p for p in (0.3, 0.6, 0.85) for _ in range(15)]
    box = torch.zeros(12, 10, dtype=torch.bool)
    box[2:9, 3:8] = True
    masks.append(box)
    yy, xx = torch.meshgrid(torch.arange(14), torch.arange(13), indexing="ij")
    masks.append(((yy - 7) ** 2 / 30 + (xx - 6) ** 2 / 12) < 1)  # an ellipse
    masks.append((xx > yy // 2) & (xx < 10))                       # a slanted band
    for fill in masks:
        keep = (~fill).float()
        rect = dtc.largest_rectangle(keep)
        area = brute_largest_rectangle(fill)
        if area == 0:
            assert rect is None
            continue
        t, l, b, r = rect
        assert fill[t:b, l:r].all() and (b - t) * (r - l) == area
    assert dtc.largest_rectangle((~box).float()) == (2, 3, 9, 8)


def test_dtc_make_hint_places_reference_in_rectangle():
    ref = torch.rand(2, 3, 20, 16) * 2 - 1
    mask = torch.ones(2, 1, 32, 24)
    mask[0, :, 4:14, 5:20] = 0
    mask[1, :, 10:30, 2:9] = 0
    hint = dtc.make_hint(ref, mask)
    for i, (t, l, b, r) in enumerate([(4, 5, 14, 20), (10, 2, 30, 9)]):
        inside = torch.nn.functional.interpolate(ref[i:i + 1], size=(b - t, r - l), mode="bilinear",
                                                 antialias=True, align_corners=False)[0]
        torch.testing.assert_close(hint[i, :, t:b, l:r], ((inside + 1) / 2).clamp(0, 1))
        outside = hint[i].clone()
        outside[:, t:b, l:r] = 0
        assert outside.abs().max() == 0
    with pytest.raises(ValueError):
        dtc.make_hint(ref[:1], torch.ones(1, 1, 8, 8))


SD15_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
                      prediction_type="epsilon")


@pytest.mark.parametrize("steps", [50, 25, 20])
def test_dtc_ddim_equals_diffusers(steps):
    """Timesteps and every update (eta 0 and eta 1 with the same generator) equal DDIMScheduler's."""
    from diffusers import DDIMScheduler
    sched, ours = DDIMScheduler(**SD15_SCHEDULER), dtc.Schedule()
    sched.set_timesteps(steps)
    ts = ours.ddim_timesteps(steps)
    assert torch.equal(sched.timesteps, ts)
    x = torch.randn(2, 4, 8, 8)
    for eta in (0.0, 1.0):
        z = x.clone()
        for i, t in enumerate(ts.tolist()):
            eps = torch.sin(z * (i + 1))  # any deterministic function of z
            t_prev = ts[i + 1].item() if i + 1 < len(ts) else -1
            mine = ours.ddim_step(z, eps, t, t_prev, eta, torch.Generator().manual_seed(i))
            ref = sched.step(eps, t, z, eta=eta, generator=torch.Generator().manual_seed(i)).prev_sample
            torch.testing.assert_close(mine, ref, rtol=0, atol=1e-6)
            z = ref


def test_dtc_ddpm_noising_and_step_equal_diffusers():
    from diffusers import DDPMScheduler
    # the full 1000-step ancestral chain: no offset (timesteps 999 ... 0)
    cfg = {k: v for k, v in SD15_SCHEDULER.items() if k not in ("set_alpha_to_one", "steps_offset")}
    sched, ours = DDPMScheduler(**cfg), dtc.Schedule()
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 500, 999])
    torch.testing.assert_close(ours.add_noise(x0, noise, t), sched.add_noise(x0, noise, t), rtol=0, atol=1e-6)
    sched.set_timesteps(1000)
    for t in (999, 500, 1, 0):
        eps = torch.randn(3, 4, 8, 8)
        mine = ours.ddpm_step(x0, eps, t, torch.Generator().manual_seed(t))
        ref = sched.step(eps, t, x0, generator=torch.Generator().manual_seed(t)).prev_sample
        torch.testing.assert_close(mine, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.predict_x0(ours.add_noise(x0, noise, t), noise, torch.tensor([t] * 3)), x0,
                               rtol=0, atol=1e-4)


@pytest.mark.parametrize("fusion,hint_input", [("film", "full"), ("add", "full"), ("film", "latent_only")])
def test_dtc_fresh_model_equals_base_unet(fusion, hint_input):
    """Zero-initialised fusion: a fresh DTC computes exactly its main U-Net; perturbing the fusion convs changes it."""
    torch.manual_seed(0)
    model = dtc.DiffuseToChoose(tiny_dtc_config(fusion=fusion, hint_input=hint_input))
    fusion_params = {id(p) for p in model.fusion.parameters()}
    with torch.no_grad():
        for p in model.parameters():
            if id(p) not in fusion_params:
                p.normal_(0, 0.05)
    z, zm = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    mask = torch.rand(2, 1, 8, 8)
    ctx = model.context(torch.randn(2, 5, 64))
    hint, t = torch.rand(2, 3, 16, 16), torch.tensor([10, 900])
    base = model.unet(torch.cat([z, zm, mask], 1), t, ctx)
    assert torch.equal(model(z, t, zm, mask, ctx, hint=hint), base)
    with torch.no_grad():
        for p in model.fusion.parameters():
            p.normal_(0, 0.05)
    assert (model(z, t, zm, mask, ctx, hint=hint) - base).abs().max() > 1e-3


def test_dtc_film_formula_and_taps():
    """FiLM is s * (1 + gamma) + beta at 13 taps (12 skips + middle for SD); the baseline has no hint branch."""
    assert len(dtc.tap_channels(UNetConfig())) == 13
    assert dtc.tap_channels(UNetConfig()) == [320] * 4 + [640] * 3 + [1280] * 6
    model = randomise(dtc.DiffuseToChoose(tiny_dtc_config()))
    skips = [torch.randn(1, c, 4, 4) for c in dtc.tap_channels(model.cfg.unet)]
    feats = [torch.randn_like(s) for s in skips]
    fused, h = model.fuse(skips[:-1], skips[-1], feats)
    for s, f, conv, out in zip(skips, feats, model.fusion, fused + [h]):
        gamma, beta = conv(f).chunk(2, 1)
        torch.testing.assert_close(out, s * (1 + gamma) + beta)
    base = dtc.DiffuseToChoose(dtc.baseline_config(tiny_dtc_config()))
    assert not hasattr(base, "hint_encoder") and base.context(torch.randn(2, 5, 64)).shape == (2, 1, 32)


def test_dtc_guidance_dropout_and_null_context():
    model = randomise(dtc.DiffuseToChoose(tiny_dtc_config()))
    feats = torch.randn(3, 5, 64)
    ctx = model.context(feats, drop=torch.tensor([True, False, True]))
    torch.testing.assert_close(ctx[1], model.token_proj(feats[1]))
    assert torch.equal(ctx[0], model.null_context[0].expand(5, -1)) and torch.equal(ctx[2], ctx[0])


def test_dtc_guided_sampling_step_equals_two_forwards():
    """One batched forward for both guidance branches equals two separate forwards combined by the CFG rule."""
    torch.manual_seed(0)
    model = randomise(dtc.DiffuseToChoose(tiny_dtc_config())).eval()
    sch = dtc.Schedule()
    cond = dict(z_masked=torch.randn(1, 4, 8, 8), mask_lat=torch.rand(1, 1, 8, 8), tokens=torch.randn(1, 5, 64),
                hint=torch.rand(1, 3, 16, 16))
    z = dtc.sample_latents(model, sch, cond, steps=1, guidance=3.0, generator=torch.Generator().manual_seed(1),
                           progress=False)
    z_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([1])
    with torch.no_grad():
        ctx = model.context(cond["tokens"])
        args = (cond["z_masked"], cond["mask_lat"])
        e_c = model(z_T, t, *args, ctx, hint=cond["hint"])
        e_u = model(z_T, t, *args, model.uncond_context(ctx), hint=cond["hint"])
    ref = sch.ddim_step(z_T, e_u + 3.0 * (e_c - e_u), 1, -1)
    torch.testing.assert_close(z, ref, rtol=0, atol=1e-5)


def test_dtc_latent_only_hint_computed_once():
    """With hint_input='latent_only' the hint encoder runs once per sampling call, not once per step."""
    model = randomise(dtc.DiffuseToChoose(tiny_dtc_config(hint_input="latent_only"))).eval()
    calls = []
    encode = model.hint_encoder.encode
    model.hint_encoder.encode = lambda *a: calls.append(1) or encode(*a)
    cond = dict(z_masked=torch.randn(2, 4, 8, 8), mask_lat=torch.rand(2, 1, 8, 8), tokens=torch.randn(2, 5, 64),
                hint=torch.rand(2, 3, 16, 16))
    dtc.sample_latents(model, dtc.Schedule(), cond, steps=4, progress=False)
    assert len(calls) == 1
    calls.clear()
    model.cfg.hint_input = "full"
    model.hint_encoder = UNet(UNetConfig(in_channels=9, **TINY_UNET), encoder_only=True)
    model.hint_encoder.encode = lambda *a: calls.append(1) or UNet.encode(model.hint_encoder, *a)
    dtc.sample_latents(model, dtc.Schedule(), cond, steps=4, progress=False)
    assert len(calls) == 4


# --- building from the original files --------------------------------------------------------------------


def write_original_files(tmp_path, kind):
    """A tiny single-file SD checkpoint of `kind` ('sd15', 'inpaint', 'pbe') and a tiny DINOv2 hub file."""
    torch.manual_seed({"sd15": 1, "inpaint": 2, "pbe": 3}[kind])
    unet = randomise(UNet(UNetConfig(in_channels=4 if kind == "sd15" else 9, **TINY_UNET)), seed=5)
    vae = randomise(AutoencoderKL(TINY_VAE), std=0.02, seed=6)
    sd = {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}
    sd.update({"first_stage_model." + k: v for k, v in vae.state_dict().items()})
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    sd["alphas_cumprod"] = dtc.Schedule().alphas_cumprod
    if kind == "pbe":
        sd["learnable_vector"] = torch.randn(1, 1, 32)
        sd["proj_out.weight"], sd["proj_out.bias"] = torch.randn(32, 48), torch.randn(32)
        sd["cond_stage_model.mapper.resblocks.0.ln_1.weight"] = torch.ones(48)
    sd_path = tmp_path / f"{kind}.ckpt"
    torch.save({"state_dict": sd, "global_step": 1}, sd_path)
    vit_path = tmp_path / "dinov2_tiny.pth"
    torch.save(randomise(DINOv2(TINY_VIT), seed=7).state_dict(), vit_path)
    return sd_path, vit_path, unet


def test_dtc_from_sd15_file_pads_conv_in(tmp_path):
    sd_path, vit_path, unet = write_original_files(tmp_path, "sd15")
    model, frozen = dtc.from_original(sd_path, vit_path)
    w = model.unet.input_blocks[0][0].weight
    assert w.shape[1] == 9 and w[:, 4:].abs().max() == 0 and torch.equal(w[:, :4], unet.input_blocks[0][0].weight)
    # the hint copy gets a path for z_masked + adapter(hint): channels 4..7 from the latent channels
    hw = model.hint_encoder.input_blocks[0][0].weight
    assert torch.equal(hw[:, 4:8], w[:, :4])
    for k, v in model.hint_encoder.state_dict().items():
        if k != "input_blocks.0.0.weight":
            assert torch.equal(v, model.unet.state_dict()[k]), k
    assert model.cfg.image_encoder_dim == 64 and model.cfg.vae_factor == 2 and model.cfg.mask_channel == "keep"
    assert not any(p.requires_grad for p in frozen.vae.parameters())


def test_dtc_from_inpainting_file_permutes_conv_in(tmp_path):
    """The SD-inpainting U-Net on [z_t, mask_fill, z_masked] equals our main U-Net on [z_t, z_masked, mask_keep]."""
    sd_path, vit_path, unet = write_original_files(tmp_path, "inpaint")
    model, _ = dtc.from_original(sd_path, vit_path)
    assert model.cfg.mask_channel == "fill"
    z, zm, ctx, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.randn(2, 3, 32), torch.tensor([5, 700])
    keep = (torch.rand(2, 1, 8, 8) > 0.5).float()
    with torch.no_grad():
        ref = unet(torch.cat([z, 1 - keep, zm], 1), t, ctx)
        ours = model(z, t, zm, keep, ctx, hint=torch.rand(2, 3, 16, 16))
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


def test_dtc_from_pbe_file_keeps_layout_and_null(tmp_path):
    sd_path, vit_path, unet = write_original_files(tmp_path, "pbe")
    model, _ = dtc.from_original(sd_path, vit_path)
    full = torch.load(sd_path, weights_only=True)["state_dict"]
    assert torch.equal(model.unet.input_blocks[0][0].weight, unet.input_blocks[0][0].weight)
    assert torch.equal(model.null_context, full["learnable_vector"])
    assert model.cfg.mask_channel == "keep"


def test_dtc_from_original_bad_files(tmp_path):
    sd_path, vit_path, _ = write_original_files(tmp_path, "sd15")
    with pytest.raises(CheckpointError, match="sd15.ckpt"):  # an SD file where DINOv2 is expected
        dtc.from_original(sd_path, sd_path)
    torch.save({"a.weight": torch.zeros(1)}, tmp_path / "junk.pth")
    with pytest.raises(CheckpointError, match="junk.pth"):
        dtc.from_original(tmp_path / "junk.pth", vit_path)


def test_dtc_checkpoint_round_trip(tmp_path):
    cfg = tiny_dtc_config(fusion="add")
    model = randomise(dtc.DiffuseToChoose(cfg))
    frozen = dtc.Frozen(vae=randomise(AutoencoderKL(TINY_VAE)), image_encoder=randomise(DINOv2(TINY_VIT)))
    path = tmp_path / "dtc.safetensors"
    dtc.save_dtc(model, path)
    loaded, fz = dtc.load_dtc(path)
    assert fz is None and loaded.cfg == cfg
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    dtc.save_dtc(model, path, frozen)  # overwrites atomically; now with the frozen parts
    loaded, fz = dtc.load_dtc(path)
    assert torch.equal(fz.vae.decoder.conv_out.weight, frozen.vae.decoder.conv_out.weight)
    assert torch.equal(fz.image_encoder.pos_embed, frozen.image_encoder.pos_embed)
    assert not (tmp_path / "dtc.safetensors.tmp").exists()
    with pytest.raises(CheckpointError, match="not a DTC checkpoint"):
        from safetensors.torch import save_file
        save_file({"x": torch.zeros(1)}, tmp_path / "other.safetensors")
        dtc.load_dtc(tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="missing"):  # a checkpoint of another variant's config
        from safetensors.torch import save_file
        sd = {k: v for k, v in model.state_dict().items() if not k.startswith("fusion.0")}
        save_file(sd, tmp_path / "cut.safetensors", metadata={"format": "dtc", "dtc_config": json.dumps(
            __import__("dataclasses").asdict(cfg))})
        dtc.load_dtc(tmp_path / "cut.safetensors")


def test_dtc_vgg_loss_taps(tmp_path):
    """The perceptual loss taps VGG-19 relu1_2..relu5_2, weights 1/32..1, L1; it loads a torchvision-format file."""
    import torchvision
    vgg = torchvision.models.vgg19(weights=None)
    torch.save(vgg.state_dict(), tmp_path / "vgg19.pth")
    loss = dtc.VGGLoss(tmp_path / "vgg19.pth")
    names = [type(loss.features[i]).__name__ for i in dtc.VGGLoss.TAPS]
    assert names == ["ReLU"] * 5
    x, y = torch.rand(1, 3, 32, 32) * 2 - 1, torch.rand(1, 3, 32, 32) * 2 - 1
    assert loss(x, x).item() == 0 and loss(x, y).item() > 0
    feats, h, ref = vgg.features.eval(), ((torch.cat([x, y]) + 1) / 2 - loss.mean) / loss.std, 0.0
    for i, layer in enumerate(feats[:32]):
        h = layer(h.clone())
        if i in dtc.VGGLoss.TAPS:
            a, b = h.chunk(2)
            ref += dtc.VGGLoss.WEIGHTS[dtc.VGGLoss.TAPS.index(i)] * (a - b).abs().mean()
    torch.testing.assert_close(loss(x, y), ref)


# --- sample.py end to end, on tiny original-format files ------------------------------------------------


@pytest.fixture(scope="module")
def sample_inputs(tmp_path_factory):
    from PIL import Image
    d = tmp_path_factory.mktemp("sample")
    sd_path, vit_path, _ = write_original_files(d, "sd15")
    g = torch.Generator().manual_seed(0)
    Image.fromarray((torch.rand(37, 50, 3, generator=g) * 255).to(torch.uint8).numpy()).save(d / "source.png")
    mask = Image.new("L", (25, 19), 0)  # another size than the source: resized to it
    mask.paste(255, (6, 4, 18, 15))
    mask.save(d / "mask.png")
    Image.new("RGBA", (30, 40), (200, 30, 30, 128)).save(d / "reference.png")  # alpha: composited on white
    Image.new("L", (25, 19), 0).save(d / "empty_mask.png")
    Image.new("L", (25, 19), 255).save(d / "full_mask.png")
    (d / "broken.png").write_bytes(b"not an image")
    model = randomise(dtc.DiffuseToChoose(tiny_dtc_config()), std=0.02)
    frozen = dtc.Frozen(vae=randomise(AutoencoderKL(TINY_VAE), std=0.02).eval(),
                        image_encoder=randomise(DINOv2(TINY_VIT), std=0.02).eval())
    dtc.save_dtc(model, d / "dtc.safetensors", frozen)
    return d, sd_path, vit_path


def sample_args(d, out, **kw):
    args = dict(source=d / "source.png", mask=d / "mask.png", reference=d / "reference.png", out=out, size=32,
                steps=2, dtc=d / "dtc.safetensors")
    args.update(kw)
    return [f"--{k}={v}" for k, v in args.items() if v is not None]


def test_sample_cli_end_to_end(sample_inputs, tmp_path):
    """`python sample.py`: output at the source's size, pixels outside the mask equal the source, same bytes twice."""
    from PIL import Image
    d, _, _ = sample_inputs
    outs = []
    for i in range(2):
        out = tmp_path / f"result{i}.png"
        run = subprocess.run([sys.executable, os.path.join(HERE, "sample.py"), *sample_args(d, out)],
                             capture_output=True, text=True, cwd=tmp_path)
        assert run.returncode == 0, run.stderr
        assert run.stdout.strip().splitlines()[-1] == str(out)
        outs.append(out.read_bytes())
        assert (tmp_path / f"result{i}_grid.png").exists()
    assert outs[0] == outs[1]
    result, source = Image.open(tmp_path / "result0.png"), Image.open(d / "source.png").convert("RGB")
    assert result.size == source.size == (50, 37)
    pixels = lambda im: torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(37, 50, -1)
    keep = pixels(Image.open(d / "mask.png").resize((50, 37), Image.NEAREST))[..., 0] < 128
    r, s = pixels(result), pixels(source)
    assert torch.equal(r[keep], s[keep]) and not torch.equal(r[~keep], s[~keep])


def test_sample_from_sd_without_dtc_warns(sample_inputs, tmp_path, recwarn):
    import sample
    d, sd_path, vit_path = sample_inputs
    assert sample.cli(sample_args(d, tmp_path / "r.png", dtc=None, sd=sd_path, dinov2=vit_path)) == 0
    assert any("UNTRAINED" in str(w.message) for w in recwarn)
    assert (tmp_path / "r.png").exists()


@pytest.mark.parametrize("case,expect", [
    (dict(source="missing.png"), "missing.png"),
    (dict(reference="broken.png"), "broken.png"),
    (dict(mask="empty_mask.png"), "empty"),
    (dict(mask="full_mask.png"), "whole image"),
    (dict(dtc="sd15.ckpt"), "not a DTC checkpoint"),
    (dict(dtc="missing.safetensors"), "missing.safetensors"),
])
def test_sample_bad_input_exits_with_one_line(sample_inputs, tmp_path, capsys, case, expect):
    """Each bad input: exit status 1, one line naming the problem, no traceback, the existing output untouched."""
    import sample
    d, _, _ = sample_inputs
    out = tmp_path / "result.png"
    out.write_bytes(b"earlier result")
    kw = {k: d / v for k, v in case.items()}
    assert sample.cli(sample_args(d, out, **kw)) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expect in err and "Traceback" not in err
    assert out.read_bytes() == b"earlier result"
