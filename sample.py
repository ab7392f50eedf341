"""
Put a product into a photo with Diffuse to Choose.

With no arguments it runs the bundled teaching model on a bundled example, on the CPU, in seconds:
    python sample.py
With the real weights (SD 1.5 or SD 1.5-inpainting, DINOv2 g/14, and a DTC checkpoint you trained):
    python sample.py --sd=v1-5-pruned-emaonly.safetensors --dinov2=dinov2_vitg14_pretrain.pth \\
        --dtc=dtc.safetensors --source=photo.jpg --mask=mask.png --reference=product.jpg --out=result.png
The mask is white where the product goes (transparent pixels keep: a white shape on a transparent layer is that
shape); --box=x0,y0,x1,y1 (pixels) fills a rectangle instead. Give --source, --mask (or --box) and --reference
together: the bundled example is used only when none of them is given. Every option also accepts --key=value.
"""
import os
os.environ.setdefault("GOMP_SPINCOUNT", "2000")  # read once, when torch loads OpenMP: cli.use_free_cores says why
import argparse
import math
import sys

import torch
import torch.nn.functional as F
from PIL import Image

from checkpoint import CheckpointError
from cli import HelpFormatter, bad_option, check_dtype, check_files, check_sampling_options, run, use_free_cores
from data import DataError, check_output_image, grid, load_image, load_mask, to_pil, to_tensor, write_images
from dtc import generate, hint_image, load_for_sampling
from explain import explain

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLES = os.path.join(HERE, "assets", "examples")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--sd", help="SD 1.5, SD 1.5-inpainting or Paint-by-Example single file (U-Net and VAE); "
                   "default: none, the bundled teaching model")
    p.add_argument("--dinov2", help="DINOv2 hub file, e.g. dinov2_vitg14_pretrain.pth (needed with --sd); "
                   "default: none")
    p.add_argument("--dtc", help="DTC checkpoint from train.py (default: the bundled teaching model when --sd is not "
                   "given; with --sd, an untrained DTC built from it)")
    p.add_argument("--source", help="the photo to edit (default: the bundled example's, when none of --source, "
                   "--mask, --box, --reference is given)")
    p.add_argument("--mask", help="white = region to fill, grey thresholded at 128, transparent = keep (a white "
                   "shape on a transparent layer is that shape); any size (default: the bundled example's)")
    p.add_argument("--box", help="x0,y0,x1,y1: fill this rectangle instead of a --mask (pixels of the source; "
                   "x1, y1 exclusive, as PIL's boxes); default: none")
    p.add_argument("--reference", help="the product image (default: the bundled example's)")
    p.add_argument("--out", default=os.path.join("out", "result.png"), help="result path (.png, .jpg, .jpeg or .webp: "
                   "the extension sets the format); a grid <out>_grid.png is written beside it")
    p.add_argument("--size", type=int, help="longer side the model works at, 1 ... 2048 (default: the model's "
                   "training size: 512 for SD, 64 for the teaching model); each side rounded to the model's multiple")
    p.add_argument("--sampler", default="ddim", choices=["ddim", "ddpm"], help="ddim: --steps of DDIM (the paper's); "
                   "ddpm: ancestral DDPM over all 1000 of the schedule's steps (25x the U-Net calls of DDIM's 40)")
    p.add_argument("--steps", type=int, help="DDIM steps, 1 ... 1000 (default: 40, the paper's)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale, >= 0 (default: the model's "
                   "stored default; 5, the paper's, for models built from SD)")
    p.add_argument("--eta", type=float, help="DDIM eta, 0 ... 1: 0 deterministic, 1 DDPM-like (default: 0)")
    p.add_argument("--seed", type=int, default=0, help="sample i uses seed + i; 0 ... 2^32 - 1")
    p.add_argument("--num_samples", type=int, default=1, help="results to draw, each with its own seed")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA when available")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 on a GPU that has it, else float32")
    p.add_argument("--no_paste_back", action="store_true", help="keep the decoded pixels outside the mask too")
    p.add_argument("--explain", action="store_true", help="also write <out>_explain.png: what the hint does")
    p.add_argument("--baseline", help="--explain: a model without the hint branch to compare with "
                   "(default with the bundled model: the bundled baseline; else none)")
    p.add_argument("--target", help="--explain: what the region should become, shown beside the results; default: "
                   "none")
    args = p.parse_args(argv)
    if args.dtc is None and args.sd is None:  # the bundled teaching model and, for --explain, its baseline
        args.dtc = os.path.join(HERE, "assets", "dtc_tiny.safetensors")
        if args.explain and args.baseline is None:
            args.baseline = os.path.join(HERE, "assets", "dtc_tiny_baseline.safetensors")
    if all(v is None for v in (args.source, args.mask, args.box, args.reference)):  # the bundled example, as a whole
        args.source, args.mask, args.reference = (os.path.join(EXAMPLES, f"{name}.png")
                                                  for name in ("source", "mask", "reference"))
    return args


def check_options(args):
    """Every option's meaning, checked before any model is loaded or any file written: each problem is one line.
    Returns (device, dtype)."""
    missing = [name for name, given in (("--source", args.source), ("--mask (or --box)", args.mask or args.box),
                                        ("--reference", args.reference)) if given is None]
    if missing:  # some of the user's own inputs given: never completed with the bundled example's
        raise DataError(f"{' and '.join(missing)} missing: your own --source, --mask (or --box) and --reference go "
                        "together (with none of them the bundled example runs)")
    if args.mask is not None and args.box is not None:
        raise bad_option(args, "box", "give --mask or --box, not both (each names the region to fill)")
    for option in ("baseline", "target"):
        if getattr(args, option) is not None and not args.explain:
            raise bad_option(args, option, "is used only with --explain")
    for option in ("steps", "eta"):
        if args.sampler == "ddpm" and getattr(args, option) is not None:
            raise bad_option(args, option, "is DDIM's: --sampler=ddpm runs every one of the schedule's 1000 steps")
    if args.steps is None:
        args.steps = 1000 if args.sampler == "ddpm" else 40
    args.eta = 0.0 if args.eta is None else args.eta
    check_sampling_options(args)
    if args.num_samples < 1:
        raise bad_option(args, "num_samples", "must be at least 1")
    if not (math.isfinite(args.eta) and 0 <= args.eta <= 1):
        raise bad_option(args, "eta", "DDIM eta must be 0 ... 1 (0: deterministic, 1: DDPM-like)")
    device, dtype = check_dtype(args)  # --device=cuda without CUDA, --dtype the device lacks: said before any work
    if args.dtc is None and args.sd is not None and args.dinov2 is None:
        raise CheckpointError("--sd needs --dinov2 (the DINOv2 hub file)")
    check_files(args, "sd", "dinov2", "dtc", "source", "mask", "reference", "baseline", "target")
    for path, what in output_paths(args):
        check_output_image(path, what)
    return device, dtype


def output_paths(args):
    """[(path, what it is)]: the results (<out>, or <out>_0 ... with several samples), the grid (<out>_grid.png) and
    --explain's picture (<out>_explain.png)."""
    stem, ext = os.path.splitext(args.out)
    results = [args.out] if args.num_samples == 1 else [f"{stem}_{i}{ext}" for i in range(args.num_samples)]
    return ([(path, "--out") for path in results] + [(f"{stem}_grid.png", "the grid beside --out")]
            + ([(f"{stem}_explain.png", "the --explain picture beside --out")] if args.explain else []))


def read_region(args, size):
    """(1,H,W) keep-mask (1 = keep) at the source's size (H, W): --mask read (any size, resized), or --box's
    rectangle "x0,y0,x1,y1" to fill. An empty mask and one that covers everything are refused."""
    H, W = size
    if args.box is None:
        keep, name = load_mask(args.mask, size=(H, W), resize=True), args.mask
    else:
        name = f"--box={args.box}"
        try:
            x0, y0, x1, y1 = (int(v) for v in args.box.split(","))
        except ValueError:
            raise DataError(f"{name}: expected four integers x0,y0,x1,y1") from None
        if not (0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H):
            raise DataError(f"{name}: needs 0 <= x0 < x1 <= {W} and 0 <= y0 < y1 <= {H} (the source is {W}x{H})")
        keep = torch.ones(1, H, W)
        keep[:, y0:y1, x0:x1] = 0
    if keep.min() > 0.5:
        raise DataError(f"{name}: the mask is empty (no white pixels): nothing to fill")
    if keep.max() < 0.5:
        raise DataError(f"{name}: the mask covers the whole image: DTC needs some of the photo as context")
    return keep, name


def main(argv=None):
    args = parse_args(argv)
    device, dtype = check_options(args)
    # every input read and checked before any model work, so bad input costs nothing and writes nothing
    source_pil, reference_pil = load_image(args.source), load_image(args.reference)
    target_pil = load_image(args.target) if args.target else None
    W, H = source_pil.size
    keep_full, mask_name = read_region(args, (H, W))  # (1,H,W), 1 = keep, at the source's resolution

    model, frozen = load_for_sampling(args.dtc, args.sd, args.dinov2, dtype, device, args.seed)
    if args.dtc is None:
        print("warning: no --dtc given: sampling from an UNTRAINED DTC built from --sd (the hint branch and the token "
              "projection are fresh, drawn from --seed); useful only to check the wiring", file=sys.stderr)
    w, h = model.cfg.working_size(W, H, args.size)
    source = to_tensor(source_pil.resize((w, h), Image.BICUBIC))[None].to(device)
    mask = F.interpolate(keep_full[None], size=(h, w), mode="nearest").to(device)
    if mask.max() < 0.5 or mask.min() > 0.5:
        raise DataError(f"{mask_name}: at {w}x{h} the mask is {'all' if mask.max() < 0.5 else 'no'} region to fill; "
                        "use a larger --size or a different mask")
    reference = to_tensor(reference_pil)[None].to(device)
    hint = hint_image(model.cfg.hint_kind, reference, mask, source)  # (1,3,h,w) in [0,1]: the model's and the grid's
    autocast = torch.autocast(device, dtype=dtype, enabled=device == "cuda" and dtype != torch.float32)
    if args.explain:  # first: what it checks in the models is said before the results are drawn
        target = to_tensor(target_pil.resize((w, h), Image.BICUBIC))[None] if target_pil else None
        with autocast:
            explained = explain(model, frozen, source, mask, reference, hint, target, args, dtype, device)

    keep_pil = Image.fromarray(((keep_full[0] > 0.5).to(torch.uint8) * 255).numpy(), mode="L")
    results = []
    for i in range(args.num_samples):
        generator = torch.Generator().manual_seed(args.seed + i)  # CPU generator: same noise on every device
        with autocast:
            x = generate(model, frozen, source, mask, reference, generator, args.steps, args.guidance, args.eta,
                         args.sampler, hint)
        result = to_pil(x[0].cpu()).resize((W, H), Image.BICUBIC)
        if not args.no_paste_back:  # every pixel outside the region to fill is the source's own
            result = Image.composite(source_pil, result, keep_pil)
        results.append(result)

    mask_pil = Image.eval(keep_pil, lambda v: 255 - v)  # white = filled, as the user drew it
    pictures = [*results, grid([source_pil, mask_pil, reference_pil, to_pil(hint[0].cpu() * 2 - 1), *results])]
    pictures += [explained] if args.explain else []
    paths = [path for path, _ in output_paths(args)]
    write_images(dict(zip(paths, pictures)))  # all or nothing: nothing replaced until every picture is written
    print("\n".join(f"{name}: {path}" for name, path in zip(("grid", "explain"), paths[args.num_samples:])))
    print(" ".join(paths[:args.num_samples]))


def cli(argv=None):
    """Bad input ends with exit status 1 and one line naming the file and the problem, no traceback."""
    return run(main, argv)


if __name__ == "__main__":
    use_free_cores()
    sys.exit(cli())
