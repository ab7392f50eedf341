"""
Speed and memory of Diffuse to Choose with random weights of the real architecture (no downloads), as markdown tables.

    python bench.py sample   per-component times, s/image, peak memory and TFLOP/s of sampling, one row per
                             optimisation switch, beside a Paint-by-Example-like loop in diffusers
    python bench.py train    images/s, peak memory and MFU of a training step per --batch_sizes
    python bench.py compare  one forward each: our U-Net, DINOv2 and VAE vs diffusers' and timm's, same weights
    python bench.py all      sample (with compare) and train
    python bench.py memory   peak memory of sampling and training at 512x512, bfloat16, simulated on fake tensors
                             (no GPU, no weights; 386 s on one CPU thread); with --device=cuda also measured

The whole GPU table (every row, torch.compile's too; about 6-8 minutes on an H100, estimated, 50 GB at batch 8):

    python bench.py all --device=cuda --size=512 --steps=40 --guidance=5 --dtype=bfloat16 --batch_sizes=4,8 \\
        --compile --out=bench_gpu.md

On a CPU `all --arch=tiny` (2 DDIM steps, one timed run per measurement, batches 1 and 2 unless given) takes about
40 s on 2 cores; `compare --size=256 --batch=1` compares the real-size networks (32x32 latents) in minutes.
diffusers and timm are test-only dependencies: without them the reference rows are skipped.
"""
import argparse
import gc
import resource
import statistics
import sys
import time
import weakref
from contextlib import nullcontext, suppress
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode
from torch.utils.weak import WeakIdKeyDictionary

import reference
from cli import HelpFormatter, pick_device, pick_dtype, run
from diffusion import Schedule
from dinov2 import PRESETS, DINOv2
from dtc import (TINY_ENCODER, TINY_VAE, DiffuseToChoose, DTCConfig, Frozen, VGGLoss, diffusion_loss,
                 encode_image_tokens, freeze_for, latent_mask, make_hint, prepare, sample_latents, tiny_config)
from vae import LATENT_SCALE, AutoencoderKL, VAEConfig


def flag(s):
    if s.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")
    return s.lower() in ("1", "true", "yes", "on")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("mode", choices=["sample", "train", "compare", "all", "memory"], help="which tables (see above)")
    p.add_argument("--arch", default="sd15", choices=["sd15", "tiny"],
                   help="sd15: SD 1.5 U-Net (9 channels), SD VAE, DINOv2 g/14; tiny: small configs for CPU smoke runs")
    p.add_argument("--size", type=int, help="image side in pixels (default: 512 for sd15, 32 for tiny)")
    p.add_argument("--steps", type=int, help="DDIM steps (default: 40 for sd15, the paper's; 2 for tiny)")
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale (paper: 5)")
    p.add_argument("--batch", type=int, default=1, help="images per sampling batch")
    p.add_argument("--batch_sizes", help="training batch sizes, comma-separated (default: 1,2,4 for sd15, 1,2,4,8 "
                   "for sd15's memory; 1,2 for tiny)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights (+ autocast when not float32); auto: bfloat16 on a GPU that has it, else float32")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA when available")
    p.add_argument("--repeats", type=int, help="timed runs per measurement, the median reported (default: 3 for "
                   "sd15, 1 for tiny)")
    p.add_argument("--peak_tflops", type=float,
                   help="peak for MFU (default on cuda: 989, H100 SXM bf16 dense; on cpu: no MFU)")
    for name, text in [("compile", "add a torch.compile row (the other rows stay eager)"),
                       ("channels_last", "base rows channels_last"),
                       ("offload", "base rows keep DINOv2 on the CPU, visiting the device only to encode"),
                       ("tiled_decode", "base rows decode in tiles")]:
        p.add_argument(f"--{name}", type=flag, nargs="?", const=True, default=False, help=text)
    p.add_argument("--tile", type=int, default=None, help="decode tile in latents (default: 2x2 tiles)")
    p.add_argument("--overlap", type=int, default=None, help="decode tile overlap in latents (default: latent/8)")
    p.add_argument("--seed", type=int, default=0, help="of the random weights and inputs")
    p.add_argument("--out", help="also write the tables to this markdown file; default: none")
    args = p.parse_args(argv)
    # the tiny architecture is a quick look at the tables on a CPU: fewer steps, runs and batch sizes
    tiny = args.arch == "tiny"
    for option, sd15, small in (("size", 512, 32), ("steps", 40, 2), ("repeats", 3, 1),
                                ("batch_sizes", "1,2,4,8" if args.mode == "memory" else "1,2,4", "1,2")):
        if getattr(args, option) is None:
            setattr(args, option, small if tiny else sd15)
    return args


# -----------------------------------------------------------------------------
# random models as a row wants them, and how they are measured


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


def arch(name):
    """(DTCConfig, VAEConfig, DINOv2Config): SD 1.5 with DINOv2 g/14, or the tiny architecture train.py trains."""
    if name == "sd15":
        return DTCConfig(), VAEConfig(), PRESETS["vitg14"]
    # eps prediction, as the diffusers pipelines it is timed against (the cost is the same)
    return replace(tiny_config(TINY_ENCODER.img_size), prediction="eps"), TINY_VAE, TINY_ENCODER


def build(cfgs, device, v):
    """(DTC, Frozen) of variant v, default random init, on `device` ("meta": shapes only, to count FLOPs), in v's
    dtype and memory format, eval mode; with offload DINOv2 lives on the CPU."""
    fmt = torch.channels_last if v.channels_last else torch.contiguous_format
    with torch.device(device):
        model = DiffuseToChoose(replace(cfgs[0], hint=v.hint, hint_input=v.hint_input))
        vae, vit = (m.to(dtype=v.dtype, memory_format=fmt).eval().requires_grad_(False)
                    for m in (AutoencoderKL(cfgs[1]), DINOv2(cfgs[2])))
    return model.to(dtype=v.dtype, memory_format=fmt).eval(), Frozen(vae, vit.to("cpu" if v.offload else device))


def cfg_as_two_forwards(model):
    """model, its forward now running the CFG batch [null; cond] of 2B as two forwards of B (as pipelines without
    batched CFG do), for dtc.sample_latents to run unchanged."""
    forward = model.forward  # the class's, bound to model

    def halves(z_t, t, z_masked, mask_lat, context, hint=None, hint_feats=None):
        out = []
        for i in range(2):  # 0: the null branch, 1: the conditional one
            half = lambda a: None if a is None else a.chunk(2)[i]
            out.append(forward(*map(half, (z_t, t, z_masked, mask_lat, context)), hint=half(hint),
                               hint_feats=None if hint_feats is None else [half(f) for f in hint_feats]))
        return torch.cat(out)

    model.forward = halves  # an instance attribute: nn.Module.__call__ runs it instead of the class's
    return model


def inputs(B, size, device, g):
    """Random source, target and reference images in [-1, 1]; the mask asks to fill the central half."""
    mask = torch.ones(B, 1, size, size)
    mask[:, :, size // 4:3 * size // 4, size // 4:3 * size // 4] = 0  # PBE's masks: 1 = keep
    x = dict(source=torch.rand(B, 3, size, size, generator=g), target=torch.rand(B, 3, size, size, generator=g),
             reference=torch.rand(B, 3, 224, 224, generator=g))
    return {**{k: (v * 2 - 1).to(device) for k, v in x.items()}, "mask": mask.to(device)}


def meta_like(tensors):
    """Shapes only, floats as float32 like the meta replicas (FLOPs do not depend on the dtype)."""
    return {k: torch.empty(v.shape, device="meta", dtype=torch.float32 if v.is_floating_point() else v.dtype)
            for k, v in tensors.items()}


def flops(fn):
    """FLOPs of fn() by FlopCounterMode, run on meta replicas: no compute, and attention counts on every device
    (the CPU's flash SDPA kernel is not in the counter's table)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def timed(fn, device, repeats, warmup=1):
    """(median seconds of fn() over `repeats` runs after `warmup` untimed ones, peak MiB over the timed runs)."""
    cuda = device.type == "cuda"
    for _ in range(warmup):  # allocator, cuDNN autotuning, compilation
        fn()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:  # Linux: writing 5 to clear_refs resets the process peak RSS (ru_maxrss, KiB) to the current RSS
        with suppress(OSError), open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(device)  # CUDA runs asynchronously: wait for it before reading the clock
        times.append(time.perf_counter() - t0)
    if cuda:
        return statistics.median(times), torch.cuda.max_memory_allocated(device) / 2 ** 20
    return statistics.median(times), (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) / 1024


def timed_image(work, image, device, repeats):
    """dict(times, seconds, mib): each component of work (name -> (callable, runs per image)) timed alone, times its
    runs: seconds per image batch; then image() end to end: median seconds and peak MiB."""
    times = {name: n * timed(fn, device, repeats)[0] for name, (fn, n) in work.items()}
    seconds, mib = timed(image, device, repeats)
    return dict(times=times, seconds=seconds, mib=mib)


MEMORY_NOTE = dict(
    cuda="peak MiB: torch.cuda.max_memory_allocated over the timed runs (every live tensor, weights included)",
    cpu="peak MiB: CPU process peak-RSS growth over the timed runs (resource.getrusage ru_maxrss, reset before each "
        "measurement through /proc/self/clear_refs, else a lifetime peak); weights already resident are not counted")


def measure(row, fn, compile_notes=None):
    """row with fn()'s numbers, or error "OOM"; with compile_notes (a compile row) other failures: noted, "skipped"."""
    try:
        return dict(row, **fn())
    except torch.cuda.OutOfMemoryError:
        return dict(row, error="OOM")
    except Exception as e:
        if compile_notes is None:
            raise
        compile_notes.append(f"torch.compile failed, row skipped: {str(e).strip().splitlines()[0][:200]}")
        return dict(row, error="skipped")


def autocast(device, dtype):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def step_inputs(module, run):
    """(args, kwargs) of module's first call in run(): one step's inputs as the sampling loop builds them."""
    calls = []
    hook = module.register_forward_pre_hook(lambda _, a, kw: calls.append((a, kw)), with_kwargs=True)
    run()
    hook.remove()
    return calls[0]


# -----------------------------------------------------------------------------
# sampling: one row per switch


def on(flag):
    return "on" if flag else "off"


def precision(dtype):
    return "float32 weights" if dtype == torch.float32 else f"{str(dtype)[6:]} weights + autocast"


def sample_variants(args, base):
    rows = [("DTC (base)", base)]
    if args.guidance != 1.0:  # (without guidance there is no CFG batch)
        rows.append(("CFG as two forwards", replace(base, batched_cfg=False)))
    other = torch.bfloat16 if base.dtype == torch.float32 else torch.float32
    rows += [("latent_only hint features", replace(base, hint_input="latent_only")),
             ("no hint branch (PBE-like)", replace(base, hint=False)),
             ("math SDPA backend", replace(base, math_sdpa=True)), (precision(other), replace(base, dtype=other)),
             (f"channels_last {on(not base.channels_last)}", replace(base, channels_last=not base.channels_last)),
             (f"DINOv2 offload {on(not base.offload)}", replace(base, offload=not base.offload)),
             (f"tiled VAE decode {on(not base.tiled_decode)}", replace(base, tiled_decode=not base.tiled_decode))]
    if args.compile:
        rows.append(("torch.compile", replace(base, compile=True)))
    return rows


def offloaded(fn, frozen, v, device):
    """fn() with DINOv2 on the device (with offload it visits from the CPU for fn only)."""
    if v.offload:
        frozen.image_encoder.to(device)
    out = fn()
    if v.offload:
        frozen.image_encoder.cpu()
    return out


def decode(vae, z, v, args):
    return vae.decode_tiled(z, args.tile, args.overlap) if v.tiled_decode else vae.decode(z)


def components(model, frozen, x, cond, v, args):
    """One image batch's model work as the table splits it: name -> (callable, runs per image). U-Net and hint encoder
    get a step's inputs from dtc.sample_latents (CFG batch [null; cond] of 2B), in one forward or, unbatched, two."""
    once, n = model.cfg.hint_input == "latent_only", 1 if v.batched_cfg else 2
    (z_t, t, z_masked, mask_lat, ctx), kw = step_inputs(
        model, lambda: sample_latents(model, Schedule(), cond, 1, args.guidance, progress=False))

    def hint_enc():  # "full": every step (it reads z_t, t and the context); "latent_only": once per image
        if once:
            return model.hint_features(model.hint_latent(cond["z_masked"], cond["hint"]))
        return [model.hint_features(model.hint_latent(zm, h), *rest)  # per forward: 13 taps of (2B/n, C, h, w)
                for zm, h, *rest in zip(*(a.chunk(n) for a in (z_masked, kw["hint"], z_t, t, mask_lat, ctx)))]

    feats = None  # the U-Net step's hint features: 13 taps of (2B, C, h, w)
    if model.cfg.hint:
        feats = kw["hint_feats"] if once else [torch.cat(f) for f in zip(*hint_enc())]
    tokens = lambda: encode_image_tokens(frozen.image_encoder, x["reference"], model.cfg.image_size)
    work = {"DINOv2": (lambda: offloaded(tokens, frozen, v, x["source"].device), 1),
            "VAE enc": (lambda: frozen.vae.encode(x["source"] * x["mask"]).sample(), 1),
            "canvas": (lambda: make_hint(x["reference"], x["mask"]), 1),
            "hint enc": (hint_enc, 1 if once else args.steps),
            "U-Net step": (lambda: model(z_t, t, z_masked, mask_lat, ctx, hint_feats=feats), args.steps),
            "VAE dec": (lambda: decode(frozen.vae, cond["z_masked"] / LATENT_SCALE, v, args), 1)}
    if not model.cfg.hint:
        del work["hint enc"]
    return work


def image_flops(cfgs, v, x, cond, args, counted):
    """TFLOP of one image batch: its components (the canvas, Python, has none) on meta replicas, each times its
    runs. Only the hint branch, its input and tiled decoding change the count, so rows share one count per
    setting in `counted` (counting on meta takes longer than timing a tiny row)."""
    key = (v.hint, v.hint_input, v.tiled_decode)
    if key not in counted:
        v = Variant(hint=v.hint, hint_input=v.hint_input, tiled_decode=v.tiled_decode)  # float32, as meta_like's
        work = components(*build(cfgs, "meta", v), meta_like(x), meta_like(cond), v, args)
        counted[key] = sum(n * flops(fn) for name, (fn, n) in work.items() if name != "canvas") / 1e12
    return counted[key]


def sample_row(cfgs, v, x, args, device, counted):
    """One row: per-component seconds (none for a compiled row), seconds per batch end to end, peak MiB, TFLOP."""
    gc.collect()  # the last row's models are gone before this row's are built (cfg_as_two_forwards' is a cycle)
    model, frozen = build(cfgs, device, v)
    runner = torch.compile(model) if v.compile else model if v.batched_cfg else cfg_as_two_forwards(model)
    x = {k: t.contiguous(memory_format=torch.channels_last) for k, t in x.items()} if v.channels_last else x

    def conditioning():  # dtc.prepare: DINOv2 tokens, masked-image latents and the hint canvas, once per image
        return offloaded(lambda: prepare(frozen, x["source"], x["mask"], x["reference"], model.cfg.image_size),
                         frozen, v, device)

    def image():  # what dtc.generate does, with the row's switches
        z = sample_latents(runner, Schedule(), conditioning(), args.steps, args.guidance, progress=False)
        return decode(frozen.vae, z / LATENT_SCALE, v, args)

    with torch.no_grad(), autocast(device, v.dtype), sdpa_kernel(SDPBackend.MATH) if v.math_sdpa else nullcontext():
        cond = conditioning()
        # a compiled row reports end to end only (each component's call signature would compile anew)
        work = {} if v.compile else components(runner, frozen, x, cond, v, args)
        row = timed_image(work, image, device, args.repeats)  # (the warm-up run compiles)
    if v.compile:
        torch._dynamo.reset()
    return dict(row, tflop=image_flops(cfgs, v, x, cond, args, counted))


# -----------------------------------------------------------------------------
# the references: diffusers' U-Net, VAE and DDIM, timm's DINOv2, holding our random weights


def references(model, frozen, notes):
    """dict(unet, vae, dino, null, proj): diffusers' and timm's twins holding our very tensors (reference.py), and the
    two DTC tensors a PBE-like loop needs (the null context; image tokens -> context); None without diffusers, dino
    None without timm."""
    try:
        refs = dict(unet=reference.unet_as_diffusers(model.unet), vae=reference.vae_as_diffusers(frozen.vae),
                    dino=None, null=model.null_context.detach(),
                    proj=(model.token_proj.weight.detach(), model.token_proj.bias.detach()))
    except ImportError:
        notes.append("diffusers not installed: skipping the reference rows")
        return None
    vit, size = frozen.image_encoder, model.cfg.image_size
    grid = size // vit.cfg.patch_size  # timm at the benchmark's size, pos_embed resampled by our rule (dinov2.py)
    try:
        refs["dino"] = reference.dinov2_as_timm(
            dict(vit.state_dict(), pos_embed=vit.resized_pos_embed(grid, grid).detach()), vit.cfg, size)
    except ImportError:
        notes.append("timm not installed: skipping the DINOv2 reference row; diffusers' loop uses our DINOv2")
    return refs


def diffusers_row(refs, frozen, x, cond, args, device):
    """A Paint-by-Example-like loop in diffusers as PaintByExamplePipeline runs it (image tokens, VAE encode, SD's
    DDIMScheduler with batched CFG, VAE decode), timed as sample_row times ours."""
    from diffusers import DDIMScheduler
    dino = frozen.image_encoder if refs["dino"] is None else refs["dino"]
    vae, unet, guided = refs["vae"], refs["unet"], args.guidance != 1.0

    def image(steps):
        ctx = F.linear(encode_image_tokens(dino, x["reference"], args.image_size), *refs["proj"])
        z_masked = vae.encode(x["source"] * x["mask"]).latent_dist.sample() * LATENT_SCALE
        ctx, mask_lat = ctx.to(z_masked.dtype), latent_mask(x["mask"], z_masked.shape[-2:]).to(z_masked.dtype)
        scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                  beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                                  steps_offset=1, timestep_spacing="leading", prediction_type="epsilon")
        scheduler.set_timesteps(steps)
        z = torch.randn_like(z_masked)
        if guided:  # the CFG batch [null; cond] of 2B
            ctx = torch.cat([refs["null"].to(ctx).expand_as(ctx), ctx])
            z_masked, mask_lat = torch.cat([z_masked] * 2), torch.cat([mask_lat] * 2)
        for t in scheduler.timesteps:
            zz = torch.cat([z] * 2) if guided else z
            eps = unet(torch.cat([zz, z_masked, mask_lat], 1), t, encoder_hidden_states=ctx).sample
            if guided:
                eps_null, eps_cond = eps.chunk(2)
                eps = eps_null + args.guidance * (eps_cond - eps_null)
            z = scheduler.step(eps, t, z).prev_sample
        return vae.decode(z / LATENT_SCALE).sample

    a, kw = step_inputs(unet, lambda: image(1))
    work = {"DINOv2": (lambda: encode_image_tokens(dino, x["reference"], args.image_size), 1),
            "VAE enc": (lambda: vae.encode(x["source"] * x["mask"]).latent_dist.sample(), 1),
            "U-Net step": (lambda: unet(*a, **kw).sample, args.steps),
            "VAE dec": (lambda: vae.decode(cond["z_masked"] / LATENT_SCALE).sample, 1)}
    return timed_image(work, lambda: image(args.steps), device, args.repeats)


def compare_rows(model, frozen, refs, x, cond, args):
    """One forward each, ours and the reference's, on the same inputs: [module, input, ours s, theirs s, lib]."""
    device, B = x["source"].device, x["source"].shape[0]
    unet_in = model.unet_input(torch.randn_like(cond["z_masked"]), cond["z_masked"], cond["mask_lat"])
    ctx = model.context(cond["tokens"].to(unet_in.dtype))
    t = torch.full((B,), 500, device=device, dtype=torch.long)
    image = F.interpolate(x["reference"], size=(args.image_size,) * 2).to(unet_in.dtype)
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
    for name, shape, ours, theirs, lib in [p for p in pairs if p[3] is not None]:
        print(f"  {name}: ours vs {lib}", file=sys.stderr, flush=True)
        ours(), theirs()  # warm-up; then alternate, so a change in machine load hits both sides alike
        times = [(timed(ours, device, 1, warmup=0)[0], timed(theirs, device, 1, warmup=0)[0])
                 for _ in range(args.repeats)]
        rows.append([name, shape, statistics.median(a for a, _ in times), statistics.median(b for _, b in times), lib])
    return rows


# -----------------------------------------------------------------------------
# the sections


def fmt(x, digits=4):
    return "—" if x is None else f"{x:.{digits}g}"


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


COMPONENTS = ["DINOv2", "VAE enc", "canvas", "hint enc", "U-Net step", "VAE dec"]
SAMPLE_HEADER = ["variant", "DINOv2 ms", "VAE enc ms", "canvas ms", "hint enc ms/image", "U-Net ms/step", "VAE dec ms",
                 "s/image", "peak MiB", "TFLOP/s"]
COMPARE_HEADER = ["module", "input", "ours ms", "reference ms", "ours / reference", "reference"]
TRAIN_HEADER = ["batch", "variant", "s/step", "images/s", "canvas ms/step", "peak MiB", "TFLOP/s", "MFU"]


def sample_cells(r, args):
    """A sampling table row of a row's numbers: component ms per batch (a component's times are per image: the
    U-Net's cell divides its steps out), s/image, peak MiB, TFLOP/s; or the row's error in every cell."""
    if "error" in r:
        return [r["label"]] + [r["error"]] * (len(SAMPLE_HEADER) - 1)
    ms = lambda c: r["times"][c] * 1e3 / (args.steps if c == "U-Net step" else 1)
    return [r["label"], *(fmt(ms(c)) if c in r["times"] else "—" for c in COMPONENTS), fmt(r["seconds"] / args.batch),
            fmt(r["mib"], 5), fmt(r["tflop"] / r["seconds"])]


def sample_section(args, device, base, compare_only=False):
    cfgs, notes, results, counted = arch(args.arch), [], [], {}
    x = inputs(args.batch, args.size, device, torch.Generator().manual_seed(args.seed))
    for label, v in [] if compare_only else sample_variants(args, base):
        print(f"sample: {label}", file=sys.stderr, flush=True)
        if v.compile and device.type == "cpu":
            notes.append("torch.compile row skipped on the CPU: inductor's C++/OpenMP kernels made every later eager "
                         "call ~100x slower on a 2-core machine (measured), spoiling later rows; measure it on CUDA")
            results.append(dict(label=label, error="skipped"))
        else:
            results.append(measure(dict(label=label), lambda: sample_row(cfgs, v, x, args, device, counted),
                                   notes if v.compile else None))
    pbe = replace(base, hint=False, offload=False)  # ours as the diffusers loop is, sharing tensors with it
    model, frozen = build(cfgs, device, pbe)
    refs, compare = references(model, frozen, notes), []
    if refs is not None:
        with torch.no_grad(), autocast(device, base.dtype):
            cond = prepare(frozen, x["source"], x["mask"], x["reference"], model.cfg.image_size)
            compare = compare_rows(model, frozen, refs, x, cond, args)
            if not compare_only:
                print("sample: diffusers PBE-like loop", file=sys.stderr, flush=True)
                ref = measure(dict(label="diffusers PBE-like loop (reference)",  # credited our same arch's FLOPs
                                   tflop=image_flops(cfgs, pbe, x, cond, args, counted)),
                              lambda: diffusers_row(refs, frozen, x, cond, args, device))
                mine = next(r for r in results if r["label"] == "no hint branch (PBE-like)")
                if "error" not in ref and "error" not in mine:
                    compare.append(["sampling, s/image", f"{args.steps} steps, guidance {args.guidance:g}, no hint "
                                    "branch vs diffusers", mine["seconds"] / args.batch, ref["seconds"] / args.batch,
                                    "diffusers"])
                results.append(ref)
    out = []
    if not compare_only:
        rows = [sample_cells(r, args) for r in results]
        lines = [f"base = batched CFG, hint input 'full', default SDPA backends, {precision(base.dtype)}, "
                 f"channels_last {on(base.channels_last)}, DINOv2 offload {on(base.offload)}, tiled decode "
                 f"{on(base.tiled_decode)} (tile {args.tile}, overlap {args.overlap} latents); every other row flips "
                 "one switch.",
                 "Component times: batch medians, timed alone as the row runs them (hint enc: every step with 'full', "
                 "once per image with latent_only, summed; U-Net step: one step of U-Net + FiLM, both CFG branches; "
                 "canvas: make_hint, Python on the CPU). s/image: prepare + sampling + decode, / batch.",
                 "TFLOP/s: FLOPs per batch (FlopCounterMode on meta replicas) / end-to-end seconds; diffusers' loop "
                 "is credited the FLOPs of our same-architecture 'no hint branch' row.", f"{MEMORY_NOTE[device.type]}."]
        b = results[0]
        if "error" not in b:
            once = sum(b["times"][c] for c in ("DINOv2", "VAE enc", "canvas"))
            lines.append(f"base: {b['tflop']:.4g} TFLOP per batch; DINOv2 tokens, VAE latents and hint canvas, once "
                         f"per image (prepare(), DTC's design): {once * 1e3:.4g} ms, {100 * once / b['seconds']:.2g}% "
                         "of the row's time (DINOv2 never runs per step).")
        out.append(f"## Sampling: {args.size}x{args.size}, {args.steps} DDIM steps, guidance {args.guidance:g}, "
                   f"batch {args.batch}\n\n{table(SAMPLE_HEADER, rows)}\n\n"
                   + "\n".join(f"- {n}" for n in lines + notes))
    if compare:
        rows = [[name, shape, fmt(a * 1e3), fmt(b * 1e3), f"{a / b:.3g}", lib] for name, shape, a, b, lib in compare]
        out.append(f"## Ours vs the reference implementations (same weights, {str(base.dtype)[6:]})\n\n"
                   f"{table(COMPARE_HEADER, rows)}\n\n- Medians of alternating timed runs (ours, reference, ours, "
                   "...); the sampling row is in ms per image. Goal: ours / reference <= 1.")
    elif compare_only and notes:
        out.append("\n".join(f"- {n}" for n in notes))
    return out


def training_step(model, frozen, vgg, opt, x, device, dtype, hint=None):
    """One optimizer step as train.py's loop takes it: prepare() without gradients, float32 conditioning, the Eq. 1
    loss with 20 % guidance dropout and, with vgg, 1e-3 x the VGG loss on the decoded x0 estimate (through the
    frozen decoder), backward, gradient clipping at 1, opt's step. hint: the canvas, else hint_image's."""
    schedule = Schedule()
    with autocast(device, dtype):
        cond = prepare(frozen, x["source"], x["mask"], x["reference"], model.cfg.image_size, target=x["target"],
                       hint=hint)
        cond = {k: v.float() for k, v in cond.items()}
        drop = torch.rand(len(x["source"]), device=device) < 0.2
        loss, eps, z_t, t = diffusion_loss(model, schedule, cond, drop=drop)
        if vgg is not None:
            x0 = schedule.predict_x0(z_t, eps, t)
            loss = loss + 1e-3 * vgg(frozen.vae.decode(x0 / LATENT_SCALE), x["target"])
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def train_section(args, device, base):
    """Per batch size, a training step as train.py runs it: base, with gradient checkpointing, (CUDA) AdamW foreach."""
    cfgs, schedule, cuda = arch(args.arch), Schedule(), device.type == "cuda"
    model, frozen = build(cfgs, device, Variant(dtype=base.dtype))
    model.float().train()  # fp32 master weights (autocast computes in base.dtype); the frozen parts stay in it
    meta_model, meta_frozen = build(cfgs, "meta", Variant())
    peak = args.peak_tflops or (989.0 if cuda else None)
    # (label, gradient checkpointing, fused AdamW): fused on CUDA, as train.py; on CUDA also the foreach AdamW
    variants = [("base", False, cuda), ("grad checkpointing", True, cuda)]
    variants += [("AdamW foreach (not fused)", False, False)] if cuda else []
    rows = []
    for B in [int(b) for b in args.batch_sizes.split(",")]:
        x = inputs(B, args.size, device, torch.Generator().manual_seed(args.seed))
        canvas = timed(lambda: make_hint(x["reference"], x["mask"]), device, args.repeats)[0]
        mx, mc = meta_like(x), meta_like(prepare(frozen, x["source"], x["mask"], x["reference"], model.cfg.image_size,
                                                 target=x["target"]))

        def meta_step():  # model FLOPs of a step (no recomputation): the frozen encoders, the DTC forward and backward
            encode_image_tokens(meta_frozen.image_encoder, mx["reference"], model.cfg.image_size)
            meta_frozen.vae.encode(mx["source"] * mx["mask"]).sample(), meta_frozen.vae.encode(mx["target"]).sample()
            diffusion_loss(meta_model.train(), schedule, mc)[0].backward()

        step_tflop = flops(meta_step) / 1e12
        for label, checkpointing, fused in variants:
            print(f"train: batch {B}, {label}", file=sys.stderr, flush=True)
            model.unet.grad_checkpointing = model.hint_encoder.grad_checkpointing = checkpointing
            opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=fused)

            step = lambda: training_step(model, frozen, None, opt, x, device, base.dtype)
            # the warm-up step creates AdamW's state and autotunes cuDNN
            r = measure({}, lambda: dict(zip(("seconds", "mib"), timed(step, device, args.repeats))))
            tflops = None if "error" in r else step_tflop / r["seconds"]
            rows.append([B, label] + (["OOM"] * 6 if "error" in r else
                                      [fmt(r["seconds"]), fmt(B / r["seconds"]), fmt(canvas * 1e3), fmt(r["mib"], 5),
                                       fmt(tflops), f"{100 * tflops / peak:.3g}%" if peak else "n/a"]))
            model.zero_grad(set_to_none=True)
    weights = f"{str(base.dtype)[6:]} autocast over fp32 master weights" if base.dtype != torch.float32 else "float32"
    return [f"## Training: {args.size}x{args.size}, {weights}\n\n{table(TRAIN_HEADER, rows)}\n\n"
            "- One step: training_step without the VGG loss (prepare() under no_grad: frozen VAE encodes of target and "
            "masked source, DINOv2 tokens, hint canvas; the DTC forward and backward), AdamW (fused on CUDA).\n"
            + (f"- MFU against {peak:g} TFLOP/s (--peak_tflops; default on cuda: H100 SXM bf16 dense)" if peak else
               "- MFU n/a on a CPU unless --peak_tflops is given") + f"; FLOPs per step ({fmt(step_tflop)} TFLOP at "
            "the last batch size) by FlopCounterMode on meta replicas (model FLOPs, no recomputation).\n"
            "- canvas: make_hint's Python largest-rectangle search for the batch, part of each step.\n"
            f"- {MEMORY_NOTE[device.type]}; includes AdamW state."]


# -----------------------------------------------------------------------------
# memory: the peak of each row, simulated on fake tensors and, on a GPU, measured

SAMPLE_BATCHES = (1, 4)
GiB = 2 ** 30


class PeakMemory(TorchDispatchMode):
    """The peak bytes of tensor storage alive while it is active: each storage that an operation makes (fake ones
    too: a size, no bytes) or that `held` holds at the start, counted once at its size and uncounted when it is
    freed. What PyTorch's MemTracker counts, without its per-module bookkeeping, which fails on this model (it hooks
    every parameter of a module it meets, and frozen ones take no hooks; its ModTracker asserts on a parameter's
    view made under no_grad, as the null context's) and took 12x the time of an SD U-Net step (measured; on that
    step both count 13.05 GiB)."""

    def __init__(self, held=()):
        super().__init__()
        self.live = WeakIdKeyDictionary()  # storage -> bytes, forgotten with the storage
        self.now = self.peak = 0
        for t in held:
            self.count(t)

    def count(self, t):
        storage = t.untyped_storage()
        if storage not in self.live:
            self.live[storage] = n = storage.nbytes()
            weakref.finalize(storage, self.free, n)
            self.now += n
            self.peak = max(self.peak, self.now)

    def free(self, n):
        self.now -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.count(t)
        return out


def tensors_of(things):
    """The tensors of modules (parameters, their gradients, buffers), optimizers (their state) and tensors."""
    for x in things:
        if isinstance(x, torch.nn.Module):
            yield from x.buffers()
            for p in x.parameters():
                yield from (p,) if p.grad is None else (p, p.grad)
        elif isinstance(x, torch.optim.Optimizer):
            yield from (v for state in x.state.values() for v in state.values() if isinstance(v, torch.Tensor))
        else:
            yield x


def fake_tensors(on):
    """The context a simulated row runs in: FakeTensorMode, whose tensors have shapes, dtypes and a device but no
    storage. (Modules are built on meta before it: inside it they cannot change dtype.)"""
    return FakeTensorMode(allow_non_fake_inputs=True) if on else nullcontext()


def placed(modules, device):
    """Modules built on meta, given storage on `device` but no values: memory is measured here, not results."""
    for m in modules:
        m.to_empty(device=device)


def peak_bytes(phases, device):
    """The peak over phases [(fn, resident), ...] run in order, resident() listing what a phase finds on the device
    (modules, optimizers, tensors). On a GPU torch.cuda.max_memory_allocated (every tensor on it); elsewhere a fresh
    PeakMemory per phase, counting what the phase finds and what it makes (fake tensors included)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        for fn, _ in phases:
            fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    peak = 0
    for fn, resident in phases:
        with PeakMemory(tensors_of(resident())) as tracker:
            fn()
        peak = max(peak, tracker.peak)
    return peak


def row_inputs(B, size, device, seed):
    """inputs() and a hint canvas of the same shape as make_hint's (which searches the mask's values, and fake
    tensors have none)."""
    return inputs(B, size, device, torch.Generator().manual_seed(seed)), torch.rand(B, 3, size, size, device=device)


def sample_peak(cfgs, B, hint_input, offload, args, device, fake):
    """Peak bytes of sampling one image batch as dtc.generate does, bfloat16 weights and autocast: prepare() with
    DINOv2 on the device; then, DINOv2 moved off with offload, the guided DDIM steps and the VAE decode. One step
    stands for all of them: a step frees what it makes, so each has the same peak. fake: on fake tensors."""
    model, frozen = build(cfgs, "meta", Variant(hint_input=hint_input, dtype=torch.bfloat16))
    with fake_tensors(fake):
        placed([model, frozen.vae, frozen.image_encoder], device)
        x, canvas = row_inputs(B, args.size, device, args.seed)
        cond = {}

        def conditioning():
            with torch.no_grad(), autocast(device, torch.bfloat16):
                cond.update(prepare(frozen, x["source"], x["mask"], x["reference"], model.cfg.image_size,
                                    hint=canvas))
            if offload and device.type == "cuda":  # (a tracker counts what a phase finds: unlisted is off the device)
                frozen.image_encoder.cpu()

        def denoise():
            with torch.no_grad(), autocast(device, torch.bfloat16):
                z = sample_latents(model, Schedule(), cond, 1, args.guidance, progress=False)
                frozen.vae.decode(z / LATENT_SCALE)

        resident = [model, frozen.vae, *x.values(), canvas]
        return peak_bytes([(conditioning, lambda: resident + [frozen.image_encoder]),
                           (denoise, lambda: resident + list(cond.values()) + ([] if offload else
                                                                               [frozen.image_encoder]))], device)


def train_peak(cfgs, B, checkpointing, train, args, device, fake):
    """dict(peak, trained, frozen): peak bytes of a training step from the second on (AdamW's state exists) as
    train.py takes it on a GPU, the parameters it trains and the bytes of the frozen ones. float32 weights under
    bfloat16 autocast, the VAE and DINOv2 in bfloat16, fused AdamW, the VGG loss through the decoder. fake: on fake
    tensors."""
    model, frozen = build(cfgs, "meta", Variant(dtype=torch.bfloat16))
    model = freeze_for(model.float().train(), train)
    with torch.device("meta"):
        vgg = VGGLoss()
    modules = [model, frozen.vae, frozen.image_encoder, vgg]
    with fake_tensors(fake):
        placed(modules, device)
        model.unet.grad_checkpointing = model.hint_encoder.grad_checkpointing = checkpointing
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
        for p in params:  # a step on zero gradients makes AdamW's state: what every step after the first finds
            p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)
        x, canvas = row_inputs(B, args.size, device, args.seed)
        peak = peak_bytes([(lambda: training_step(model, frozen, vgg, opt, x, device, torch.bfloat16, canvas),
                            lambda: [*modules, opt, *x.values(), canvas])], device)
    return dict(peak=peak, trained=sum(p.numel() for p in params),
                frozen=sum(p.numel() * p.element_size() for m in modules for p in m.parameters() if not p.requires_grad))


def simulated_and_measured(peak, device):
    """(peak(cpu, fake=True), peak(device, fake=False) measured on a GPU or None); peak returns bytes or a dict."""
    simulated, measured = peak(torch.device("cpu"), True), None
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        try:
            measured = peak(device, False)
        except torch.cuda.OutOfMemoryError:
            measured = "OOM"
    return simulated, measured


def gib(b):
    return "—" if b is None else b if isinstance(b, str) else f"{b / GiB:.4g}"


MEMORY_SAMPLE_HEADER = ["batch", "hint features", "DINOv2 after encoding", "simulated GiB", "measured GiB"]
MEMORY_TRAIN_HEADER = ["trained", "batch", "grad checkpointing", "floor GiB", "simulated GiB",
                       "DDP per process GiB", "measured GiB"]


def memory_section(args, device):
    """The sampling and training tables and the key=value line of their peaks, in GiB."""
    cfgs, start, keys = arch(args.arch), time.perf_counter(), {}
    sample_rows = []
    for B in SAMPLE_BATCHES:
        for hint_input in ("full", "latent_only"):
            for offload in (False, True):
                print(f"memory: sampling, batch {B}, {hint_input}, offload {on(offload)}", file=sys.stderr, flush=True)
                sim, real = simulated_and_measured(
                    lambda d, fake: sample_peak(cfgs, B, hint_input, offload, args, d, fake), device)
                keys[f"sample_b{B}" + "_latent_only" * (hint_input == "latent_only") + "_offload" * offload] = sim
                sample_rows.append([B, "once per image (latent_only)" if hint_input == "latent_only" else
                                    "every step (full)", "moved off" if offload else "kept", gib(sim), gib(real)])
    train_rows = []
    for train, key in (("all", "train"), ("hint", "onegpu")):
        for B in [int(b) for b in args.batch_sizes.split(",")]:
            for checkpointing in (False, True):
                print(f"memory: training {train}, batch {B}, checkpointing {on(checkpointing)}", file=sys.stderr,
                      flush=True)
                sim, real = simulated_and_measured(
                    lambda d, fake: train_peak(cfgs, B, checkpointing, train, args, d, fake), device)
                keys[f"{key}_b{B}" + "_ckpt" * checkpointing] = sim["peak"]
                floor = 16 * sim["trained"] + sim["frozen"]
                train_rows.append([f"{train} ({sim['trained'] / 1e6:.0f} M)", B, on(checkpointing), gib(floor),
                                   gib(sim["peak"]), gib(sim["peak"] + 4 * sim["trained"]),
                                   gib(real if real is None or isinstance(real, str) else real["peak"])])
    seconds = time.perf_counter() - start
    return [f"## Memory: peak per row, {args.size}x{args.size}, bfloat16\n\n"
            f"### Sampling: {args.steps} DDIM steps, guidance {args.guidance:g}, bfloat16 weights\n\n"
            f"{table(MEMORY_SAMPLE_HEADER, sample_rows)}\n\n"
            "### Training: float32 weights, bfloat16 autocast, fused AdamW, VGG loss, frozen VAE and DINOv2 in "
            f"bfloat16\n\n{table(MEMORY_TRAIN_HEADER, train_rows)}\n\n"
            "- simulated: FakeTensorMode tensors on the CPU (shapes and dtypes, no storage: no GPU, no weights), every "
            "storage alive counted at its exact size (PeakMemory, MemTracker's accounting); measured: "
            "torch.cuda.max_memory_allocated on a GPU (--device=cuda), the same rows on real tensors.\n"
            "- Sampling: dtc.generate's work (prepare, the guided DDIM steps, the VAE decode); one DDIM step "
            "simulated, as each step frees what it makes (the peak of 1 step is the peak of 40).\n"
            "- Training: a step from the second on (AdamW's state made by a step on zero gradients), train.py's on a "
            "GPU. trained all: the paper's; hint: `--train=hint`, the main U-Net frozen (dtc.freeze_for). floor: "
            "16 bytes per trained parameter (float32 weight, gradient, AdamW's two moments) + the frozen weights. "
            "DDP per process: + one float32 copy of the trained gradients (DDP's gradient buckets).\n"
            f"- {seconds:.0f} s on {torch.get_num_threads()} CPU thread(s), torch {torch.__version__}.",
            " ".join(f"{k}={gib(v)}" for k, v in keys.items())]


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(pick_device(args.device))
    cuda, cfg = device.type == "cuda", arch(args.arch)[0]
    dtype = torch.bfloat16 if args.mode == "memory" else pick_dtype(args.dtype, device.type)
    args.image_size, latent = cfg.image_size, args.size // cfg.vae_factor
    args.overlap = args.overlap if args.overlap is not None else max(1, latent // 8)
    args.tile = args.tile or (latent + args.overlap + 1) // 2  # two tiles per side
    torch.manual_seed(args.seed)
    if cuda:
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest convolutions
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # for float32 rows
    base = Variant(dtype=dtype, channels_last=args.channels_last, offload=args.offload, tiled_decode=args.tiled_decode)
    where = f"{torch.cuda.get_device_name(device)} (TF32 on for float32)" if cuda else \
        f"CPU, {torch.get_num_threads()} threads"
    command = " ".join(sys.argv[1:] if argv is None else argv)
    sections = [f"# DTC benchmark: {args.mode}, arch {args.arch}, {where}, torch {torch.__version__}, "
                f"{str(dtype)[6:]}, random weights\n\n`python bench.py {command}`"]
    print(sections[0] + "\n", flush=True)
    summary = None  # memory: the key=value line, printed last
    for part in ["sample", "train"] if args.mode == "all" else [args.mode]:
        if part == "memory":
            *new, summary = memory_section(args, device)
        else:
            new = train_section(args, device, base) if part == "train" else \
                sample_section(args, device, base, compare_only=part == "compare")
        for s in new:
            print(s + "\n", flush=True)
        sections += new
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n\n".join(sections) + "\n")
        print(f"written: {args.out}")
    if summary:
        print(summary)


if __name__ == "__main__":
    sys.exit(run(main))
