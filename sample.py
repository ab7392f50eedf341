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
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read once, when torch loads OpenMP: cli.use_free_cores says why
import argparse
import math
import sys

import torch
import torch.nn.functional as F
from PIL import Image

from checkpoint import CheckpointError
from cli import (HelpFormatter, bad_option, check_dtype, check_files, check_sampling_options, pick_device, pick_dtype,
                 run, use_free_cores)
from data import DataError, check_output_image, grid, load_image, load_mask, to_pil, to_tensor, write_images
from dtc import from_original, generate, hint_image, load_dtc
from vae import LATENT_SCALE

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
    p.add_argument("--steps", type=int, default=40, help="DDIM steps, 1 ... 1000 (paper: 40)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale, >= 0 (default: the model's "
                   "stored default; 5, the paper's, for models built from SD)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta, 0 ... 1: 0 deterministic, 1 DDPM-like")
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
    """Every option's meaning, checked before any model is loaded or any file written: each problem is one line."""
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
    check_sampling_options(args)
    if args.num_samples < 1:
        raise bad_option(args, "num_samples", "must be at least 1")
    if not (math.isfinite(args.eta) and 0 <= args.eta <= 1):
        raise bad_option(args, "eta", "DDIM eta must be 0 ... 1 (0: deterministic, 1: DDPM-like)")
    check_dtype(args)  # --device=cuda without CUDA, --dtype the device lacks: said here, before any work
    if args.dtc is None and args.sd is not None and args.dinov2 is None:
        raise CheckpointError("--sd needs --dinov2 (the DINOv2 hub file)")
    check_files(args, "sd", "dinov2", "dtc", "source", "mask", "reference", "baseline", "target")
    results, grid_path, explain_path = output_paths(args)
    for path in results:
        check_output_image(path, "--out")
    check_output_image(grid_path, "the grid beside --out")
    if args.explain:
        check_output_image(explain_path, "the --explain picture beside --out")


def output_paths(args):
    """The results' paths (<out>, or <out>_0 ... with several samples), the grid's (<out>_grid.png) and
    --explain's (<out>_explain.png)."""
    stem, ext = os.path.splitext(args.out)
    results = [args.out] if args.num_samples == 1 else [f"{stem}_{i}{ext}" for i in range(args.num_samples)]
    return results, f"{stem}_grid.png", f"{stem}_explain.png"


def load_models(args, dtype):
    """(model, frozen). The bundled teaching model carries its own VAE and image encoder."""
    if args.dtc is None:
        print("warning: no --dtc given: sampling from an UNTRAINED DTC built from --sd (the hint branch and the token "
              "projection are fresh, drawn from --seed); useful only to check the wiring", file=sys.stderr)
        model, frozen = from_original(args.sd, args.dinov2, dtype=dtype, seed=args.seed)
        return model.eval(), frozen
    model, frozen = load_dtc(args.dtc, dtype=dtype)
    if frozen is None:
        if args.sd is None or args.dinov2 is None:
            raise CheckpointError(f"{args.dtc}: holds only the trainable parts; give --sd and --dinov2 for the "
                                  "frozen VAE and image encoder")
        _, frozen = from_original(args.sd, args.dinov2, dtype=dtype)
    return model, frozen


def box_mask(box, size):
    """(1,H,W) keep-mask (1 = keep) of the source size (H, W) with the rectangle "x0,y0,x1,y1" to fill."""
    H, W = size
    try:
        x0, y0, x1, y1 = (int(v) for v in box.split(","))
    except ValueError:
        raise DataError(f"--box={box}: expected four integers x0,y0,x1,y1") from None
    if not (0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H):
        raise DataError(f"--box={box}: needs 0 <= x0 < x1 <= {W} and 0 <= y0 < y1 <= {H} (the source is {W}x{H})")
    keep = torch.ones(1, H, W)
    keep[:, y0:y1, x0:x1] = 0
    return keep


@torch.no_grad()
def explain(model, frozen, baseline, source, mask, reference, target, args, tile=128):
    """The picture of what the hint does, (a PIL image):
    row 1: reference | hint | baseline (no hint branch) | DTC | DTC with its hint zeroed | target (if given);
    row 2: DTC's x0 estimate (decoded) at 4 of the denoising steps | how strongly the fusion changes the finest
    skip at the middle step: FiLM's mean |gamma| and mean |beta| over channels (add, xattn: mean |change|),
    each map scaled to its own maximum, which is printed on it. Same seed and noise for every result."""
    from PIL import ImageDraw  # only --explain draws text

    def sample_once(m, fr, zero_hint=False, trace=None):  # the same seed and noise for every result, pasted back as they are
        x, cond = generate(m, fr, source, mask, reference, torch.Generator().manual_seed(args.seed), args.steps,
                           args.guidance, args.eta, zero_hint, trace, progress=False)
        return cond, x * (1 - mask) + source * mask

    trace = []
    cond, dtc = sample_once(model, frozen, trace=trace)
    _, zeroed = sample_once(model, frozen, zero_hint=True)
    row1 = [("reference", reference), ("hint", cond["hint"] * 2 - 1)]
    if baseline is not None:
        row1.append(("baseline", sample_once(*baseline)[1]))
    row1 += [("DTC", dtc), ("DTC, hint zeroed", zeroed)] + ([("target", target)] if target is not None else [])
    picks = sorted({round(k * (len(trace) - 1) / 3) for k in range(4)})
    row2 = [(f"x0 at t={trace[k][0]}", frozen.vae.decode(trace[k][2] / LATENT_SCALE).float().clamp(-1, 1)) for k in picks]
    t, z_t, _ = trace[len(trace) // 2]  # the fusion at the middle step, conditional branch
    tt = torch.full((1,), t, dtype=torch.long, device=z_t.device)
    context = model.context(cond["tokens"].to(z_t.dtype))
    z_hint = model.hint_latent(cond["z_masked"], cond["hint"])
    feats = model.hint_features(z_hint, z_t, tt, cond["mask_lat"], context)
    if model.cfg.fusion == "film":
        gamma, beta = model.fusion[0](feats[0]).chunk(2, 1)
        maps = [("mean |gamma|", gamma.abs().mean(1, keepdim=True)), ("mean |beta|", beta.abs().mean(1, keepdim=True))]
    else:
        emb = model.unet.time_embedding(tt).to(z_t.dtype)
        _, skips = model.unet.encode(model.unet_input(z_t, cond["z_masked"], cond["mask_lat"]), emb, context)
        change = model.fusion[0](feats[0]) if model.cfg.fusion == "add" else model.fusion[0](skips[0], feats[0])
        maps = [("mean |change|", change.abs().mean(1, keepdim=True))]
    for name, m in maps:
        peak = m.max().item()
        row2.append((f"{name} <= {peak:.3g}", (m / max(peak, 1e-12)).expand(-1, 3, -1, -1) * 2 - 1))
    cols = max(len(row1), len(row2))
    image = Image.new("RGB", (cols * tile, 2 * (tile + 14)), "white")
    draw = ImageDraw.Draw(image)
    for r, row in enumerate((row1, row2)):
        for c, (label, x) in enumerate(row):
            im = to_pil(x[0].cpu()).resize((tile, tile), Image.NEAREST if x.shape[-1] < tile else Image.BICUBIC)
            image.paste(im, (c * tile, r * (tile + 14) + 14))
            draw.text((c * tile + 2, r * (tile + 14) + 1), label, fill="black")
    return image


def main(argv=None):
    args = parse_args(argv)
    check_options(args)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)

    # read and check every input before any model work, so bad input costs nothing and writes nothing
    source_pil = load_image(args.source)
    reference_pil = load_image(args.reference)
    target_pil = load_image(args.target) if args.target else None
    W, H = source_pil.size
    # (1,H,W), 1 = keep, at the source's resolution
    keep_full = box_mask(args.box, (H, W)) if args.box else load_mask(args.mask, size=(H, W), resize=True)
    mask_name = f"--box={args.box}" if args.box else args.mask
    if keep_full.min() > 0.5:
        raise DataError(f"{mask_name}: the mask is empty (no white pixels): nothing to fill")
    if keep_full.max() < 0.5:
        raise DataError(f"{mask_name}: the mask covers the whole image: DTC needs some of the photo as context")

    keep_pil = Image.fromarray(((keep_full[0] > 0.5).to(torch.uint8) * 255).numpy(), mode="L")

    model, frozen = load_models(args, dtype)
    baseline = None
    if args.explain:
        if not model.cfg.hint:
            raise CheckpointError(f"{args.dtc}: --explain shows what the hint does, and this model has no hint branch")
        if args.baseline:
            base_model, base_frozen = load_dtc(args.baseline, dtype=dtype)
            if base_model.cfg.hint:
                raise CheckpointError(f"{args.baseline} (--baseline): has a hint branch; the baseline shows a model "
                                      "without one (train.py --no_hint)")
            baseline = (base_model.to(device, dtype), base_frozen or frozen)
    model.to(device, dtype)
    frozen.vae.to(device, dtype)
    frozen.image_encoder.to(device, dtype)
    cfg = model.cfg
    w, h = cfg.working_size(W, H, args.size)

    source = to_tensor(source_pil.resize((w, h), Image.BICUBIC))[None].to(device)
    mask = F.interpolate(keep_full[None], size=(h, w), mode="nearest").to(device)
    if mask.max() < 0.5 or mask.min() > 0.5:
        raise DataError(f"{mask_name}: at {w}x{h} the mask is {'all' if mask.max() < 0.5 else 'no'} region to fill; "
                        "use a larger --size or a different mask")
    reference = to_tensor(reference_pil)[None].to(device)
    results = []
    autocast = torch.autocast(device, dtype=dtype, enabled=device == "cuda" and dtype != torch.float32)
    for i in range(args.num_samples):
        generator = torch.Generator().manual_seed(args.seed + i)  # CPU generator: same noise on every device
        with autocast:
            x, _ = generate(model, frozen, source, mask, reference, generator, args.steps, args.guidance, args.eta)
        result = to_pil(x[0].cpu()).resize((W, H), Image.BICUBIC)
        if not args.no_paste_back:  # every pixel outside the region to fill is the source's own
            result = Image.composite(source_pil, result, keep_pil)
        results.append(result)

    if args.explain:
        if baseline is not None and baseline[1] is not frozen:
            baseline[1].vae.to(device, dtype)
            baseline[1].image_encoder.to(device, dtype)
        target = None if target_pil is None else to_tensor(target_pil.resize((w, h), Image.BICUBIC))[None].to(device)
        with autocast:
            explained = explain(model, frozen, baseline, source, mask, reference, target, args)
    hint = to_pil(hint_image(model.cfg.hint_kind, reference.float().cpu(), mask.float().cpu(), source.float().cpu())[0] * 2 - 1)
    mask_pil = Image.eval(keep_pil, lambda v: 255 - v)  # white = filled, as the user drew it
    paths, grid_path, explain_path = output_paths(args)
    # all or nothing: the results and the pictures replace the earlier ones only once every one of them is written
    outputs = {**dict(zip(paths, results)), grid_path: grid([source_pil, mask_pil, reference_pil, hint, *results])}
    if args.explain:
        outputs[explain_path] = explained
    write_images(outputs)
    print(f"grid: {grid_path}")
    if args.explain:
        print(f"explain: {explain_path}")
    print(" ".join(paths))


def cli(argv=None):
    """Bad input ends with exit status 1 and one line naming the file and the problem, no traceback."""
    return run(main, argv)


if __name__ == "__main__":
    use_free_cores()
    sys.exit(cli())
