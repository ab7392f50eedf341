"""
Speed and memory of Diffuse to Choose, with random weights of the real architecture (no downloads), printed
as markdown tables.

    python bench.py sample   per-component times, s/image, peak memory and TFLOP/s of sampling, one row per
                             optimisation switch, beside a Paint-by-Example-like loop in diffusers
    python bench.py train    images/s, peak memory and MFU of a training step per --batch_sizes
    python bench.py compare  one forward each: our U-Net, DINOv2 and VAE vs diffusers' and timm's, same weights
    python bench.py all      sample (with compare) and train

The whole GPU table (ours with and without torch.compile, latent_only, diffusers' loop, training at batch 4 and
8), written to a markdown file, is this one command:

    python bench.py all --device=cuda --size=512 --steps=40 --guidance=5 --dtype=bfloat16 --batch_sizes=4,8 \\
        --compile --out=bench_gpu.md

(about 6-8 minutes on an H100, estimated: 10 sampling rows of 4 images each plus their components, one
torch.compile, diffusers' loop, 6 training rows; it needs about 50 GB of GPU memory at batch 8.)

On a CPU: `python bench.py all --arch=tiny` runs in seconds; `python bench.py compare --size=256 --batch=1`
compares the real-size networks (32x32 latents) in a few minutes. Every option also accepts --key=value.
diffusers and timm are test-only dependencies: without them the reference rows are skipped with a note.
"""
import argparse
import gc
import resource
import statistics
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from diffusion import Schedule
from dinov2 import PRESETS, DINOv2
from dtc import (TINY_ENCODER, TINY_VAE, DiffuseToChoose, DTCConfig, Frozen, diffusion_loss, encode_image_tokens,
                 latent_mask, make_hint, prepare, sample_latents, tiny_config)
from vae import LATENT_SCALE, AutoencoderKL, VAEConfig


def flag(s):
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["sample", "train", "compare", "all"])
    p.add_argument("--arch", default="sd15", choices=["sd15", "tiny"],
                   help="sd15: SD 1.5 U-Net (9 channels), SD VAE, DINOv2 g/14; tiny: small configs for CPU smoke runs")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default 512 for sd15, 32 for tiny)")
    p.add_argument("--steps", type=int, default=40, help="DDIM steps (paper: 40)")
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale (paper: 5)")
    p.add_argument("--batch", type=int, default=1, help="images per sampling batch")
    p.add_argument("--batch_sizes", default="1,2,4", help="training batch sizes, comma-separated")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights (+ autocast when not float32); auto: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (the median is reported)")
    p.add_argument("--peak_tflops", type=float, default=None,
                   help="peak for MFU (default on cuda: 989, H100 SXM bf16 dense; on cpu: no MFU)")
    p.add_argument("--compile", type=flag, nargs="?", const=True, default=False,
                   help="add a torch.compile row (the other rows stay eager)")
    p.add_argument("--channels_last", type=flag, nargs="?", const=True, default=False, help="base rows channels_last")
    p.add_argument("--offload", type=flag, nargs="?", const=True, default=False,
                   help="base rows keep DINOv2 on the CPU, visiting the device only to encode")
    p.add_argument("--tiled_decode", type=flag, nargs="?", const=True, default=False, help="base rows decode in tiles")
    p.add_argument("--tile", type=int, default=None, help="decode tile in latents (default: 2x2 tiles)")
    p.add_argument("--overlap", type=int, default=None, help="decode tile overlap in latents (default: latent/8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the tables to this markdown file")
    return p.parse_args(argv)


# -----------------------------------------------------------------------------
# random models of the real architecture (or a tiny one), built directly on the device


def arch(name):
    """(DTCConfig, VAEConfig, DINOv2Config): SD 1.5 with DINOv2 g/14, or the tiny architecture train.py trains."""
    if name == "sd15":
        return DTCConfig(), VAEConfig(), PRESETS["vitg14"]
    # eps prediction, as the diffusers pipelines it is timed against (the cost is the same)
    return replace(tiny_config(TINY_ENCODER.img_size), prediction="eps"), TINY_VAE, TINY_ENCODER


def build(cfg, vae_cfg, vit_cfg, device, dtype):
    """(DTC, Frozen) with PyTorch's default random init; frozen parts in eval mode without gradients."""
    with torch.device(device):
        model, vae, vit = DiffuseToChoose(cfg), AutoencoderKL(vae_cfg), DINOv2(vit_cfg)
    frozen = Frozen(vae=vae.to(dtype).eval().requires_grad_(False),
                    image_encoder=vit.to(dtype).eval().requires_grad_(False))
    return model.to(dtype), frozen


def derived(model, **changes):
    """The DTC with a changed config, sharing every tensor it can with `model` (no copy); the few it cannot
    (latent_only's 4-channel hint conv_in) are random."""
    with torch.device("meta"):
        new = DiffuseToChoose(replace(model.cfg, **changes))
    old, p = model.state_dict(), next(model.parameters())
    fresh = lambda v: 0.02 * torch.randn(v.shape, device=p.device, dtype=p.dtype)
    sd = {k: old[k] if k in old and old[k].shape == v.shape else fresh(v) for k, v in new.state_dict().items()}
    new.load_state_dict(sd, assign=True)
    return new.eval()


def meta_like(tensors):
    """Shapes only, floats as float32 like the meta replicas (the FLOPs do not depend on the dtype)."""
    return {k: torch.empty(v.shape, device="meta", dtype=torch.float32 if v.is_floating_point() else v.dtype)
            for k, v in tensors.items()}


def inputs(B, size, device, g):
    """Random source, target and reference images in [-1, 1]; the mask asks to fill the central half."""
    mask = torch.ones(B, 1, size, size)
    mask[:, :, size // 4:3 * size // 4, size // 4:3 * size // 4] = 0  # PBE's masks: 1 = keep
    x = dict(source=torch.rand(B, 3, size, size, generator=g), target=torch.rand(B, 3, size, size, generator=g),
             reference=torch.rand(B, 3, 224, 224, generator=g))
    return {**{k: (v * 2 - 1).to(device) for k, v in x.items()}, "mask": mask.to(device)}


# -----------------------------------------------------------------------------
# timing, memory, FLOPs


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # CUDA work is asynchronous: wait for it before reading the clock


def timed(fn, device, repeats, warmup=1):
    """Median seconds of fn() over `repeats` runs, after `warmup` untimed ones (allocator, cuDNN autotuning)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def reset_peak_rss():
    """Linux resets the process's peak RSS (the ru_maxrss high-water mark) on writing 5 to clear_refs."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """MiB at the peak of what runs inside: on CUDA max_memory_allocated (every live tensor, weights included);
    on a CPU the growth of the process peak RSS (resource.getrusage ru_maxrss) over the RSS at entry."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            reset_peak_rss()
            self.start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mib = torch.cuda.max_memory_allocated(self.device) / 2 ** 20
        else:
            self.mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self.start) / 1024


def memory_note(device):
    if device.type == "cuda":
        return "peak MiB: torch.cuda.max_memory_allocated over the timed runs (every live tensor, weights included)"
    how = "its high-water mark reset before each row" if reset_peak_rss() else "a lifetime peak: later rows may show 0"
    return (f"peak MiB: CPU process peak-RSS growth over the timed runs (resource.getrusage ru_maxrss, {how}); "
            "weights already resident are not counted")


def flops(fn):
    """FLOPs of fn() (matmuls, convolutions, attention) by FlopCounterMode. Run on meta replicas: no compute,
    and attention counts on every device (the CPU's flash SDPA kernel is not in the counter's table)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


# -----------------------------------------------------------------------------
# sampling: one row per switch


@dataclass
class Variant:
    batched_cfg: bool = True       # both CFG branches in one forward of 2B (dtc.sample_latents) or two forwards of B
    hint: bool = True              # the hint branch (False: the PBE-like DTC without it)
    hint_input: str = "full"       # "latent_only": hint features once per image
    math_sdpa: bool = False        # attention through SDPA's math backend instead of the fused kernels
    dtype: torch.dtype = torch.float32
    channels_last: bool = False
    compile: bool = False
    offload: bool = False          # DINOv2 lives on the CPU and visits the device only to encode
    tiled_decode: bool = False


class TwoForwardCFG:
    """The model, but the CFG batch [null; cond] of 2B runs as two forwards of B, as pipelines without batched
    CFG do: what batched CFG is measured against. Everything else is the model's own (cfg, context, ...)."""

    def __init__(self, model):
        self.model = model

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, *args, hint=None, hint_feats=None):
        return torch.cat([self.model(*(a.chunk(2)[i] for a in args), hint=None if hint is None else hint.chunk(2)[i],
                                     hint_feats=None if hint_feats is None else [f.chunk(2)[i] for f in hint_feats])
                          for i in range(2)])


def on(flag):
    return "on" if flag else "off"


def precision(dtype):
    return "float32 weights" if dtype == torch.float32 else f"{str(dtype)[6:]} weights + autocast"


def autocast(device, dtype):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def attention(v):
    return sdpa_kernel(SDPBackend.MATH) if v.math_sdpa else nullcontext()


def channels_last(tensors, enabled):
    return {k: t.contiguous(memory_format=torch.channels_last) if enabled and t.ndim == 4 else t
            for k, t in tensors.items()}


def conditioning(frozen, x, v, image_size):
    """prepare(): DINOv2 tokens, masked-image latents and the hint canvas, once per image (DTC's design).
    With offload, DINOv2 comes to the device for its forward only."""
    if v.offload:
        frozen.image_encoder.to(x["source"].device)
    cond = prepare(frozen, x["source"], x["mask"], x["reference"], image_size)
    if v.offload:
        frozen.image_encoder.cpu()
    return channels_last(cond, v.channels_last)


def decode(vae, z, v, args):
    return vae.decode_tiled(z, args.tile, args.overlap) if v.tiled_decode else vae.decode(z)


def image_work(model, runner, frozen, x, cond, v, args):
    """The model work of one image batch, split as the table reports it: name -> (callable, runs per image).
    The callables run timed on the device, and once on meta replicas to count FLOPs."""
    cfg, device = model.cfg, x["source"].device
    # one sampling step's inputs, built as sample_latents builds them: the CFG batch [null; cond] of 2B
    ctx = model.context(cond["tokens"].to(cond["z_masked"].dtype))
    z_masked, mask_lat, hint = cond["z_masked"], cond["mask_lat"], cond["hint"]
    if args.guidance != 1.0:
        ctx = torch.cat([model.uncond_context(ctx).expand(-1, ctx.shape[1], -1), ctx])
        z_masked, mask_lat, hint = (torch.cat([t] * 2) for t in (z_masked, mask_lat, hint))
    z_t = torch.randn_like(z_masked)
    t = torch.full((z_t.shape[0],), 500, device=device, dtype=torch.long)
    B = x["source"].shape[0]
    parts = [slice(None)] if v.batched_cfg or args.guidance == 1.0 else [slice(0, B), slice(B, None)]
    once = cfg.hint_input == "latent_only"

    def hint_encoder():  # "full": every step (it reads z_t, t and the context); "latent_only": once per image
        if once:
            return model.hint_features(cond["z_masked"] + model.adapter(cond["hint"]))
        return [model.hint_features(z_masked[p] + model.adapter(hint[p]), z_t[p], t[p], mask_lat[p], ctx[p])
                for p in parts]

    feats = None
    if cfg.hint:
        feats = hint_encoder() if once else model.hint_features(z_masked + model.adapter(hint), z_t, t, mask_lat, ctx)
        feats = [torch.cat([f] * (z_t.shape[0] // f.shape[0])) for f in feats]

    def dinov2():
        if v.offload:
            frozen.image_encoder.to(device)
        tokens = encode_image_tokens(frozen.image_encoder, x["reference"], cfg.image_size)
        if v.offload:
            frozen.image_encoder.cpu()
        return tokens

    work = {"DINOv2": (dinov2, 1),
            "VAE enc": (lambda: frozen.vae.encode(x["source"] * x["mask"]).sample(), 1),
            "canvas": (lambda: make_hint(x["reference"], x["mask"]), 1),
            "hint enc": (hint_encoder, 1 if once else args.steps),
            "U-Net step": (lambda: runner(z_t, t, z_masked, mask_lat, ctx, hint_feats=feats), args.steps),
            "VAE dec": (lambda: decode(frozen.vae, cond["z_masked"] / LATENT_SCALE, v, args), 1)}
    if not cfg.hint:
        del work["hint enc"]
    return work


def image_flops(cfgs, x, cond, v, args):
    """FLOPs of one image batch end to end, counted once on meta replicas of the variant's models."""
    cfg, vae_cfg, vit_cfg = cfgs
    with torch.device("meta"):
        model = DiffuseToChoose(replace(cfg, hint=v.hint, hint_input=v.hint_input))
        frozen = Frozen(vae=AutoencoderKL(vae_cfg), image_encoder=DINOv2(vit_cfg))
    v = replace(v, offload=False, batched_cfg=True)  # the same arithmetic; nothing to move on meta
    work = image_work(model, model, frozen, meta_like(x), meta_like(cond), v, args)
    # the canvas is Python on the CPU, no FLOPs (and needs values, which meta tensors lack)
    return sum(n * flops(fn) for name, (fn, n) in work.items() if name != "canvas")


@contextmanager
def configured(model, frozen, base, v, device):
    """The DTC and frozen parts as variant v wants them, put back as the base has them afterwards. A variant of
    another DTC config gets a model sharing the base's tensors, and the base's other tensors leave the device
    meanwhile, so the peak memory counts what the row uses."""
    m = model
    if (v.hint, v.hint_input) != (base.hint, base.hint_input):
        m = derived(model, hint=v.hint, hint_input=v.hint_input)
        model.cpu()  # what m shares stays on the device: m holds it
    fmt = torch.channels_last if v.channels_last else torch.contiguous_format
    for module in (m, frozen.vae, frozen.image_encoder):
        module.to(dtype=v.dtype, memory_format=fmt)
    frozen.image_encoder.to("cpu" if v.offload else device)
    runner = torch.compile(m) if v.compile else m if v.batched_cfg else TwoForwardCFG(m)
    try:
        yield m, runner
    finally:
        del m, runner
        fmt = torch.channels_last if base.channels_last else torch.contiguous_format
        for module in (model, frozen.vae, frozen.image_encoder):
            module.to(device, base.dtype, memory_format=fmt)
        if base.offload:
            frozen.image_encoder.cpu()
        if v.compile:
            torch._dynamo.reset()
        free(device)


def free(device):
    if device.type == "cuda":  # hand freed blocks back, so the next row's peak starts from what it holds
        gc.collect()
        torch.cuda.empty_cache()


def sample_row(label, v, model, frozen, base, x, args, schedule):
    """Per-component seconds (None where not measured), seconds per batch end to end, and peak MiB."""
    device = x["source"].device
    with configured(model, frozen, base, v, device) as (m, runner), torch.no_grad(), \
            autocast(device, v.dtype), attention(v):
        xv = channels_last(x, v.channels_last)
        cond = conditioning(frozen, xv, v, m.cfg.image_size)
        times = {}
        if not v.compile:  # a compiled row reports end to end only (each call signature would compile anew)
            work = image_work(m, runner, frozen, xv, cond, v, args)
            times = {name: n * timed(fn, device, args.repeats) for name, (fn, n) in work.items()}

        def image():
            c = conditioning(frozen, xv, v, m.cfg.image_size)
            z = sample_latents(runner, schedule, c, args.steps, args.guidance, progress=False)
            return decode(frozen.vae, z / LATENT_SCALE, v, args)

        image()  # warm-up (and compilation)
        with PeakMemory(device) as mem:
            seconds = timed(image, device, args.repeats, warmup=0)
    return dict(label=label, times=times, seconds=seconds, mib=mem.mib)


def sample_variants(args, base):
    rows = [("DTC (base)", base)]
    if args.guidance != 1.0:
        rows.append(("CFG as two forwards", replace(base, batched_cfg=False)))
    rows += [("latent_only hint features", replace(base, hint_input="latent_only")),
             ("no hint branch (PBE-like)", replace(base, hint=False)),
             ("math SDPA backend", replace(base, math_sdpa=True))]
    other = torch.bfloat16 if base.dtype == torch.float32 else torch.float32
    rows.append((precision(other), replace(base, dtype=other)))
    rows += [(f"channels_last {on(not base.channels_last)}", replace(base, channels_last=not base.channels_last)),
             (f"DINOv2 offload {on(not base.offload)}", replace(base, offload=not base.offload)),
             (f"tiled VAE decode {on(not base.tiled_decode)}", replace(base, tiled_decode=not base.tiled_decode))]
    if args.compile:
        rows.append(("torch.compile", replace(base, compile=True)))
    return rows


# -----------------------------------------------------------------------------
# the references: diffusers' U-Net, VAE and DDIM, timm's DINOv2, holding our random weights


class Tokens(nn.Module):
    """timm's ViT returning all final-normed tokens, as our DINOv2 does."""

    def __init__(self, vit):
        super().__init__()
        self.vit = vit

    def forward(self, x):
        return self.vit.forward_features(x)


def references(model, frozen, notes):
    """dict(unet, vae, dino, token_proj, null) of diffusers/timm modules sharing our tensors (assign=True: no
    copy), or None when diffusers is missing; dino is None when timm is."""
    try:
        from diffusers import AutoencoderKL as DiffusersVAE
        from diffusers import UNet2DConditionModel
        from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
    except ImportError:
        print("diffusers not installed: skipping the reference rows")
        notes.append("diffusers not installed: skipping the reference rows")
        return None
    ucfg, vcfg = model.cfg.unet, frozen.vae.cfg
    n, nv = len(ucfg.channel_mult), len(vcfg.ch_mult)
    down = tuple("CrossAttnDownBlock2D" if level in ucfg.attention_levels else "DownBlock2D" for level in range(n))
    with torch.device("meta"):
        unet = UNet2DConditionModel(
            in_channels=ucfg.in_channels, out_channels=ucfg.out_channels, layers_per_block=ucfg.num_res_blocks,
            block_out_channels=tuple(ucfg.model_channels * m for m in ucfg.channel_mult), down_block_types=down,
            up_block_types=tuple(b.replace("Down", "Up") for b in reversed(down)),
            cross_attention_dim=ucfg.context_dim, attention_head_dim=ucfg.num_heads,  # diffusers' name for heads
            transformer_layers_per_block=ucfg.transformer_depth)
        vae = DiffusersVAE(in_channels=vcfg.in_channels, out_channels=vcfg.out_ch, latent_channels=vcfg.embed_dim,
                           block_out_channels=tuple(vcfg.ch * m for m in vcfg.ch_mult),
                           layers_per_block=vcfg.num_res_blocks, down_block_types=("DownEncoderBlock2D",) * nv,
                           up_block_types=("UpDecoderBlock2D",) * nv, norm_num_groups=vcfg.norm_groups)
    unet.load_state_dict(convert_ldm_unet_checkpoint(
        {"model.diffusion_model." + k: v for k, v in model.unet.state_dict().items()},
        {"layers_per_block": ucfg.num_res_blocks}), strict=True, assign=True)
    vae.load_state_dict(convert_ldm_vae_checkpoint(
        {"first_stage_model." + k: v for k, v in frozen.vae.state_dict().items()},
        {"down_block_types": ["DownEncoderBlock2D"] * nv, "up_block_types": ["UpDecoderBlock2D"] * nv}),
        strict=True, assign=True)
    with torch.device("meta"):  # the one DTC layer a PBE-like loop needs: image tokens -> context
        proj = nn.Linear(model.token_proj.in_features, model.token_proj.out_features)
    proj.load_state_dict(model.token_proj.state_dict(), assign=True)
    refs = dict(unet=unet.eval(), vae=vae.eval(), dino=None, token_proj=proj, null=model.null_context.detach().clone())
    try:
        import timm
        from timm.models.vision_transformer import checkpoint_filter_fn
    except ImportError:
        print("timm not installed: skipping the DINOv2 reference row")
        notes.append("timm not installed: skipping the DINOv2 reference row; diffusers' loop uses our DINOv2")
        return refs
    ours, size = frozen.image_encoder, model.cfg.image_size
    D, grid = ours.cfg.embed_dim, size // ours.cfg.patch_size
    kw = dict(img_size=size, embed_dim=D, depth=ours.cfg.depth, num_heads=ours.cfg.num_heads, num_classes=0)
    if ours.cfg.ffn == "swiglu":  # timm packs SwiGLU's two halves in one fc1 of int(D * mlp_ratio) = 2 * hidden
        kw["mlp_ratio"] = (2 * ours.blocks[0].mlp.w3.in_features + 0.5) / D
    name = "vit_giant_patch14_dinov2" if ours.cfg.ffn == "swiglu" else "vit_small_patch14_dinov2"
    with torch.device("meta"):
        vit = timm.create_model(name, pretrained=False, **kw)
    # timm built at the benchmark's size, pos_embed resampled by the original rule beforehand (dinov2.py)
    sd = dict(ours.state_dict(), pos_embed=ours.resized_pos_embed(grid, grid).detach())
    vit.load_state_dict(checkpoint_filter_fn(sd, vit), strict=True, assign=True)
    refs["dino"] = Tokens(vit).eval()
    return refs


def diffusers_work(refs, frozen, x, cond, args):
    """The reference pipeline's parts, as image_work: timm DINOv2, diffusers' VAE and U-Net (the CFG batch)."""
    dino = frozen.image_encoder if refs["dino"] is None else refs["dino"]
    ctx = refs["token_proj"](cond["tokens"].to(cond["z_masked"].dtype))
    n = 2 if args.guidance != 1.0 else 1  # the CFG batch (both halves conditional here: the same arithmetic)
    sample = torch.cat([torch.randn_like(cond["z_masked"]), cond["z_masked"], cond["mask_lat"]], 1).repeat(n, 1, 1, 1)
    ctx = ctx.repeat(n, 1, 1)
    return {"DINOv2": (lambda: encode_image_tokens(dino, x["reference"], args.image_size), 1),
            "VAE enc": (lambda: refs["vae"].encode(x["source"] * x["mask"]).latent_dist.sample(), 1),
            "U-Net step": (lambda: refs["unet"](sample, 500, encoder_hidden_states=ctx).sample, args.steps),
            "VAE dec": (lambda: refs["vae"].decode(cond["z_masked"] / LATENT_SCALE).sample, 1)}


def diffusers_image(refs, frozen, x, args):
    """A Paint-by-Example-like pipeline in diffusers (as PaintByExamplePipeline runs it): image tokens, VAE
    encode, DDIMScheduler with SD's settings and batched CFG, VAE decode."""
    from diffusers import DDIMScheduler
    dino = frozen.image_encoder if refs["dino"] is None else refs["dino"]
    ctx = refs["token_proj"](encode_image_tokens(dino, x["reference"], args.image_size))
    z_masked = refs["vae"].encode(x["source"] * x["mask"]).latent_dist.sample() * LATENT_SCALE
    dtype = z_masked.dtype
    ctx, mask_lat = ctx.to(dtype), latent_mask(x["mask"], z_masked.shape[-2:]).to(dtype)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                              steps_offset=1, timestep_spacing="leading", prediction_type="epsilon")
    scheduler.set_timesteps(args.steps)
    z = torch.randn_like(z_masked)
    guided = args.guidance != 1.0
    if guided:
        ctx = torch.cat([refs["null"].to(ctx).expand_as(ctx), ctx])
        z_masked, mask_lat = torch.cat([z_masked] * 2), torch.cat([mask_lat] * 2)
    for t in scheduler.timesteps:
        zz = torch.cat([z] * 2) if guided else z
        eps = refs["unet"](torch.cat([zz, z_masked, mask_lat], 1), t, encoder_hidden_states=ctx).sample
        if guided:
            eps_null, eps_cond = eps.chunk(2)
            eps = eps_null + args.guidance * (eps_cond - eps_null)
        z = scheduler.step(eps, t, z).prev_sample
    return refs["vae"].decode(z / LATENT_SCALE).sample


def diffusers_row(refs, frozen, x, cond, base, args):
    device = x["source"].device
    with torch.no_grad(), autocast(device, base.dtype):
        work = diffusers_work(refs, frozen, x, cond, args)
        times = {name: n * timed(fn, device, args.repeats) for name, (fn, n) in work.items()}
        diffusers_image(refs, frozen, x, args)  # warm-up
        with PeakMemory(device) as mem:
            seconds = timed(lambda: diffusers_image(refs, frozen, x, args), device, args.repeats, warmup=0)
    return dict(label="diffusers PBE-like loop (reference)", times=times, seconds=seconds, mib=mem.mib)


def compare_rows(model, frozen, refs, x, cond, args):
    """One forward each, ours and the reference's, on the same inputs: [module, shape, ours s, theirs s]."""
    device, B = x["source"].device, x["source"].shape[0]
    unet_in = torch.cat([torch.randn_like(cond["z_masked"]), cond["z_masked"], cond["mask_lat"]], 1)
    ctx = model.context(cond["tokens"].to(unet_in.dtype))
    t = torch.full((B,), 500, device=device, dtype=torch.long)
    image = torch.nn.functional.interpolate(x["reference"], size=(args.image_size,) * 2).to(unet_in.dtype)
    z = cond["z_masked"] / LATENT_SCALE
    pairs = [("U-Net forward", f"{tuple(unet_in.shape)}, {ctx.shape[1]} tokens", lambda: model.unet(unet_in, t, ctx),
              lambda: refs["unet"](unet_in, t, encoder_hidden_states=ctx).sample, "diffusers"),
             ("DINOv2 forward", f"{tuple(image.shape)}", lambda: frozen.image_encoder(image),
              None if refs["dino"] is None else lambda: refs["dino"](image), "timm"),
             ("VAE encode", f"{tuple(x['source'].shape)}", lambda: frozen.vae.encode(x["source"]).mean,
              lambda: refs["vae"].encode(x["source"]).latent_dist.mean, "diffusers"),
             ("VAE decode", f"{tuple(z.shape)}", lambda: frozen.vae.decode(z),
              lambda: refs["vae"].decode(z).sample, "diffusers")]
    rows = []
    for name, shape, ours, theirs, lib in pairs:
        if theirs is None:
            continue
        print(f"  {name}: ours vs {lib}", file=sys.stderr, flush=True)
        ours(), theirs()  # warm-up; then alternate, so a change in machine load hits both sides alike
        times = [(timed(ours, device, 1, warmup=0), timed(theirs, device, 1, warmup=0)) for _ in range(args.repeats)]
        rows.append([name, shape, statistics.median(a for a, _ in times), statistics.median(b for _, b in times), lib])
    return rows


# -----------------------------------------------------------------------------
# the sections


def fmt(x, digits=4):
    return "—" if x is None else f"{x:.{digits}g}"


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


TRAIN_HEADER = ["batch", "variant", "s/step", "images/s", "canvas ms/step", "peak MiB", "TFLOP/s", "MFU"]
COMPONENTS = ["DINOv2", "VAE enc", "canvas", "hint enc", "U-Net step", "VAE dec"]
SAMPLE_HEADER = ["variant", "DINOv2 ms", "VAE enc ms", "canvas ms", "hint enc ms/image", "U-Net ms/step", "VAE dec ms",
                 "s/image", "peak MiB", "TFLOP/s"]


def sample_section(args, device, base, compare_only=False):
    cfgs = arch(args.arch)
    model, frozen = build(*cfgs, device, base.dtype)
    model.eval()
    schedule = Schedule()
    x = inputs(args.batch, args.size, device, torch.Generator().manual_seed(args.seed))
    notes, out, results, image_tflop, counted = [], [], [], {}, {}
    with torch.no_grad(), autocast(device, base.dtype):
        cond = conditioning(frozen, x, replace(base, offload=False, channels_last=False), cfgs[0].image_size)
    if not compare_only:
        for label, v in sample_variants(args, base):
            print(f"sample: {label}", file=sys.stderr, flush=True)
            if v.compile and device.type == "cpu":
                notes.append("torch.compile row skipped on the CPU: inductor's C++/OpenMP kernels made every later "
                             "eager call in the process ~100x slower on a 2-core machine (measured), which would spoil "
                             "the rows after it; measure it on CUDA")
                results.append(dict(label=label, error="skipped"))
                continue
            arithmetic = (v.hint, v.hint_input, v.tiled_decode)  # what changes the FLOPs; the other switches do not
            if arithmetic not in counted:
                counted[arithmetic] = image_flops(cfgs, x, cond, v, args) / 1e12
            image_tflop[label] = counted[arithmetic]
            try:
                results.append(sample_row(label, v, model, frozen, base, x, args, schedule))
            except torch.cuda.OutOfMemoryError:
                results.append(dict(label=label, error="OOM"))
            except Exception as e:  # torch.compile needs a working toolchain: a failure is a note, not the end
                if not v.compile:
                    raise
                first = str(e).strip().splitlines()[0][:200]
                notes.append(f"torch.compile failed on {device.type}, row skipped: {first}")
                results.append(dict(label=label, error="skipped"))
            free(device)
        frozen.image_encoder.to(device)  # (the base row may offload it) the comparison runs ours on the device
    refs = references(model, frozen, notes)
    compare = []
    if refs is not None:
        with torch.no_grad(), autocast(device, base.dtype):
            compare = compare_rows(model, frozen, refs, x, cond, args)
        if not compare_only:
            print("sample: diffusers PBE-like loop", file=sys.stderr, flush=True)
            # ours leaves the device: what diffusers and timm share with it stays, held by them
            model.cpu(), frozen.vae.cpu()
            if refs["dino"] is not None:
                frozen.image_encoder.cpu()
            free(device)
            try:
                ref = diffusers_row(refs, frozen, x, cond, base, args)
            except torch.cuda.OutOfMemoryError:
                ref = dict(label="diffusers PBE-like loop (reference)", error="OOM")
            image_tflop[ref["label"]] = image_tflop["no hint branch (PBE-like)"]  # the same architecture
            results.append(ref)
            mine = next(r for r in results if r["label"] == "no hint branch (PBE-like)")
            if "error" not in ref and "error" not in mine:
                compare.append(["sampling, s/image", f"{args.steps} steps, guidance {args.guidance:g}, "
                                "no hint branch vs diffusers", mine["seconds"] / args.batch,
                                ref["seconds"] / args.batch, "diffusers"])
    del model, frozen, refs
    free(device)

    if not compare_only:
        rows = []
        for r in results:
            if "error" in r:
                rows.append([r["label"]] + [r["error"]] * (len(SAMPLE_HEADER) - 1))
                continue
            ms = [fmt(r["times"][c] * 1e3) if c in r["times"] else "—" for c in COMPONENTS]
            rows.append([r["label"], *ms, fmt(r["seconds"] / args.batch), fmt(r["mib"], 5),
                         fmt(image_tflop[r["label"]] / r["seconds"])])
        b = results[0]
        settings = (f"base = batched CFG, hint input 'full', default SDPA backends, {precision(base.dtype)}, "
                    f"channels_last {on(base.channels_last)}, DINOv2 offload {on(base.offload)}, "
                    f"tiled decode {on(base.tiled_decode)}; every other row flips one switch")
        lines = [f"## Sampling: {args.size}x{args.size}, {args.steps} DDIM steps, guidance {args.guidance:g}, "
                 f"batch {args.batch}", "", table(SAMPLE_HEADER, rows), "", f"- {settings}.",
                 "- Component times are medians for the batch, separately timed; hint enc and VAE enc/dec as the row "
                 "runs them (hint enc: every step with the 'full' input, once per image with latent_only); U-Net "
                 "step = main U-Net + FiLM for both CFG branches; canvas = make_hint (Python, on the CPU). "
                 "s/image: end to end (prepare + sampling + decode) / batch."]
        if "error" not in b:
            once = sum(b["times"].get(c, 0) for c in ("DINOv2", "VAE enc", "canvas"))
            lines.append(f"- DINOv2 tokens, VAE latents and the hint canvas are computed once per image (prepare(), "
                         f"DTC's design): {once * 1e3:.4g} ms for the batch, {100 * once / b['seconds']:.2g}% of the "
                         "base row's time; the DINOv2 encoder never runs per step.")
        lines += [f"- TFLOP/s = FLOPs per batch / end-to-end seconds; FLOPs counted once with FlopCounterMode on meta "
                  f"replicas (base: {image_tflop['DTC (base)']:.4g} TFLOP per batch); diffusers' loop is credited the "
                  "FLOPs of our identical-architecture 'no hint branch' row.",
                  f"- {memory_note(device)}.",
                  f"- tiled VAE decode: tile {args.tile}, overlap {args.overlap} latents."]
        lines += [f"- {n}" for n in notes]
        out.append("\n".join(lines))
    if compare:
        rows = [[name, shape, fmt(a * 1e3), fmt(b * 1e3), f"{a / b:.3g}", lib] for name, shape, a, b, lib in compare]
        out.append("\n".join([f"## Ours vs the reference implementations (same weights, {str(base.dtype)[6:]})", "",
                              table(["module", "input", "ours ms", "reference ms", "ours / reference", "reference"],
                                    rows), "", "- Medians of alternating timed runs (ours, reference, ours, ...); "
                              "the sampling row is in ms per image. Goal: ours / reference <= 1."]))
    elif compare_only and notes:
        out.append("\n".join(f"- {n}" for n in notes))
    return out


def train_row(model, frozen, schedule, x, checkpointing, fused, args, device, base):
    model.unet.grad_checkpointing = checkpointing
    if model.cfg.hint:
        model.hint_encoder.grad_checkpointing = checkpointing
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=fused)

    def step():
        with autocast(device, base.dtype):
            cond = prepare(frozen, x["source"], x["mask"], x["reference"], model.cfg.image_size, target=x["target"])
            loss = diffusion_loss(model, schedule, cond)[0]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up: AdamW state, cuDNN autotuning
    with PeakMemory(device) as mem:
        seconds = timed(step, device, args.repeats, warmup=0)
    return seconds, mem.mib


def train_section(args, device, base):
    cfg, vae_cfg, vit_cfg = arch(args.arch)
    model, frozen = build(cfg, vae_cfg, vit_cfg, device, base.dtype)
    model.float().train()  # fp32 master weights (autocast computes in base.dtype); the frozen parts stay in it
    schedule = Schedule()
    peak = args.peak_tflops or (989.0 if device.type == "cuda" else None)
    variants = [("base", False, device.type == "cuda"), ("grad checkpointing", True, device.type == "cuda")]
    if device.type == "cuda":
        variants.append(("AdamW foreach (not fused)", False, False))
    rows = []
    for B in [int(b) for b in args.batch_sizes.split(",")]:
        x = inputs(B, args.size, device, torch.Generator().manual_seed(args.seed))
        with torch.no_grad(), autocast(device, base.dtype):
            cond = prepare(frozen, x["source"], x["mask"], x["reference"], cfg.image_size, target=x["target"])
            canvas = timed(lambda: make_hint(x["reference"], x["mask"]), device, args.repeats)
        # model FLOPs per step (no recomputation): the frozen encoders' forwards, the DTC forward and backward
        with torch.device("meta"):
            m_model, m_vae, m_vit = DiffuseToChoose(cfg), AutoencoderKL(vae_cfg), DINOv2(vit_cfg)
        mx, mc = meta_like(x), meta_like(cond)
        step_tflop = (flops(lambda: encode_image_tokens(m_vit, mx["reference"], cfg.image_size))
                      + flops(lambda: m_vae.encode(mx["source"] * mx["mask"]).sample())
                      + flops(lambda: m_vae.encode(mx["target"]).sample())
                      + flops(lambda: diffusion_loss(m_model, schedule, mc)[0].backward())) / 1e12
        del m_model, m_vae, m_vit
        for label, checkpointing, fused in variants:
            print(f"train: batch {B}, {label}", file=sys.stderr, flush=True)
            try:
                seconds, mib = train_row(model, frozen, schedule, x, checkpointing, fused, args, device, base)
                tflops = step_tflop / seconds
                rows.append([B, label, fmt(seconds), fmt(B / seconds), fmt(canvas * 1e3), fmt(mib, 5), fmt(tflops),
                             f"{100 * tflops / peak:.3g}%" if peak else "n/a"])
            except torch.cuda.OutOfMemoryError:
                rows.append([B, label] + ["OOM"] * 6)
            model.zero_grad(set_to_none=True)
            free(device)
    del model, frozen
    free(device)
    lines = [f"## Training: {args.size}x{args.size}, {str(base.dtype)[6:]} autocast over fp32 master weights"
             if base.dtype != torch.float32 else f"## Training: {args.size}x{args.size}, float32", "",
             table(TRAIN_HEADER, rows), "",
             "- One step: prepare() (frozen VAE encodes of target and masked source, DINOv2 tokens, hint canvas, all "
             "under no_grad), the DTC forward and backward (Eq. 1 loss, no VGG loss), AdamW (fused on CUDA).",
             (f"- MFU against {peak:g} TFLOP/s (--peak_tflops; default on cuda: H100 SXM bf16 dense)" if peak else
              "- MFU n/a on a CPU unless --peak_tflops is given") + f"; FLOPs per step ({fmt(step_tflop)} TFLOP at "
             "the last batch size) counted once with FlopCounterMode on meta replicas (model FLOPs, no recomputation).",
             "- canvas: make_hint's Python largest-rectangle search for the batch, part of each step.",
             f"- {memory_note(device)}; includes AdamW state."]
    return ["\n".join(lines)]


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else (
        torch.bfloat16 if device.type == "cuda" else torch.float32)
    cfg = arch(args.arch)[0]
    args.size = args.size or (512 if args.arch == "sd15" else 32)
    args.image_size = cfg.image_size
    latent = args.size // cfg.vae_factor
    args.overlap = args.overlap if args.overlap is not None else max(1, latent // 8)
    args.tile = args.tile or (latent + args.overlap + 1) // 2  # two tiles per side
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest convolutions
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # for float32 rows
    base = Variant(dtype=dtype, channels_last=args.channels_last, offload=args.offload, tiled_decode=args.tiled_decode)
    where = (f"{torch.cuda.get_device_name(device)} (TF32 on for float32)" if device.type == "cuda"
             else f"CPU, {torch.get_num_threads()} threads")
    command = " ".join(sys.argv[1:] if argv is None else argv)
    sections = [f"# DTC benchmark: {args.mode}, arch {args.arch}, {where}, torch {torch.__version__}, "
                f"{str(dtype)[6:]}, random weights\n\n`python bench.py {command}`"]
    print(sections[0] + "\n", flush=True)
    todo = {"sample": ["sample"], "train": ["train"], "compare": ["compare"], "all": ["sample", "train"]}[args.mode]
    for part in todo:
        if part == "train":
            new = train_section(args, device, base)
        else:
            new = sample_section(args, device, base, compare_only=part == "compare")
        for s in new:
            print(s + "\n", flush=True)
        sections += new
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n\n".join(sections) + "\n")
        print(f"written: {args.out}")


if __name__ == "__main__":
    main()
