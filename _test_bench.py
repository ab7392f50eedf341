# ----------------------------------------------------------------------------- bench.py and AutoencoderKL.decode_tiled
import math
import sys
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import bench
from dtc import DiffuseToChoose
from unet import UNet, UNetConfig
from vae import AutoencoderKL, VAEConfig

TINY_VAE = VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1)  # 4x: 16x12 latents <-> 64x48 images


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from a second thread, and on a machine shared with other jobs OpenMP threads
    wait on each other (measured: up to 60x slower); one thread keeps this file fast."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def random_vae(seed=0):
    """Every parameter random (conv weights ~ N(0, 1/fan_in), norm weights around 1, biases non-zero)."""
    vae = AutoencoderKL(TINY_VAE).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            r = torch.randn(p.shape, generator=g)
            p.copy_(r / math.sqrt(p[0].numel()) if p.ndim > 1 else 1 + 0.2 * r if "norm" in name and "weight" in name
                    else 0.2 * r)
    return vae


def latents(seed=1):
    return torch.randn(2, 4, 16, 12, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_bench_decode_tiled_one_tile_is_decode(one_thread):
    """A latent no larger than one tile is decoded in one piece: bit-identical to decode()."""
    vae, z = random_vae(), latents()
    assert torch.equal(vae.decode_tiled(z, tile=16, overlap=4), vae.decode(z))
    assert torch.equal(vae.decode_tiled(z, tile=64), vae.decode(z))


@pytest.mark.parametrize("tile,overlap", [(8, 4), (8, 2), (5, 3), (6, 0), (7, 6)])
@torch.no_grad()
def test_bench_decode_tiled_blending_is_a_partition_of_unity(one_thread, tile, overlap):
    """With a decoder that has no global parts (nearest upsampling of a pointwise map), tiling must change
    nothing: tiles land where they belong and the ramp weights of the tiles covering each pixel sum to 1,
    including uneven last tiles (flush with the end) and zero overlap."""
    vae, z = random_vae(), latents()
    f = vae.cfg.downsample_factor
    vae.decode = lambda z: F.interpolate(torch.tanh(z[:, :3] * 2 + z[:, 3:]), scale_factor=f, mode="nearest")
    out = vae.decode_tiled(z, tile=tile, overlap=overlap)
    assert out.shape == (2, 3, 16 * f, 12 * f)
    assert (out - vae.decode(z)).abs().max() < 1e-6


@torch.no_grad()
def test_bench_decode_tiled_cross_fades_seams(one_thread):
    """Where tiles disagree, the overlap is a linear cross-fade, not a seam. A decoder whose output is one value
    per tile (the mean of the tile's latents) shows it: three tiles along the width overlapping by 4 latents
    (16 pixels) step by at most |a - b| / 16 between neighbouring pixels, and hold their own value outside the
    overlaps; with no overlap the step is the whole |a - b|."""
    vae = random_vae()
    f = vae.cfg.downsample_factor
    z = torch.linspace(0, 3, 16).expand(1, 4, 4, 16) ** 2  # tiles [0,8), [4,12), [8,16): different means
    vae.decode = lambda z: z.mean().expand(1, 3, z.shape[2] * f, z.shape[3] * f)
    row = vae.decode_tiled(z, tile=8, overlap=4)[0, 0, 0]  # (64,) pixels along the width
    a, b, c = (z[..., s:s + 8].mean() for s in (0, 4, 8))
    assert torch.allclose(row[:16], a) and torch.allclose(row[-16:], c)  # outside the overlaps
    steps = row.diff().abs()
    assert steps.max() <= max(abs(a - b), abs(b - c)) / 16 * 1.001
    assert torch.allclose(row[16:32].mean(), (a + b) / 2)  # the middle of a linear fade
    hard = vae.decode_tiled(z, tile=8, overlap=0)[0, 0, 0]
    assert torch.isclose(hard.diff().abs().max(), abs(z[..., :8].mean() - z[..., 8:].mean()))


@torch.no_grad()
def test_bench_decode_tiled_close_to_decode(one_thread):
    """Small tiles of the real decoder: right shape, close to decode() but not equal (the mid-block attention and
    every GroupNorm see one tile). Measured on this random VAE, 16x12 latents, relative RMS error (max |d|):
    tile 10 / overlap 4: 0.216 (0.67); tile 8 / overlap 4: 0.321 (1.07); tile 8, no overlap: 0.461 (2.57).
    The bounds are loose, and the overlap's cross-fade must beat hard seams."""
    vae, z = random_vae(), latents()
    full = vae.decode(z)

    def rel_rms(tile, overlap):
        out = vae.decode_tiled(z, tile=tile, overlap=overlap)
        assert out.shape == full.shape == (2, 3, 64, 48) and out.dtype == full.dtype
        return ((out - full).pow(2).mean().sqrt() / full.std()).item(), (out - full).abs().max().item()

    err, worst = rel_rms(10, 4)
    print(f"decode_tiled tile 10 overlap 4: relative RMS {err:.3f}, max |d| {worst:.3f}")
    assert err < 0.3 and worst < 1.0
    assert rel_rms(8, 4)[0] < rel_rms(8, 0)[0]


def tiny_dtc(**kw):
    torch.manual_seed(0)
    model = DiffuseToChoose(replace(bench.arch("tiny")[0], **kw)).eval()
    with torch.no_grad():
        for p in model.parameters():  # the fusion convs are zero-initialised: randomise, or the hint is invisible
            p.normal_(0, 0.05)
    return model


@torch.no_grad()
def test_bench_two_forward_cfg_equals_batched(one_thread):
    """The 'CFG as two forwards' row computes what the batched forward computes, with and without hint features."""
    model = tiny_dtc()
    g = torch.Generator().manual_seed(3)
    z, zm = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    mask, ctx = torch.rand(4, 1, 8, 8, generator=g), torch.randn(4, 5, 32, generator=g)
    t, hint = torch.tensor([10, 10, 700, 700]), torch.rand(4, 3, 16, 16, generator=g)
    two = bench.TwoForwardCFG(model)
    assert two.cfg is model.cfg
    torch.testing.assert_close(two(z, t, zm, mask, ctx, hint=hint), model(z, t, zm, mask, ctx, hint=hint),
                               atol=1e-6, rtol=1e-5)
    feats = model.hint_features(zm + model.adapter(hint), z, t, mask, ctx)
    torch.testing.assert_close(two(z, t, zm, mask, ctx, hint_feats=feats), model(z, t, zm, mask, ctx, hint_feats=feats),
                               atol=1e-6, rtol=1e-5)


def test_bench_derived_model_shares_tensors(one_thread):
    """Variant rows reuse the base's weights without copying; only what cannot be shared is new."""
    model = tiny_dtc()
    nohint = bench.derived(model, hint=False)
    assert not hasattr(nohint, "hint_encoder")
    assert nohint.unet.out[2].weight.data_ptr() == model.unet.out[2].weight.data_ptr()
    lo = bench.derived(model, hint_input="latent_only")
    assert lo.hint_encoder.input_blocks[0][0].weight.shape[1] == 4  # a 4-channel conv_in: fresh
    assert lo.hint_encoder.input_blocks[1][0].in_layers[2].weight.data_ptr() == \
        model.hint_encoder.input_blocks[1][0].in_layers[2].weight.data_ptr()


def test_bench_flops_count_attention(one_thread):
    """FLOPs are counted on meta replicas, attention included: the SD 1.5 U-Net at 64x64 latents with 257
    context tokens is 818.6 GFLOP (anchors.md B.2: 818.5), and our counting equals it."""
    with torch.device("meta"):
        unet = UNet(UNetConfig(in_channels=9))
        x, ctx = torch.empty(1, 9, 64, 64), torch.empty(1, 257, 768)
    n = bench.flops(lambda: unet(x, torch.zeros(1, dtype=torch.long, device="meta"), ctx))
    assert abs(n / 1e9 - 818.6) < 0.1


SAMPLE_ROWS = ["DTC (base)", "CFG as two forwards", "latent_only hint features", "no hint branch (PBE-like)",
               "math SDPA backend", "bfloat16 weights + autocast", "channels_last on", "DINOv2 offload on",
               "tiled VAE decode on"]
REFERENCE_ROW = "diffusers PBE-like loop (reference)"
COMPARE_ROWS = ["U-Net forward", "DINOv2 forward", "VAE encode", "VAE decode", "sampling, s/image"]
TRAIN_HEADER = ["batch", "variant", "s/step", "images/s", "canvas ms/step", "peak MiB", "TFLOP/s", "MFU"]


def tables(text):
    """Markdown tables of the output: a list of (header, rows), each row a list of cells."""
    found, current = [], None
    for line in text.splitlines():
        if not line.startswith("|"):
            current = None
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if current is None:
            current = (cells, [])
            found.append(current)
        elif set(line) - set("|-"):
            current[1].append(cells)
    return found


def assert_numbers(cells):
    for c in cells:
        if c not in ("—", "n/a"):
            assert float(c.rstrip("%")) >= 0, c


def test_bench_smoke_all_tables(one_thread, tmp_path, capsys):
    """`bench.py all --arch=tiny` on the CPU prints complete tables (every row and column label, every number
    parses) and writes them to --out. Never asserts a time."""
    out = tmp_path / "bench.md"
    bench.main(["all", "--arch=tiny", "--steps=1", "--repeats=1", "--batch_sizes=1,2", "--device=cpu",
                f"--out={out}"])
    text = capsys.readouterr().out
    assert tables(out.read_text()) == tables(text)
    (sh, srows), (ch, crows), (th, trows) = tables(text)
    assert sh == bench.SAMPLE_HEADER
    assert [r[0] for r in srows] == SAMPLE_ROWS + [REFERENCE_ROW]
    for r in srows:
        assert len(r) == len(sh)
        assert_numbers(r[1:])
    base = dict(zip(sh, srows[0]))
    assert all(base[c] != "—" for c in sh)  # the base row measures every component
    assert ch == ["module", "input", "ours ms", "reference ms", "ours / reference", "reference"]
    assert [r[0] for r in crows] == COMPARE_ROWS
    for r in crows:
        assert_numbers(r[2:5])
    assert th == TRAIN_HEADER
    assert [(r[0], r[1]) for r in trows] == [(b, v) for b in "12" for v in ("base", "grad checkpointing")]
    for r in trows:
        assert_numbers(r[2:])
        assert r[-1] == "n/a"  # no MFU on a CPU without --peak_tflops
    assert "getrusage" in text and "FlopCounterMode" in text


def test_bench_without_diffusers(one_thread, monkeypatch, capsys):
    """Without diffusers the benchmark says so in one line and goes on without the reference rows. (Also: on a
    CPU the --compile row is skipped with a note, as inductor's OpenMP kernels would slow the rows after it.)"""
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` now raises ImportError
    bench.main(["sample", "--arch=tiny", "--steps=1", "--repeats=1", "--device=cpu", "--compile"])
    text = capsys.readouterr().out
    assert "diffusers not installed: skipping the reference rows\n" in text
    (sh, srows), = tables(text)
    assert [r[0] for r in srows] == SAMPLE_ROWS + ["torch.compile"]
    assert srows[-1][1:] == ["skipped"] * (len(sh) - 1) and "torch.compile row skipped on the CPU" in text
