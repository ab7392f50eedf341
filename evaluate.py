"""
Evaluate a DTC checkpoint on a triplet folder with targets (source/, mask/, reference/, target/).

    python evaluate.py --dtc=assets/dtc_tiny.safetensors --data=heldout/
    python evaluate.py --pred_dir=my_results/ --data=heldout/ --dtc=...   # score existing images instead

Metrics, all on the region to fill (the mask), after pasting the source back outside it:
  psnr_masked  PSNR of the masked pixels against the target, images in [0,1] (inf when identical)
  ssim_masked  SSIM (Gaussian window 11, sigma 1.5, Wang et al. 2004 constants) averaged over the masked pixels
  dino_i       cosine similarity of image-encoder CLS features of the generated region (its bounding box,
               resized to the encoder's input) and of the reference (DreamBooth's DINO score, with the model's
               own frozen encoder, --dinov2, or the encoder of --features_from)
  fd_dino      Frechet distance of the same features between generated and target regions; only for
               >= --fd_min images, because a covariance from a few samples is meaningless
The last line printed is key=value pairs.
"""
import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F
from tqdm import tqdm

from checkpoint import CheckpointError
from data import DataError, TripletDataset, load_image, to_pil, to_tensor
from dtc import Schedule, encode_image_tokens, load_dtc, prepare, sample_latents
from dinov2 import load_dinov2
from vae import LATENT_SCALE


def psnr_masked(pred, target, fill):
    """pred, target (B,3,H,W) in [0,1]; fill (B,1,H,W) 1 = region to fill -> (B,) in dB."""
    err = ((pred - target) ** 2 * fill).sum((1, 2, 3)) / (3 * fill.sum((1, 2, 3)))
    return 10 * torch.log10(1 / err)  # err = 0 gives inf


def ssim_map(x, y, window=11, sigma=1.5):
    """The SSIM map of Wang et al. 2004 for images in [0,1] (B,3,H,W): Gaussian statistics, C1=(0.01)^2, C2=(0.03)^2."""
    coords = torch.arange(window, dtype=torch.float64) - window // 2
    g = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    g = (g / g.sum()).to(x.dtype)
    kernel = (g[:, None] * g[None, :]).expand(x.shape[1], 1, window, window)
    blur = lambda t: F.conv2d(F.pad(t, [window // 2] * 4, mode="reflect"), kernel, groups=x.shape[1])
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    return ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))


def ssim_masked(pred, target, fill):
    m = ssim_map(pred.double(), target.double()).mean(1, keepdim=True)
    return (m * fill).sum((1, 2, 3)) / fill.sum((1, 2, 3))


def region_crop(x, fill):
    """The bounding box of the region to fill of each image, as a list of (3,h,w) crops."""
    crops = []
    for img, f in zip(x, fill):
        ys, xs = torch.nonzero(f[0] > 0.5, as_tuple=True)
        crops.append(img[:, ys.min():ys.max() + 1, xs.min():xs.max() + 1])
    return crops


@torch.no_grad()
def cls_features(encoder, images, image_size):
    """CLS features of a list of (3,h,w) [-1,1] images, one at a time (their sizes differ)."""
    return torch.cat([encode_image_tokens(encoder, im[None], image_size)[:, 0].float() for im in images])


def frechet_distance(a, b):
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^1/2), in float64; tr (S_a S_b)^1/2 = sum of the square
    roots of the eigenvalues of S_a^1/2 S_b S_a^1/2, which is symmetric, so eigh is exact enough."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.cov(a.T), torch.cov(b.T)
    w, v = torch.linalg.eigh(s_a)
    root_a = v @ torch.diag(w.clamp(min=0).sqrt()) @ v.T
    cross = torch.linalg.eigvalsh(root_a @ s_b @ root_a).clamp(min=0).sqrt().sum()
    return ((mu_a - mu_b) ** 2).sum() + s_a.trace() + s_b.trace() - 2 * cross


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="triplet folder with target/")
    p.add_argument("--dtc", help="DTC checkpoint to sample with (and whose image encoder scores dino_i)")
    p.add_argument("--pred_dir", help="score these images (named like the sources) instead of sampling")
    p.add_argument("--sd", help="VAE source when the checkpoint holds only the trainable parts")
    p.add_argument("--dinov2", help="DINOv2 hub file for the feature metrics (default: the model's own encoder)")
    p.add_argument("--features_from", help="a DTC checkpoint whose image encoder scores dino_i and fd_dino, so that "
                   "models with encoders of their own (the teaching models) are judged by one")
    p.add_argument("--out_dir", help="also write the generated images here")
    p.add_argument("--size", type=int, default=None, help="working size (default: the model's training size)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--fd_min", type=int, default=200, help="fewest images for which fd_dino is reported")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.dtc is None and (args.pred_dir is None or args.dinov2 is None):
        raise CheckpointError("give --dtc (to sample and for its image encoder), or --pred_dir with --dinov2")
    model, frozen = load_dtc(args.dtc) if args.dtc else (None, None)
    if model is not None and frozen is None:
        from dtc import from_original
        _, frozen = from_original(args.sd, args.dinov2)
    encoder = load_dinov2(args.dinov2) if args.dinov2 else frozen.image_encoder
    image_size = model.cfg.image_size if (model is not None and not args.dinov2) else 224
    if args.features_from:
        judge, judge_frozen = load_dtc(args.features_from)
        if judge_frozen is None:
            raise CheckpointError(f"{args.features_from}: holds no image encoder")
        encoder, image_size = judge_frozen.image_encoder, judge.cfg.image_size
    size = args.size or (512 if model is None or model.cfg.unet.model_channels >= 320 else 64)
    if not os.path.isdir(os.path.join(args.data, "target")):
        raise DataError(f"{args.data}: no target/ folder: evaluation needs the ground truth")
    data = TripletDataset(args.data, size=(size, size), ref_size=(image_size, image_size), train=False)
    for m in (model, frozen.vae if frozen else None, encoder):
        if m is not None:
            m.to(device).eval()

    scores = {"psnr_masked": [], "ssim_masked": [], "dino_i": []}
    gen_feats, target_feats = [], []
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size)
    for b, batch in enumerate(tqdm(loader, desc="evaluating")):
        source, mask = batch["source"].to(device), batch["mask"].to(device)
        target, reference = batch["target"].to(device), batch["reference"].to(device)
        if args.pred_dir:
            pred = torch.stack([to_tensor(load_image(find(args.pred_dir, n)).resize((size, size))) for n in batch["name"]])
            pred = pred.to(device)
        else:
            g = torch.Generator().manual_seed(args.seed + b)
            cond = prepare(frozen, source, mask, reference, model.cfg.image_size, g)
            z = sample_latents(model, Schedule(), cond, args.steps, args.guidance, generator=g, progress=False)
            pred = frozen.vae.decode(z / LATENT_SCALE).clamp(-1, 1)
        pred = pred * (1 - mask) + source * mask  # paste back: only the region is judged
        fill = 1 - mask
        p01, t01 = (pred + 1) / 2, (target + 1) / 2
        scores["psnr_masked"].append(psnr_masked(p01, t01, fill).cpu())
        scores["ssim_masked"].append(ssim_masked(p01, t01, fill).cpu())
        gen = cls_features(encoder, region_crop(pred, fill), image_size)
        ref = cls_features(encoder, list(reference), image_size)
        scores["dino_i"].append(F.cosine_similarity(gen, ref).cpu())
        gen_feats.append(gen.cpu())
        target_feats.append(cls_features(encoder, region_crop(target, fill), image_size).cpu())
        if args.out_dir:
            os.makedirs(args.out_dir, exist_ok=True)
            for x, name in zip(pred, batch["name"]):
                tmp = os.path.join(args.out_dir, f"{name}.tmp.png")
                to_pil(x.cpu()).save(tmp)
                os.replace(tmp, os.path.join(args.out_dir, f"{name}.png"))

    n = len(data)
    result = {k: torch.cat(v).mean().item() for k, v in scores.items()}
    if n >= args.fd_min:
        result["fd_dino"] = frechet_distance(torch.cat(gen_feats), torch.cat(target_feats)).item()
    else:
        print(f"fd_dino skipped: {n} images < --fd_min={args.fd_min}")
    print(f"images={n} " + " ".join(f"{k}={v:.4f}" if math.isfinite(v) else f"{k}={v}" for k, v in result.items()))
    return result


def find(folder, name):
    for ext in (".png", ".jpg", ".jpeg", ".webp"):
        if os.path.isfile(os.path.join(folder, name + ext)):
            return os.path.join(folder, name + ext)
    raise DataError(f"{folder}: no image named {name}.*")


if __name__ == "__main__":
    try:
        main()
    except (CheckpointError, DataError) as e:
        print(f"error: {'; '.join(line.strip() for line in str(e).splitlines())}", file=sys.stderr)
        sys.exit(1)
