"""
Speed and memory of Diffuse to Choose with random weights of the real architecture (no downloads), as markdown tables.

    python bench.py sample   s/image, ms per DDIM step, peak memory and achieved TFLOP/s of sampling
    python bench.py train    images/s, peak memory and MFU of a training step per batch size, without and with
                             gradient checkpointing
    python bench.py compare  one forward each: our U-Net, DINOv2 and VAE vs diffusers' and timm's, same weights
    python bench.py all      sample, compare and train
    python bench.py memory   peak memory of sampling and training at 512x512, bfloat16, simulated on fake tensors
                             (no GPU, no weights; 200-390 s on one CPU thread); with --device=cuda also measured

A run measures one setting: to see what an option buys (--dtype, --channels_last, --compile), compare two runs.
The GPU tables:

    python bench.py all --device=cuda --size=512 --steps=40 --guidance=5 --dtype=bfloat16 --batch_sizes=4,8 \\
        --compile --out=bench_gpu.md

On a CPU `all --arch=tiny` (2 DDIM steps, one timed run per measurement, batches 1 and 2 unless given) takes about
30 s on one thread; `compare --size=256 --batch=1` compares the real-size networks (32x32 latents) in minutes.
diffusers and timm are test-only dependencies: without them the compare table is skipped.
"""
import argparse
import gc
import resource
import statistics
import sys
import time
import weakref
from contextlib import nullcontext, suppress
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode
from torch.utils.weak import WeakIdKeyDictionary

import reference
from cli import HelpFormatter, pick_device, pick_dtype, run
from data import DataError
from diffusion import Schedule
from dinov2 import PRESETS, DINOv2
from dtc import (TINY_ENCODER, TINY_VAE, DiffuseToChoose, DTCConfig, Frozen, VGGLoss, diffusion_loss, freeze_for,
                 generate, prepare, sample_latents, tiny_config)
from vae import LATENT_SCALE, AutoencoderKL, VAEConfig


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
    p.add_argument("--channels_last", action="store_true", help="sample with models and images in channels_last")
    p.add_argument("--compile", action="store_true", help="sample with the DTC forward torch.compile'd (CUDA only)")
    p.add_argument("--seed", type=int, default=0, help="of the random weights and inputs")
    p.add_argument("--out", help="also write the tables to this markdown file; default: none")
    args = p.parse_args(argv)
    # the tiny architecture is a quick look at the tables on a CPU: fewer steps, runs and batch sizes
    for option, sd15, tiny in (("size", 512, 32), ("steps", 40, 2), ("repeats", 3, 1),
                               ("batch_sizes", "1,2,4,8" if args.mode == "memory" else "1,2,4", "1,2")):
        if getattr(args, option) is None:
            setattr(args, option, tiny if args.arch == "tiny" else sd15)
    return args


# -----------------------------------------------------------------------------
# random models and inputs, and how they are measured


def arch(name):
    """(DTCConfig, VAEConfig, DINOv2Config): SD 1.5 with DINOv2 g/14, or the tiny architecture train.py trains."""
    if name == "sd15":
        return DTCConfig(), VAEConfig(), PRESETS["vitg14"]
    # eps prediction, as the diffusers models it is compared with (the cost is the same)
    return replace(tiny_config(TINY_ENCODER.img_size), prediction="eps"), TINY_VAE, TINY_ENCODER


def build(cfgs, device, dtype=torch.float32, hint_input="full"):
    """(DTC, Frozen), default random init, on `device` ("meta": shapes only, to count FLOPs or to place later), in
    `dtype` and eval mode; the VAE and DINOv2 without gradients."""
    with torch.device(device):
        model = DiffuseToChoose(replace(cfgs[0], hint_input=hint_input))
        vae, vit = (m.to(dtype).eval().requires_grad_(False) for m in (AutoencoderKL(cfgs[1]), DINOv2(cfgs[2])))
    return model.to(dtype).eval(), Frozen(vae, vit)


def inputs(B, size, device, seed):
    """Random source, target and reference images in [-1, 1]; the mask asks to fill the central half; hint: a canvas
    of make_hint's shape, for meta and fake tensors, which have no mask values for make_hint to search."""
    g = torch.Generator().manual_seed(seed)
    image = lambda side: torch.rand(B, 3, side, side, generator=g) * 2 - 1
    mask = torch.ones(B, 1, size, size)
    mask[:, :, size // 4:3 * size // 4, size // 4:3 * size // 4] = 0  # PBE's masks: 1 = keep
    x = dict(source=image(size), target=image(size), reference=image(224), mask=mask,
             hint=torch.rand(B, 3, size, size, generator=g))
    return {k: v.to(device) for k, v in x.items()}


def flops(fn, x):
    """FLOPs of fn(meta_x), meta_x: x's shapes on meta, floats in float32 as the meta replicas fn runs (FLOPs do not
    depend on the dtype). By FlopCounterMode, with no compute, attention counted on every device (the CPU's flash
    SDPA kernel is not in the counter's table)."""
    meta_x = {k: torch.empty(v.shape, device="meta", dtype=torch.float32) for k, v in x.items()}
    with FlopCounterMode(display=False) as counter:
        fn(meta_x)
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


MEMORY_NOTE = dict(cuda="peak MiB: torch.cuda.max_memory_allocated over the timed runs (weights included)",
                   cpu="peak MiB: the process's peak-RSS growth over the timed runs (getrusage, reset through "
                       "/proc/self/clear_refs, else a lifetime peak); weights already resident are not counted")


def autocast(device, dtype):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def on(flag):
    return "on" if flag else "off"


def table(header, rows):
    """A markdown table; float cells to 4 significant digits."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(f"{c:.4g}" if isinstance(c, float) else str(c) for c in row) + " |"
                              for row in rows])


# -----------------------------------------------------------------------------
# sampling, ours against diffusers and timm, training

SAMPLE_HEADER = ["batch", "s/image", "ms/step", "peak MiB", "TFLOP/s"]
COMPARE_HEADER = ["module", "input", "ours ms", "reference ms", "ours / reference", "reference"]
TRAIN_HEADER = ["batch", "grad checkpointing", "s/step", "images/s", "peak MiB", "TFLOP/s", "MFU"]


def sample_image(model, frozen, x, steps, guidance, hint=None):
    """An image batch (B, 3, size, size), as sample.py makes it (dtc.generate: prepare, the guided DDIM steps, the
    VAE decode); hint: the canvas, else make_hint's."""
    return generate(model, frozen, x["source"], x["mask"], x["reference"], None, steps, guidance, hint=hint,
                    progress=False)


def sampling_flops(cfgs, x, steps, guidance):
    """FLOPs of sample_image on meta replicas: counted at 1 and 2 DDIM steps and extended to `steps`, as every step
    costs the same (counting 40 steps one by one took 41 s at sd15)."""
    model, frozen = build(cfgs, "meta")
    model.requires_grad_(False)  # sampling makes no autograd graph
    one, two = (flops(lambda mx: sample_image(model, frozen, mx, n, guidance, hint=mx["hint"]), x) for n in (1, 2))
    return one + (steps - 1) * (two - one)


def sample_section(args, device, dtype):
    """One row at the given settings: seconds per image and peak memory of sampling, a DDIM step's ms, TFLOP/s."""
    cfgs = arch(args.arch)
    model, frozen = build(cfgs, device, dtype)
    x = inputs(args.batch, args.size, device, args.seed)
    if args.channels_last:  # the layout GPU convolution kernels prefer
        for m in (model, frozen.vae, frozen.image_encoder):
            m.to(memory_format=torch.channels_last)
        x = {k: v.contiguous(memory_format=torch.channels_last) for k, v in x.items()}
    if args.compile:
        model.compile()  # the DTC forward (main U-Net, hint encoder, FiLM); the warm-up run compiles it
    tflop = sampling_flops(cfgs, x, args.steps, args.guidance) / 1e12
    print("sample", file=sys.stderr, flush=True)
    with torch.no_grad(), autocast(device, dtype):
        cond = prepare(frozen, x["source"], x["mask"], x["reference"], model.cfg.encoder_input_size)
        step, _ = timed(lambda: sample_latents(model, Schedule(), cond, 1, args.guidance, progress=False), device,
                        args.repeats)
        seconds, mib = timed(lambda: sample_image(model, frozen, x, args.steps, args.guidance), device, args.repeats)
    row = [args.batch, seconds / args.batch, step * 1e3, mib, tflop / seconds]
    weights = "float32" if dtype == torch.float32 else f"{str(dtype)[6:]} weights + autocast"
    return [f"## Sampling: {args.size}x{args.size}, {args.steps} DDIM steps, guidance {args.guidance:g}, {weights}, "
            f"channels_last {on(args.channels_last)}, torch.compile {on(args.compile)}\n\n{table(SAMPLE_HEADER, [row])}"
            "\n\n- s/image: prepare() (DINOv2 tokens, VAE encode, make_hint's canvas), the guided DDIM steps and the "
            "VAE decode, per image of the batch. ms/step: one DDIM step, the DTC forward (main U-Net, hint encoder, "
            "FiLM) on the CFG batch [null; cond] of 2B. Medians of the timed runs after one warm-up.\n"
            f"- TFLOP/s: {tflop:.4g} TFLOP per batch (FlopCounterMode on meta replicas; make_hint, Python, has none) "
            f"/ its seconds.\n- {MEMORY_NOTE[device.type]}."]


def compare_section(args, device, dtype):
    """One forward each, ours and diffusers' or timm's twin holding our very tensors (reference.py), same inputs."""
    model, frozen = build(arch(args.arch), device, dtype)
    vit, size = frozen.image_encoder, model.cfg.encoder_input_size
    try:  # timm's DINOv2 at our size, pos_embed resampled by our rule (dinov2.py)
        unet, vae = reference.unet_as_diffusers(model.unet), reference.vae_as_diffusers(frozen.vae)
        pos_embed = vit.resized_pos_embed(size // vit.cfg.patch_size, size // vit.cfg.patch_size).detach()
        dino = reference.dinov2_as_timm(dict(vit.state_dict(), pos_embed=pos_embed), vit.cfg, size)
    except ImportError:
        return ["diffusers or timm not installed: skipping the compare table"]
    x, rows = inputs(args.batch, args.size, device, args.seed), []
    with torch.no_grad(), autocast(device, dtype):
        cond = prepare(frozen, x["source"], x["mask"], x["reference"], size)
        unet_in = model.unet_input(torch.randn_like(cond["z_masked"]), cond["z_masked"], cond["mask_lat"])  # (B,9,h,w)
        ctx = model.context(cond["tokens"].to(unet_in.dtype))  # (B, 257, 768) at sd15
        t = torch.full((args.batch,), 500, device=device)
        image = F.interpolate(x["reference"], size=(size, size)).to(unet_in.dtype)  # (B, 3, 224, 224) at sd15
        z = cond["z_masked"] / LATENT_SCALE
        pairs = [("U-Net forward", f"{tuple(unet_in.shape)}, {ctx.shape[1]} tokens", "diffusers",
                  lambda: model.unet(unet_in, t, ctx), lambda: unet(unet_in, t, encoder_hidden_states=ctx).sample),
                 ("DINOv2 forward", f"{tuple(image.shape)}", "timm", lambda: vit(image), lambda: dino(image)),
                 ("VAE encode", f"{tuple(x['source'].shape)}", "diffusers", lambda: frozen.vae.encode(x["source"]).mean,
                  lambda: vae.encode(x["source"]).latent_dist.mean),
                 ("VAE decode", f"{tuple(z.shape)}", "diffusers", lambda: frozen.vae.decode(z),
                  lambda: vae.decode(z).sample)]
        for name, shape, lib, ours, theirs in pairs:
            print(f"compare: {name}, ours vs {lib}", file=sys.stderr, flush=True)
            ours(), theirs()  # warm-up; then alternate, so a change in machine load hits both sides alike
            times = [(timed(ours, device, 1, warmup=0)[0], timed(theirs, device, 1, warmup=0)[0])
                     for _ in range(args.repeats)]
            a, b = statistics.median(a for a, _ in times), statistics.median(b for _, b in times)
            rows.append([name, shape, a * 1e3, b * 1e3, f"{a / b:.3g}", lib])
    return [f"## Ours vs the reference implementations (same weights, {str(dtype)[6:]})\n\n"
            f"{table(COMPARE_HEADER, rows)}\n\n- Medians of alternating timed runs (ours, reference, ours, ...). "
            "Goal: ours / reference <= 1."]


def training_step(model, frozen, vgg, opt, x, device, dtype, hint=None):
    """One optimizer step as train.py's loop takes it: prepare() without gradients, float32 conditioning, the Eq. 1
    loss with 20 % guidance dropout and, with vgg, 1e-3 x the VGG loss on the decoded x0 estimate (through the
    frozen decoder), backward, gradient clipping at 1, opt's step. hint: the canvas, else make_hint's."""
    schedule = Schedule()
    with autocast(device, dtype):
        cond = prepare(frozen, x["source"], x["mask"], x["reference"], model.cfg.encoder_input_size, target=x["target"],
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


def train_section(args, device, dtype):
    """Per batch size, a training step as train.py takes it (without the VGG loss), without and with checkpointing."""
    cfgs, cuda = arch(args.arch), device.type == "cuda"
    model, frozen = build(cfgs, device, dtype)
    model.float().train()  # float32 master weights (autocast computes in dtype); the frozen parts stay in dtype
    meta_model, meta_frozen = build(cfgs, "meta")
    peak = args.peak_tflops or (989.0 if cuda else None)
    rows = []
    for B in [int(b) for b in args.batch_sizes.split(",")]:
        x = inputs(B, args.size, device, args.seed)

        def meta_step(mx):  # model FLOPs of a step (no recomputation): prepare's frozen encoders, forward, backward
            cond = prepare(meta_frozen, mx["source"], mx["mask"], mx["reference"], model.cfg.encoder_input_size,
                           target=mx["target"], hint=mx["hint"])
            diffusion_loss(meta_model.train(), Schedule(), cond)[0].backward()

        step_tflop = flops(meta_step, x) / 1e12
        for checkpointing in (False, True):
            print(f"train: batch {B}, grad checkpointing {on(checkpointing)}", file=sys.stderr, flush=True)
            model.unet.grad_checkpointing = model.hint_encoder.grad_checkpointing = checkpointing
            opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=cuda)  # fused on CUDA, as train.py
            try:  # the warm-up step makes AdamW's state and autotunes cuDNN
                seconds, mib = timed(lambda: training_step(model, frozen, None, opt, x, device, dtype), device,
                                     args.repeats)
                rows.append([B, on(checkpointing), seconds, B / seconds, mib, step_tflop / seconds,
                             f"{100 * step_tflop / seconds / peak:.3g}%" if peak else "n/a"])
            except torch.cuda.OutOfMemoryError:
                rows.append([B, on(checkpointing)] + ["OOM"] * 5)
            model.zero_grad(set_to_none=True)
    weights = "float32" if dtype == torch.float32 else f"{str(dtype)[6:]} autocast over float32 master weights"
    return [f"## Training: {args.size}x{args.size}, {weights}\n\n{table(TRAIN_HEADER, rows)}\n\n"
            "- A step: prepare() under no_grad (VAE encodes of target and masked source, DINOv2 tokens, make_hint's "
            "canvas), the DTC forward and backward, clipping, AdamW (fused on CUDA); no VGG loss.\n"
            + (f"- MFU against {peak:g} TFLOP/s (--peak_tflops; default on cuda: H100 SXM bf16 dense)" if peak else
               "- MFU n/a on a CPU unless --peak_tflops is given") + f"; FLOPs per step ({step_tflop:.4g} TFLOP at "
            "the last batch size) by FlopCounterMode on meta replicas (model FLOPs, no recomputation).\n"
            f"- {MEMORY_NOTE[device.type]}; includes AdamW state."]


# -----------------------------------------------------------------------------
# memory: the peak of each row, simulated on fake tensors and, on a GPU, measured


class PeakMemory(TorchDispatchMode):
    """The peak bytes of tensor storage alive while it is active: each storage that an operation makes (fake ones
    too: a size, no bytes) or that `held` holds at the start, counted once at its size until it is freed. What
    PyTorch's MemTracker counts, without its per-module hooks, which fail on this model (frozen parameters take no
    hooks; a parameter's view made under no_grad trips its ModTracker) and took 12x as long (measured)."""

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


def peak_bytes(fn, resident, device):
    """(fn(), the peak bytes while it runs). On a GPU torch.cuda.max_memory_allocated (every tensor on it); elsewhere
    PeakMemory, counting what `resident` lists on the device (modules, optimizers, tensors) and what fn makes."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        return out, torch.cuda.max_memory_allocated(device)
    with PeakMemory(tensors_of(resident)) as tracker:
        out = fn()
    return out, tracker.peak


def sample_peak(cfgs, B, hint_input, offload, args, device, fake):
    """Peak bytes of sampling as dtc.generate does, bfloat16 weights and autocast: prepare() with DINOv2 on the
    device; then (DINOv2 moved off with offload) one guided DDIM step, which frees what it makes and so stands for
    all, and the VAE decode. fake: on fake tensors."""
    model, frozen = build(cfgs, "meta", torch.bfloat16, hint_input)
    vit = frozen.image_encoder
    with fake_tensors(fake), torch.no_grad(), autocast(device, torch.bfloat16):
        placed([model, frozen.vae, vit], device)
        x = inputs(B, args.size, device, args.seed)
        cond, peak = peak_bytes(lambda: prepare(frozen, x["source"], x["mask"], x["reference"], model.cfg.encoder_input_size,
                                                hint=x["hint"]), [model, frozen.vae, vit, *x.values()], device)
        if offload and device.type == "cuda":  # (elsewhere PeakMemory counts only what `resident` lists)
            vit.cpu()
        denoise = lambda: frozen.vae.decode(sample_latents(model, Schedule(), cond, 1, args.guidance, progress=False)
                                            / LATENT_SCALE)
        resident = [model, frozen.vae, *x.values(), *cond.values()] + ([] if offload else [vit])
        return max(peak, peak_bytes(denoise, resident, device)[1])


def train_peak(cfgs, B, checkpointing, train, args, device, fake):
    """dict(peak, trained, frozen): peak bytes of train.py's step on a GPU from the second on (AdamW's state exists;
    float32 weights, bfloat16 autocast, frozen parts in bfloat16, the VGG loss), parameters trained, frozen bytes."""
    model, frozen = build(cfgs, "meta", torch.bfloat16)
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
        x = inputs(B, args.size, device, args.seed)
        _, peak = peak_bytes(lambda: training_step(model, frozen, vgg, opt, x, device, torch.bfloat16, x["hint"]),
                             [*modules, opt, *x.values()], device)
    frozen_bytes = sum(p.numel() * p.element_size() for m in modules for p in m.parameters() if not p.requires_grad)
    return dict(peak=peak, trained=sum(p.numel() for p in params), frozen=frozen_bytes)


def simulated_and_measured(peak, device):
    """(peak(cpu, fake=True), then on a GPU peak(device, fake=False) or "OOM", elsewhere None)."""
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
    return "—" if b is None else b if isinstance(b, str) else f"{b / 2 ** 30:.4g}"


MEMORY_SAMPLE_HEADER = ["batch", "hint features", "DINOv2 after encoding", "simulated GiB", "measured GiB"]
MEMORY_TRAIN_HEADER = ["trained", "batch", "grad checkpointing", "floor GiB", "simulated GiB",
                       "DDP per process GiB", "measured GiB"]


def memory_section(args, device):
    """The sampling and training tables and the key=value line of their peaks, in GiB."""
    cfgs, start, keys, sample_rows, train_rows = arch(args.arch), time.perf_counter(), {}, [], []
    for B in (1, 4):
        for hint_input in ("full", "latent_only"):
            for offload in (False, True):
                print(f"memory: sampling, batch {B}, {hint_input}, offload {on(offload)}", file=sys.stderr, flush=True)
                sim, real = simulated_and_measured(
                    lambda d, fake: sample_peak(cfgs, B, hint_input, offload, args, d, fake), device)
                keys[f"sample_b{B}" + "_latent_only" * (hint_input == "latent_only") + "_offload" * offload] = sim
                sample_rows.append([B, "once per image (latent_only)" if hint_input == "latent_only" else
                                    "every step (full)", "moved off" if offload else "kept", gib(sim), gib(real)])
    for train, key in (("all", "train"), ("hint", "onegpu")):
        for B in [int(b) for b in args.batch_sizes.split(",")]:
            for checkpointing in (False, True):
                print(f"memory: training {train}, batch {B}, checkpointing {on(checkpointing)}", file=sys.stderr,
                      flush=True)
                sim, real = simulated_and_measured(
                    lambda d, fake: train_peak(cfgs, B, checkpointing, train, args, d, fake), device)
                keys[f"{key}_b{B}" + "_ckpt" * checkpointing] = sim["peak"]
                measured = real["peak"] if isinstance(real, dict) else real  # or "OOM", or None off a GPU
                train_rows.append([f"{train} ({sim['trained'] / 1e6:.0f} M)", B, on(checkpointing),
                                   gib(16 * sim["trained"] + sim["frozen"]), gib(sim["peak"]),
                                   gib(sim["peak"] + 4 * sim["trained"]), gib(measured)])
    return [f"## Memory: peak per row, {args.size}x{args.size}, bfloat16\n\n"
            f"### Sampling: {args.steps} DDIM steps, guidance {args.guidance:g}, bfloat16 weights\n\n"
            f"{table(MEMORY_SAMPLE_HEADER, sample_rows)}\n\n"
            "### Training: float32 weights, bfloat16 autocast, fused AdamW, VGG loss, frozen VAE and DINOv2 in "
            f"bfloat16\n\n{table(MEMORY_TRAIN_HEADER, train_rows)}\n\n"
            "- simulated: every storage alive on FakeTensorMode tensors (no storage: no GPU, no weights), counted "
            "by PeakMemory; measured (--device=cuda): torch.cuda.max_memory_allocated, the same rows on real tensors. "
            "One DDIM step stands for all 40 (each frees what it makes).\n- trained all: the paper's; hint: "
            "`--train=hint`. floor: 16 bytes per trained parameter (weight, gradient, AdamW's two moments) + the "
            "frozen weights. DDP per process: + a float32 copy of the trained gradients (DDP's buckets).\n"
            f"- {time.perf_counter() - start:.0f} s on {torch.get_num_threads()} CPU thread(s), torch "
            f"{torch.__version__}.", " ".join(f"{k}={gib(v)}" for k, v in keys.items())]


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(pick_device(args.device))
    if args.compile and device.type == "cpu":
        raise DataError("--compile: CUDA only (on the CPU, inductor's OpenMP kernels made every later eager call "
                        "~100x slower on a 2-core machine, measured)")
    dtype = torch.bfloat16 if args.mode == "memory" else pick_dtype(args.dtype, device.type)
    torch.manual_seed(args.seed)
    where = f"CPU, {torch.get_num_threads()} threads"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest convolutions
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # for float32 runs
        where = f"{torch.cuda.get_device_name(device)} (TF32 on for float32)"
    command = " ".join(sys.argv[1:] if argv is None else argv)
    sections = [f"# DTC benchmark: {args.mode}, arch {args.arch}, {where}, torch {torch.__version__}, "
                f"{str(dtype)[6:]}, random weights\n\n`python bench.py {command}`"]
    print(sections[0] + "\n", flush=True)
    summary = None  # memory: the key=value line, printed last
    for part in ["sample", "compare", "train"] if args.mode == "all" else [args.mode]:
        if part == "memory":
            *new, summary = memory_section(args, device)
        else:
            new = dict(sample=sample_section, compare=compare_section, train=train_section)[part](args, device, dtype)
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
