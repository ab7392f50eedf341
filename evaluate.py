"""
Evaluate a DTC checkpoint (or a folder of results of any method) in one of two ways.

1. A triplet folder with targets (source/, mask/, reference/, target/), with our own metrics:
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
  edge_energy  the results' squared neighbour differences inside the region (eroded by 2 px), over the
               targets': 1 = as much edge as the targets, a flat fill 0; a blur scores low (edge_energy says more)
  --fill=flat|hint|vae scores a trivial baseline instead of the model (trivial_fill), --zero_hint the model with
  its hint zeroed, --bootstrap=N adds 95 % intervals of the means (<metric>_lo, <metric>_hi).

2. A VITON-HD or DressCode release, with the paper's and the try-on field's metrics (the optional libraries of
   requirements-eval.txt; README, "Evaluating like the paper"):
    python evaluate.py --data=zalando-hd-resized --split=test --pairs=paired --dtc=... --clip=clip-vit-base-patch32
    python evaluate.py --data=DressCode --category=dresses --pairs=unpaired --pred_dir=other_method/ --clip=...

  Every pair of the split is sampled at the model's size (or read from --pred_dir: <name>.* or <person>.*),
  resized to --eval_size, and the person photo pasted back outside the mask (--no_repaint: not). Written to
  --out_dir as <name>.png: the person's file stem, paired, or <person stem>_<garment stem>, unpaired.
  clip_region  100 x cosine of CLIP image embeddings (ViT-B/32 for the paper): the result cropped to the mask's
               bounding box and resized to CLIP's input, against the garment image (Paint-by-Example's protocol)
  fid, kid     Frechet and kernel Inception distances of whole images against the split's person photos
               (torch-fidelity's Inception-v3, 2048-d pool features); kid_std over --kid_subsets subsets
  lpips, ssim  paired only: whole images against the person photo (LPIPS --lpips_net, SSIM Gaussian 11 / 1.5)
  psnr_masked, ssim_masked  paired only: ours, as above
  The protocol is printed above the numbers.

The last line printed is key=value pairs.
"""
import os
os.environ.setdefault("GOMP_SPINCOUNT", "2000")  # read once, when torch loads OpenMP: cli.use_free_cores says why
import argparse
import math
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from checkpoint import CheckpointError
from cli import (HelpFormatter, bad_option, check_files, check_folder, check_sampling_options, pick_device, run,
                 use_free_cores)
from data import (DRESSCODE_CATEGORIES, DataError, DressCodeDataset, TripletDataset, VitonHDDataset,
                  check_output_folder, find_layout, load_image, resize_image, to_pil, to_tensor, write_images)
from dtc import encode_image_tokens, generate, largest_rectangle, load_dtc, load_for_sampling, make_hint
from dinov2 import load_dinov2


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


def edge_energy(x, fill):
    """How much edge an image has inside the region: the squared differences between neighbouring pixels (summed
    over the channels, vertical and horizontal), summed over the region eroded by 2 px (so the region's own border,
    where the pasted-back source meets the fill, does not count). x (B,3,H,W), fill (B,1,H,W) -> (B,).
    Reported as a ratio, the results' total over the targets' (edge_energy=1: as much edge as the targets, a flat
    fill 0): a blurred result scores far below 1 even where its PSNR is fair."""
    dy, dx = (x[:, :, 1:, :] - x[:, :, :-1, :]) ** 2, (x[:, :, :, 1:] - x[:, :, :, :-1]) ** 2
    inner = -F.max_pool2d(-fill, 5, stride=1, padding=2)  # erosion by 2 px: a min filter of 5x5
    return (dy.sum(1, keepdim=True) * inner[:, :, 1:, :]).sum((1, 2, 3)) + \
        (dx.sum(1, keepdim=True) * inner[:, :, :, 1:]).sum((1, 2, 3))


def region_crop(x, fill):
    """The bounding box of the region to fill of each image, as a list of (3,h,w) crops."""
    crops = []
    for img, f in zip(x, fill):
        ys, xs = torch.nonzero(f[0] > 0.5, as_tuple=True)
        crops.append(img[:, ys.min():ys.max() + 1, xs.min():xs.max() + 1])
    return crops


@torch.no_grad()
def cls_features(encoder, images, encoder_input_size):
    """CLS features of a list of (3,h,w) [-1,1] images, one at a time (their sizes differ)."""
    return torch.cat([encode_image_tokens(encoder, im[None], encoder_input_size)[:, 0].float() for im in images])


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


def require_eval_libraries():
    try:
        import torchmetrics  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise ImportError(f"release evaluation needs the optional evaluation libraries ({e.name} is missing): "
                          "pip install -r requirements-eval.txt") from None


def to_uint8(x):
    """(B,3,H,W) in [-1,1] -> uint8 0..255, as the Inception network of torch-fidelity takes images."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class RegionCLIP:
    """Paint-by-Example's region CLIP score: the generated image cropped to the bounding box of the region to
    fill, resized (bicubic, antialiased, no centre crop, so the whole region is seen) to CLIP's input size,
    CLIP-normalised; 100 x cosine of its image embedding with the garment image's, treated the same way.
    `path`: a transformers CLIP folder (e.g. openai/clip-vit-base-patch32) or the name of one in the
    Hugging Face cache; nothing is downloaded."""

    def __init__(self, path, device):
        from transformers import CLIPVisionModelWithProjection
        from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
        try:
            self.model = CLIPVisionModelWithProjection.from_pretrained(path, local_files_only=True).to(device).eval()
        except OSError as e:
            raise CheckpointError(f"{path}: not a CLIP folder, nor one in the Hugging Face cache ({e})") from None
        self.size = self.model.config.image_size
        self.mean = torch.tensor(OPENAI_CLIP_MEAN, device=device)[:, None, None]
        self.std = torch.tensor(OPENAI_CLIP_STD, device=device)[:, None, None]

    @torch.no_grad()
    def embed(self, images):
        """A list of (3,h,w) images in [-1,1] -> (N, D) unit embeddings."""
        x = torch.cat([F.interpolate(im[None].float(), size=(self.size, self.size), mode="bicubic",
                                     antialias=True, align_corners=False) for im in images])
        x = ((x + 1) / 2).clamp(0, 1)
        return F.normalize(self.model(pixel_values=(x - self.mean) / self.std).image_embeds.float(), dim=-1)

    def score(self, pred, fill, reference):
        """pred (B,3,H,W), fill (B,1,H,W) 1 = region, reference (B,3,h,w) -> (B,) scores."""
        return 100 * (self.embed(region_crop(pred, fill)) * self.embed(list(reference))).sum(-1)


class Extracted(torch.nn.Module):
    """What FID and KID get in place of their feature network: features already extracted, passed through, so that
    the network runs once per image for both metrics (each would run it on every image it is given)."""

    def __init__(self, num_features):
        super().__init__()
        self.num_features = num_features  # read by torchmetrics instead of probing the network with an image

    def forward(self, features):
        return features


def field_metrics(args, paired, fid_feature, device, kid_size):
    """(feature network, metrics): the torchmetrics objects of the release protocol, FID and KID to be given the
    network's features of each image (update(network(images), real)). fid_feature: a module mapping uint8 (B,3,H,W)
    images to (B, num_features) features, in place of torch-fidelity's Inception-v3 (the library's hook for custom
    extractors); kid_size: images per KID subset (at most the number of images)."""
    from torchmetrics.image.fid import FrechetInceptionDistance, NoTrainInceptionV3
    from torchmetrics.image.kid import KernelInceptionDistance
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity
    from torchmetrics.image.ssim import StructuralSimilarityIndexMeasure
    if fid_feature is None:
        # torch-fidelity's own resize to 299 (TF1-style bilinear, no antialias): the numbers of the try-on
        # papers that call torch-fidelity directly; its pool3 features have 2048 dimensions
        fid_feature = NoTrainInceptionV3("inception-v3-compat", ["2048"], args.inception, antialias=False)
        fid_feature.num_features = 2048
    extracted = Extracted(fid_feature.num_features)
    with warnings.catch_warnings():  # KID keeps every feature vector: 8 KiB per image, fine for a test split
        warnings.filterwarnings("ignore", message="Metric `Kernel Inception Distance` will save")
        metrics = {"fid": FrechetInceptionDistance(extracted), "kid": KernelInceptionDistance(
            extracted, subsets=args.kid_subsets, subset_size=kid_size)}
    if paired:
        metrics["lpips"] = LearnedPerceptualImagePatchSimilarity(net_type=args.lpips_net, normalize=True)
        metrics["ssim"] = StructuralSimilarityIndexMeasure(data_range=1.0)
    return fid_feature.to(device).eval(), {k: m.to(device) for k, m in metrics.items()}


def parse_size(text):
    try:
        h, w = (int(v) for v in text.lower().split("x"))
        assert h > 0 and w > 0
    except (ValueError, AssertionError):
        raise argparse.ArgumentTypeError(f"expected HxW, e.g. 512x384, not {text!r}") from None
    return h, w


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--data", required=True, help="triplet folder with target/, or a VITON-HD or DressCode release (or "
                   "one DressCode category folder); required, no default")
    p.add_argument("--dtc", help="DTC checkpoint to sample with (and whose image encoder scores dino_i); default: none")
    p.add_argument("--pred_dir", help="score these images (named like the sources) instead of sampling; default: none")
    p.add_argument("--sd", help="VAE source when the checkpoint holds only the trainable parts; default: none")
    p.add_argument("--dinov2", help="DINOv2 hub file for the feature metrics (default: the model's own encoder)")
    p.add_argument("--features_from", help="a DTC checkpoint whose image encoder scores dino_i and fd_dino, so that "
                   "models with encoders of their own (the teaching models) are judged by one; default: none")
    p.add_argument("--out_dir", help="also write the generated images here; default: none")
    p.add_argument("--size", type=int, help="working size, 1 ... 2048, rounded as sample.py rounds it (default: the "
                   "model's training size; with --pred_dir and no model, 512)")
    p.add_argument("--steps", type=int, default=40, help="DDIM steps, 1 ... 1000 (paper: 40)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale, >= 0 (default: the model's stored "
                   "default; 5, the paper's, for models built from SD)")
    p.add_argument("--seed", type=int, default=0, help="batch b is sampled with seed + b; KID's subsets with seed; "
                   "0 ... 2^32 - 1")
    p.add_argument("--batch_size", type=int, default=16, help="images per batch")
    p.add_argument("--fill", default="model", choices=["model", "flat", "hint", "vae"],
                   help="triplet folders: what fills the region: the model's samples, or a trivial baseline (the "
                   "reference's mean colour, the pasted hint, the target through the VAE); see trivial_fill")
    p.add_argument("--zero_hint", action="store_true", help="sample with the hint image zeroed")
    p.add_argument("--bootstrap", type=int, default=0, help="triplet folders: N resamples for 95 %% intervals; 0 = off")
    p.add_argument("--fd_min", type=int, default=200, help="fewest images for which fd_dino is reported")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA when available")
    g = p.add_argument_group("releases (VITON-HD, DressCode)")
    g.add_argument("--split", default="test", choices=["test", "train"], help="the release's split to score")
    g.add_argument("--pairs", default="paired", choices=["paired", "unpaired"],
                   help="paired: the person's own garment (every metric); unpaired: another garment, no ground truth")
    g.add_argument("--category", default="all", choices=["all", *DRESSCODE_CATEGORIES],
                   help="DressCode only (a category folder as --data is that category)")
    g.add_argument("--limit", type=int, help="only the first N pairs (a quick look; not comparable numbers); "
                   "default: all")
    g.add_argument("--eval_size", type=parse_size, default=(512, 384), help="HxW every image is scored at")
    g.add_argument("--no_repaint", action="store_true", help="score the decoded pixels outside the mask too")
    g.add_argument("--clip", default="openai/clip-vit-base-patch32",
                   help="CLIP folder (transformers layout) or its name in the Hugging Face cache")
    g.add_argument("--inception", help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth (default: "
                   "torch-fidelity's cache, $TORCH_HOME/hub/checkpoints)")
    g.add_argument("--lpips_net", default="alex", choices=["alex", "vgg", "squeeze"],
                   help="LPIPS backbone (torchvision weights from $TORCH_HOME/hub/checkpoints)")
    g.add_argument("--kid_subsets", type=int, default=100, help="KID's random subsets (the mean and std are over them)")
    g.add_argument("--kid_subset_size", type=int, default=1000, help="images per KID subset, capped at the number "
                   "of images")
    return p.parse_args(argv)


@torch.no_grad()
def sample_batch(model, frozen, source, mask, reference, args, b):
    """Batch b sampled with its own seed -> (B,3,H,W) in [-1,1] (no paste-back). --zero_hint: with the hint
    image all zeros (an empty canvas), to measure what the hint contributes."""
    g = torch.Generator().manual_seed(args.seed + b)
    return generate(model, frozen, source, mask, reference, g, args.steps, args.guidance, zero_hint=args.zero_hint,
                    progress=False)


@torch.no_grad()
def trivial_fill(kind, vae, source, mask, reference, target):
    """What a method without a model gets, (B,3,H,W) in [-1,1], for the rows a model's number must stand beside:
    "flat" the reference's mean colour over its non-white pixels (the product, not its background); "hint" the
    hint's pixels inside its rectangle where they show the product, the flat colour elsewhere (pasting the
    hint); "vae" the target encoded and decoded (posterior mean), the ceiling of any latent model."""
    if kind == "vae":
        return vae.decode(vae.encode(target.to(next(vae.parameters()).dtype)).mean).float().clamp(-1, 1)
    product = (reference < 0.96).any(1, keepdim=True).float()  # (B,1,h,w): not the white background
    flat = ((reference * product).sum((2, 3), keepdim=True) / product.sum((2, 3), keepdim=True).clamp(min=1))
    flat = flat.expand_as(source).clone()
    if kind == "flat":
        return flat
    hint = make_hint(reference, mask) * 2 - 1
    for i in range(len(hint)):
        top, left, bottom, right = largest_rectangle(mask[i, 0])
        shows = torch.zeros_like(mask[i], dtype=torch.bool)
        shows[:, top:bottom, left:right] = (hint[i, :, top:bottom, left:right] < 0.9).any(0)
        flat[i] = torch.where(shows, hint[i], flat[i])
    return flat


def bootstrap_interval(values, resamples, seed=0):
    """95 % interval of the mean of per-image values (N,) over `resamples` resamplings of the images."""
    idx = torch.randint(0, len(values), (resamples, len(values)), generator=torch.Generator().manual_seed(seed))
    means = values.double()[idx].mean(1)
    return means.quantile(0.025).item(), means.quantile(0.975).item()


def save_images(out_dir, images, names):
    """A batch of results as out_dir/NAME.png, through data.write_images (all of the batch or none of it)."""
    write_images({os.path.join(out_dir, f"{name}.png"): to_pil(x.cpu()) for x, name in zip(images, names)})


def check_options(args):
    """Every option's meaning, checked before any model is loaded or image scored: a value out of range, a file or
    folder that is not there, or an option the chosen way of evaluating would ignore, is one line. Returns the layout
    of --data ("triplets", "vitonhd" or "dresscode") and the device; a DressCode category folder becomes its release
    and --category."""
    check_folder(args, "data")
    layout, root, category = find_layout(args.data)
    release = layout != "triplets"
    check_sampling_options(args)  # the ranges sample.py checks, from the same code
    for option, least in (("batch_size", 1), ("bootstrap", 0), ("fd_min", 2), ("kid_subsets", 1),
                          ("kid_subset_size", 2)):
        if getattr(args, option) < least:
            raise bad_option(args, option, f"must be at least {least}")
    if args.limit is not None and args.limit < 1:
        raise bad_option(args, "limit", "must be at least 1")
    if args.fill != "model" and (release or args.pred_dir):
        raise bad_option(args, "fill", "a trivial fill is scored on a triplet folder, not with --pred_dir or a release")
    if args.zero_hint and (args.fill != "model" or args.pred_dir):
        raise bad_option(args, "zero_hint", "zeroes the hint of the model's own samples: not with --fill or --pred_dir")
    if args.bootstrap and release:
        raise bad_option(args, "bootstrap", "intervals are given on triplet folders; a release's FID and KID have none")
    if category not in (None, "all"):  # --data is one category folder of a DressCode release
        if args.category not in ("all", category):
            raise bad_option(args, "category", f"--data={args.data} is the {category} folder of a DressCode release")
        args.data, args.category = str(root), category
    device = pick_device(args.device)  # --device=cuda without CUDA: said here, before any work
    check_files(args, "dtc", "sd", "dinov2", "features_from", "inception")
    check_folder(args, "pred_dir")
    if args.out_dir is not None:
        check_output_folder(args.out_dir, "--out_dir")
    return layout, device


def main(argv=None, fid_feature=None):
    """fid_feature: see field_metrics (tests pass a small random one)."""
    args = parse_args(argv)
    layout, device = check_options(args)
    if layout != "triplets":
        return evaluate_release(args, layout, device, fid_feature)
    if args.dtc is None and (args.pred_dir is None or args.dinov2 is None):
        raise CheckpointError("give --dtc (to sample and for its image encoder), or --pred_dir with --dinov2")
    # float32: the bundled files are float16, which is slow on a CPU
    model, frozen = load_for_sampling(args.dtc, args.sd, args.dinov2, torch.float32, device) if args.dtc else (None, None)
    encoder = load_dinov2(args.dinov2) if args.dinov2 else frozen.image_encoder
    encoder_input_size = model.cfg.encoder_input_size if (model is not None and not args.dinov2) else 224
    if args.features_from:
        judge, judge_frozen = load_dtc(args.features_from, dtype=torch.float32)
        if judge_frozen is None:
            raise CheckpointError(f"{args.features_from}: holds no image encoder")
        encoder, encoder_input_size = judge_frozen.image_encoder, judge.cfg.encoder_input_size
    # square; with a model rounded to its multiple, as sample.py rounds
    size = (args.size or 512) if model is None else model.cfg.working_size(1, 1, args.size)[0]
    if not os.path.isdir(os.path.join(args.data, "target")):
        raise DataError(f"{args.data}: no target/ folder: evaluation needs the ground truth")
    data = TripletDataset(args.data, size=(size, size), ref_size=(encoder_input_size,) * 2, train=False)
    preds = [find(args.pred_dir, name) for name, _ in data.samples] if args.pred_dir else None  # before any work
    encoder.to(device).eval()

    scores = {"psnr_masked": [], "ssim_masked": [], "dino_i": []}
    edges, target_edges = [], []
    gen_feats, target_feats = [], []
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size)
    for b, batch in enumerate(tqdm(loader, desc="evaluating")):
        source, mask = batch["source"].to(device), batch["mask"].to(device)
        target, reference = batch["target"].to(device), batch["reference"].to(device)
        if args.pred_dir:
            files = preds[b * args.batch_size: b * args.batch_size + len(source)]
            pred = torch.stack([to_tensor(load_image(f).resize((size, size))) for f in files]).to(device)
        else:
            pred = sample_batch(model, frozen, source, mask, reference, args, b) if args.fill == "model" else \
                trivial_fill(args.fill, frozen.vae, source, mask, reference, target)
        pred = pred * (1 - mask) + source * mask  # paste back: only the region is judged
        fill = 1 - mask
        p01, t01 = (pred + 1) / 2, (target + 1) / 2
        scores["psnr_masked"].append(psnr_masked(p01, t01, fill).cpu())
        scores["ssim_masked"].append(ssim_masked(p01, t01, fill).cpu())
        edges.append(edge_energy(p01, fill).cpu())
        target_edges.append(edge_energy(t01, fill).cpu())
        gen = cls_features(encoder, region_crop(pred, fill), encoder_input_size)
        ref = cls_features(encoder, list(reference), encoder_input_size)
        scores["dino_i"].append(F.cosine_similarity(gen, ref).cpu())
        gen_feats.append(gen.cpu())
        target_feats.append(cls_features(encoder, region_crop(target, fill), encoder_input_size).cpu())
        if args.out_dir:
            save_images(args.out_dir, pred, batch["name"])

    n = len(data)
    result = {k: torch.cat(v).mean().item() for k, v in scores.items()}
    if args.bootstrap:  # how much the means depend on which images were drawn
        for k, v in scores.items():
            result[f"{k}_lo"], result[f"{k}_hi"] = bootstrap_interval(torch.cat(v), args.bootstrap)
        print(f"the _lo/_hi values: 95 % bootstrap interval of the mean over {args.bootstrap} resamples of the images")
    result["edge_energy"] = (torch.cat(edges).sum() / torch.cat(target_edges).sum()).item()
    if n >= args.fd_min:
        result["fd_dino"] = frechet_distance(torch.cat(gen_feats), torch.cat(target_feats)).item()
    else:
        print(f"fd_dino skipped: {n} images < --fd_min={args.fd_min}")
    print(f"images={n} " + format_scores(result))
    return result


def format_scores(result):
    return " ".join(f"{k}={v:.4f}" if isinstance(v, float) and math.isfinite(v) else f"{k}={v}" for k, v in result.items())


def evaluate_release(args, layout, device, fid_feature):
    """Method 2 of the docstring; returns the scores and prints the protocol, then key=value pairs."""
    if args.dtc is None and args.pred_dir is None:
        raise CheckpointError("give --dtc (to sample every pair) or --pred_dir (results to score)")
    if args.pairs == "unpaired" and args.split == "train":
        raise DataError(f"{args.data}: the train split is paired only")
    require_eval_libraries()
    paired = args.pairs == "paired"
    release = {"vitonhd": "VITON-HD", "dresscode": f"DressCode ({args.category})"}[layout]

    def reader(size, ref_size):
        if layout == "vitonhd":
            return VitonHDDataset(args.data, args.split, size, ref_size, train=False, paired=paired)
        return DressCodeDataset(args.data, args.split, size, ref_size, train=False, paired=paired, category=args.category)

    clip = RegionCLIP(args.clip, device)
    scored = reader(args.eval_size, (clip.size, clip.size))  # person, mask and garment at the scoring sizes
    n = min(len(scored), args.limit or len(scored))
    if n < 2:
        raise DataError(f"{args.data}" + (f" --limit={args.limit}" if args.limit else "") +
                        f": FID and KID need at least 2 images, there are {n}")
    preds = None  # --pred_dir: every file found before any work
    if args.pred_dir:
        preds = [find(args.pred_dir, name, Path(paths["image"]).stem) for name, paths in scored.samples[:n]]
    model = frozen = None
    if args.pred_dir is None:
        model, frozen = load_for_sampling(args.dtc, args.sd, args.dinov2, torch.float32, device)
        size = model.cfg.working_size(1, 1, args.size)[0]  # square, rounded as sample.py rounds
        sampled = reader((size, size), (model.cfg.encoder_input_size,) * 2)  # what the model sees
    subset = lambda ds: torch.utils.data.Subset(ds, range(n))
    kid_size = min(args.kid_subset_size, n)
    network, metrics = field_metrics(args, paired, fid_feature, device, kid_size)
    scores = {"clip_region": [], "psnr_masked": [], "ssim_masked": []}
    loaders = [torch.utils.data.DataLoader(subset(scored), batch_size=args.batch_size)]
    if model is not None:
        loaders.append(torch.utils.data.DataLoader(subset(sampled), batch_size=args.batch_size))
    for b, batches in enumerate(tqdm(zip(*loaders), total=len(loaders[0]), desc="evaluating")):
        real, mask, garment = (batches[0][k].to(device) for k in ("source", "mask", "reference"))
        if model is None:
            files = preds[b * args.batch_size: b * args.batch_size + len(real)]
            pred = torch.stack([resize_image(to_tensor(load_image(f)), args.eval_size) for f in files]).to(device)
        else:
            s = batches[1]
            pred = sample_batch(model, frozen, s["source"].to(device), s["mask"].to(device), s["reference"].to(device), args, b)
            pred = torch.stack([resize_image(x, args.eval_size) for x in pred])
        if not args.no_repaint:
            pred = pred * (1 - mask) + real * mask  # the field's "repaint": the person's own pixels outside the mask
        fill = 1 - mask
        scores["clip_region"].append(clip.score(pred, fill, garment).cpu())
        with torch.no_grad():  # the network runs once per image: FID and KID share its features
            real_features, pred_features = network(to_uint8(real)), network(to_uint8(pred))
        for name in ("fid", "kid"):
            metrics[name].update(real_features, real=True)
            metrics[name].update(pred_features, real=False)
        if paired:
            p01, t01 = (pred + 1) / 2, (real + 1) / 2
            metrics["lpips"].update(p01, t01)
            metrics["ssim"].update(p01, t01)
            scores["psnr_masked"].append(psnr_masked(p01, t01, fill).cpu())
            scores["ssim_masked"].append(ssim_masked(p01, t01, fill).cpu())
        if args.out_dir:
            save_images(args.out_dir, pred, batches[0]["name"])

    result = {"clip_region": torch.cat(scores["clip_region"]).mean().item(), "fid": metrics["fid"].compute().item()}
    with torch.random.fork_rng(devices=[]):  # KID's subsets come from torch's global RNG: seeded, and restored
        torch.manual_seed(args.seed)
        kid, kid_std = metrics["kid"].compute()
    result.update(kid=kid.item(), kid_std=kid_std.item())
    if paired:
        result.update(lpips=metrics["lpips"].compute().item(), ssim=metrics["ssim"].compute().item(),
                      psnr_masked=torch.cat(scores["psnr_masked"]).mean().item(),
                      ssim_masked=torch.cat(scores["ssim_masked"]).mean().item())
    H, W = args.eval_size
    backbone = ("torch-fidelity Inception-v3 pool3 (2048-d; its TF1-style resize to 299x299)" if fid_feature is None
                else f"custom {type(fid_feature).__name__}")
    generated = (f"read from {args.pred_dir}" if model is None else
                 f"sampled at {size}x{size} ({args.steps} DDIM steps, guidance "
                 f"{model.cfg.guidance if args.guidance is None else args.guidance}, seed {args.seed})")
    c = f"{clip.size}x{clip.size}"
    print(f"protocol: {release} {args.split}, {args.pairs}, {n} images" + (f" (--limit={args.limit})" if args.limit else ""))
    print(f"  images: {generated}, resized to {W}x{H} (W x H, bilinear, antialiased); paste-back (repaint) "
          f"{'off' if args.no_repaint else 'on'}; region: the parse-map labels, dilated by 5/256 of the width")
    print(f"  clip_region: {args.clip} image embeddings; result cropped to the mask's bounding box, resized to {c} "
          f"(bicubic, no centre crop), CLIP mean/std; garment resized to {c}; 100 x cosine, mean")
    print(f"  fid, kid: {backbone}; whole images at {W}x{H}; real set: the {n} person photos; kid: cubic "
          f"polynomial kernel, {args.kid_subsets} subsets of {kid_size}, seed {args.seed}, unscaled")
    if paired:
        print(f"  lpips: {args.lpips_net} LPIPS v0.1; ssim: Gaussian 11, sigma 1.5, data range 1; whole images at "
              f"{W}x{H} against the person photo; psnr_masked, ssim_masked: ours, on the region")
    print(f"images={n} pairs={args.pairs} " + format_scores(result))
    return result


def find(folder, name, fallback=None):
    for stem in (name, fallback) if fallback else (name,):
        for ext in (".png", ".jpg", ".jpeg", ".webp"):
            if os.path.isfile(os.path.join(folder, stem + ext)):
                return os.path.join(folder, stem + ext)
    raise DataError(f"{folder}: no image named {name}.*" + (f" or {fallback}.*" if fallback else ""))


if __name__ == "__main__":
    use_free_cores()
    sys.exit(run(main, errors=(CheckpointError, DataError, ImportError)))
