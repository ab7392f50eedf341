"""
Put a product into a photo with Diffuse to Choose.

With no arguments it runs the bundled teaching model on a bundled example, on the CPU, in seconds:
    python sample.py
With the real weights (SD 1.5 or SD 1.5-inpainting, DINOv2 g/14, and a DTC checkpoint you trained):
    python sample.py --sd=v1-5-pruned-emaonly.safetensors --dinov2=dinov2_vitg14_pretrain.pth \\
        --dtc=dtc.safetensors --source=photo.jpg --mask=mask.png --reference=product.jpg --out=result.png
The mask is white where the product goes. Every option also accepts --key=value.
"""
import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F
from PIL import Image

from checkpoint import CheckpointError
from data import DataError, check_output_image, load_image, load_mask, to_pil, to_tensor, write_images
from dtc import Schedule, from_original, load_dtc, make_hint, prepare, sample_latents
from vae import LATENT_SCALE

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLES = os.path.join(HERE, "assets", "examples")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sd", help="SD 1.5, SD 1.5-inpainting or Paint-by-Example single file (U-Net and VAE)")
    p.add_argument("--dinov2", help="DINOv2 hub file, e.g. dinov2_vitg14_pretrain.pth")
    p.add_argument("--dtc", default=None, help="DTC checkpoint from train.py (default: the bundled teaching model "
                   "when --sd is not given)")
    p.add_argument("--source", default=os.path.join(EXAMPLES, "source.png"), help="the photo to edit")
    p.add_argument("--mask", default=os.path.join(EXAMPLES, "mask.png"), help="white = region to fill; any size")
    p.add_argument("--reference", default=os.path.join(EXAMPLES, "reference.png"), help="the product image")
    p.add_argument("--out", default=os.path.join("out", "result.png"), help="result path (.png, .jpg, .jpeg or .webp: "
                   "the extension sets the format); a grid <out>_grid.png is written beside it")
    p.add_argument("--size", type=int, default=None, help="longer side the model works at (default: the model's "
                   "training size: 512 for SD, 64 for the teaching model)")
    p.add_argument("--steps", type=int, default=40, help="DDIM steps (paper: 40)")
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale (paper: 5)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta: 0 deterministic, 1 DDPM-like")
    p.add_argument("--seed", type=int, default=0, help="sample i uses seed + i")
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--no_paste_back", action="store_true", help="keep the decoded pixels outside the mask too")
    return p.parse_args(argv)


def check_options(args):
    """Every option's meaning, checked before any model is loaded or any file written: each problem is one line."""
    def bad(option, why):
        return DataError(f"--{option}={getattr(args, option)}: {why}")
    if not 1 <= args.steps <= Schedule().num_steps:  # past 1000 the DDIM spacing would repeat t = 1
        raise bad("steps", f"DDIM steps must be 1 ... {Schedule().num_steps} (the schedule's steps)")
    if args.num_samples < 1:
        raise bad("num_samples", "must be at least 1")
    if args.size is not None and args.size < 1:
        raise bad("size", "the working size must be a positive number of pixels")
    if not (math.isfinite(args.guidance) and args.guidance >= 0):
        raise bad("guidance", "must be a finite number >= 0 (1: no guidance; paper: 5)")
    if not (math.isfinite(args.eta) and 0 <= args.eta <= 1):
        raise bad("eta", "DDIM eta must be 0 ... 1 (0: deterministic, 1: DDPM-like)")
    if not 0 <= args.seed <= 2 ** 63 - args.num_samples:
        raise bad("seed", f"must be 0 ... 2^63 - {args.num_samples} (sample i uses seed + i)")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise bad("device", "CUDA is not available here; use --device=cpu (or auto)")
    if args.dtc is None and args.sd is not None and args.dinov2 is None:
        raise CheckpointError("--sd needs --dinov2 (the DINOv2 hub file)")
    for option in ("sd", "dinov2", "dtc"):
        if getattr(args, option) is not None and not os.path.isfile(getattr(args, option)):
            raise CheckpointError(f"{getattr(args, option)}: file not found (--{option})")
    results, grid_path = output_paths(args)
    for path in results:
        check_output_image(path, "--out")
    check_output_image(grid_path, "the grid beside --out")


def output_paths(args):
    """The results' paths (<out>, or <out>_0 ... with several samples) and the grid's: <out>_grid.png."""
    stem, ext = os.path.splitext(args.out)
    results = [args.out] if args.num_samples == 1 else [f"{stem}_{i}{ext}" for i in range(args.num_samples)]
    return results, f"{stem}_grid.png"


def load_models(args, dtype):
    """(model, frozen, default size). The bundled teaching model carries its own VAE and image encoder."""
    if args.dtc is None and args.sd is None:
        args.dtc = os.path.join(HERE, "assets", "dtc_tiny.safetensors")
    if args.dtc is None:
        print("warning: no --dtc given: sampling from an UNTRAINED DTC built from --sd (the hint branch and the token "
              "projection are fresh, drawn from --seed); useful only to check the wiring", file=sys.stderr)
        model, frozen = from_original(args.sd, args.dinov2, dtype=dtype, seed=args.seed)
        return model.eval(), frozen, 512
    model, frozen = load_dtc(args.dtc, dtype=dtype)
    if frozen is None:
        if args.sd is None or args.dinov2 is None:
            raise CheckpointError(f"{args.dtc}: holds only the trainable parts; give --sd and --dinov2 for the "
                                  "frozen VAE and image encoder")
        _, frozen = from_original(args.sd, args.dinov2, dtype=dtype)
    # the teaching model was trained at its own small size; SD at 512
    return model, frozen, 512 if model.cfg.unet.model_channels >= 320 else 64


def working_size(w, h, longer, multiple):
    """Source size scaled so its longer side is `longer`, each side rounded to a multiple the model needs."""
    s = longer / max(w, h)
    return max(multiple, round(w * s / multiple) * multiple), max(multiple, round(h * s / multiple) * multiple)


def grid(images, height=256):
    """Images side by side, each scaled to `height`."""
    images = [im.convert("RGB").resize((max(1, round(im.width * height / im.height)), height), Image.BICUBIC)
              for im in images]
    out = Image.new("RGB", (sum(im.width for im in images), height), "white")
    x = 0
    for im in images:
        out.paste(im, (x, 0))
        x += im.width
    return out


def main(argv=None):
    args = parse_args(argv)
    check_options(args)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.dtype == "auto":
        dtype = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    else:
        dtype = getattr(torch, args.dtype)

    # read and check every input before any model work, so bad input costs nothing and writes nothing
    source_pil = load_image(args.source)
    reference_pil = load_image(args.reference)
    W, H = source_pil.size
    keep_full = load_mask(args.mask, size=(H, W), resize=True)  # (1,H,W), 1 = keep, at the source's resolution
    if keep_full.min() > 0.5:
        raise DataError(f"{args.mask}: the mask is empty (no white pixels): nothing to fill")
    if keep_full.max() < 0.5:
        raise DataError(f"{args.mask}: the mask covers the whole image: DTC needs some of the photo as context")

    keep_pil = Image.fromarray(((keep_full[0] > 0.5).to(torch.uint8) * 255).numpy(), mode="L")

    model, frozen, default_size = load_models(args, dtype)
    model.to(device, dtype)
    frozen.vae.to(device, dtype)
    frozen.image_encoder.to(device, dtype)
    cfg = model.cfg
    multiple = cfg.vae_factor * 2 ** (len(cfg.unet.channel_mult) - 1)
    w, h = working_size(W, H, args.size or default_size, multiple)

    source = to_tensor(source_pil.resize((w, h), Image.BICUBIC))[None].to(device)
    mask = F.interpolate(keep_full[None], size=(h, w), mode="nearest").to(device)
    if mask.max() < 0.5 or mask.min() > 0.5:
        raise DataError(f"{args.mask}: at {w}x{h} the mask is {'all' if mask.max() < 0.5 else 'no'} region to fill; "
                        "use a larger --size or a different mask")
    reference = to_tensor(reference_pil)[None].to(device)
    schedule = Schedule()
    results = []
    autocast = torch.autocast(device, dtype=dtype, enabled=device == "cuda" and dtype != torch.float32)
    for i in range(args.num_samples):
        generator = torch.Generator().manual_seed(args.seed + i)  # CPU generator: same noise on every device
        with autocast:
            cond = prepare(frozen, source, mask, reference, cfg.image_size, generator)
            z = sample_latents(model, schedule, cond, args.steps, args.guidance, args.eta, generator=generator)
            x = frozen.vae.decode(z / LATENT_SCALE).float().clamp(-1, 1)
        result = to_pil(x[0].cpu()).resize((W, H), Image.BICUBIC)
        if not args.no_paste_back:  # every pixel outside the region to fill is the source's own
            result = Image.composite(source_pil, result, keep_pil)
        results.append(result)

    hint = to_pil(make_hint(reference.float().cpu(), mask.float().cpu())[0] * 2 - 1)
    mask_pil = Image.eval(keep_pil, lambda v: 255 - v)  # white = filled, as the user drew it
    paths, grid_path = output_paths(args)
    # all or nothing: the results and the grid replace the earlier ones only once every one of them is written
    write_images({**dict(zip(paths, results)), grid_path: grid([source_pil, mask_pil, reference_pil, hint, *results])})
    print(f"grid: {grid_path}")
    print(" ".join(paths))


def cli(argv=None):
    """Bad input ends with exit status 1 and one line naming the file and the problem, no traceback."""
    try:
        main(argv)
    except (CheckpointError, DataError) as e:
        print(f"error: {'; '.join(line.strip() for line in str(e).splitlines())}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
