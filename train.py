"""
Train Diffuse to Choose: one plain PyTorch loop, read top to bottom.

    python train.py --preset=tiny --out_dir=runs/tiny        # from scratch on the teaching world, on a CPU
    python train.py --preset=sd15 --sd=v1-5-pruned-emaonly.safetensors --dinov2=dinov2_vitg14_pretrain.pth \\
        --vgg_weights=vgg19-dcbb9e9d.pth --data=zalando-hd-resized --out_dir=runs/vitonhd --grad_checkpointing
    torchrun --nproc_per_node=8 train.py --preset=sd15 ...   # DDP: global batch = batch_size x GPUs x grad_accum
    python train.py --out_dir=runs/vitonhd --resume          # continue OUT_DIR/ckpt.pt (Ctrl-C and SIGTERM save one)

Presets (the PRESETS table below):
  sd15  the paper's recipe (§4.1, supp. §5.2): DTC built from SD 1.5 and DINOv2 g/14 (dtc.from_original), 512x512,
        AdamW 1e-5 constant, eps-MSE + 1e-3 x VGG loss on the decoded x0 estimate, guidance dropout 0.2 per sample.
        Trained: main U-Net, hint encoder, adapter, fusion convs, token_proj, null_context. Frozen: VAE, DINOv2.
  tiny  the same architecture, narrow, from scratch on 64x64 images (16x16 latents). Its frozen VAE is the bundled
        model's (assets/dtc_tiny.safetensors; --init_vae takes another's), as SD users take SD's; --vae_steps=N
        trains one first instead (train_vae). The teaching world is drawn once before training (PreDrawn). The tiny
        image encoder has no pretrained weights, so it is trained jointly with DTC (sd15 keeps DINOv2 frozen). Three
        choices make minutes of training enough: one GroupNorm group in the narrow VAE, an init that passes
        signals through (init_from_scratch) and v-prediction (DTCConfig.prediction). About 8 min on 2 free CPU cores.
--data: a VITON-HD release (train_pairs.txt + train/), a DressCode release (its three categories) or one category
folder of it (e.g. DressCode/dresses), or a triplet folder (data.py); tiny without --data trains on the generated
teaching world.

Out: OUT_DIR/ckpt.pt (everything needed to resume), log.jsonl (one line per optimizer step), samples/step_*.png
(source | mask | reference | hint | sample), loss.png, and at the end dtc.safetensors (EMA weights when --ema is on),
which `python sample.py --dtc=OUT_DIR/dtc.safetensors` loads.

Reproducibility. The data order and every random draw of a step (VAE posterior samples, guidance dropout, t, noise)
come from generators keyed by (seed, step, micro-batch), where micro-batch m of a step is samples [m*b, (m+1)*b) of
its global batch, and rank r computes m = r*grad_accum ... r*grad_accum + grad_accum - 1. So a resumed run repeats
the uninterrupted one exactly, and one process with grad_accum = N x A reproduces N processes with grad_accum = A
(same batch_size; bit for bit with the same thread count: torchrun sets OMP_NUM_THREADS=1). Each option also
accepts --key=value.
"""
import os
os.environ.setdefault("GOMP_SPINCOUNT", "2000")  # read once, when torch loads OpenMP: cli.use_free_cores says why
import argparse
import itertools
import json
import math
import random
import signal
import sys
import time
from contextlib import nullcontext
from functools import partial
from dataclasses import asdict, dataclass, replace

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, default_collate
from tqdm import tqdm

from checkpoint import CheckpointError, first_sentence, load_pickle
from cli import HelpFormatter, Interrupted, bad_option, check_dtype, check_files, check_folder, run, use_free_cores
from data import (DataError, DressCodeDataset, TripletDataset, VitonHDDataset, check_output_folder, find_layout, grid,
                  keyed_generator, mask_to_pil, to_pil)
from diffusion import Schedule
from dinov2 import DINOv2
from dtc import (HINT_KINDS, TINY_ENCODER, TINY_VAE, TRAINED, DiffuseToChoose, Frozen, VGGLoss, diffusion_loss,
                 encode_image_tokens, freeze_for, from_original, generate, hint_image, init_from_scratch, latent_mask,
                 load_dtc, prepare, save_dtc, tiny_config)
from vae import LATENT_SCALE, AutoencoderKL, DiagonalGaussian, fold_latent_scale
from world import TeachingWorld

# Keys of the random streams (data.keyed_generator): each draw of a run has a stream of its own, keyed by one of
# these and the seed (and where it varies, the epoch, step or micro-batch), so resuming or changing one part of a
# run never shifts the draws of another. The values are arbitrary; changing one changes the runs it seeds.
STREAM_DTC_INIT = 0x1418        # the tiny DTC's from-scratch weights (main U-Net, hint encoder)
STREAM_VAE_INIT = 0x1417        # the tiny VAE's from-scratch weights
STREAM_EPOCH_ORDER = 0x0D       # each epoch's sample order (with the epoch)
STREAM_VAE_POSTERIOR = 0x7AE    # the VAE phase's posterior samples (with the step)
STREAM_DTC_STEP = 0x57E9        # a DTC step's latents, noise, timesteps and guidance drops (with step, micro-batch)


# -----------------------------------------------------------------------------
# 1. Options and presets

BUNDLED_TINY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "dtc_tiny.safetensors")


@dataclass
class Preset:
    size: int              # training resolution (square)
    batch_size: int        # per process and micro-step
    lr: float
    max_steps: int
    save_every: int
    sample_every: int
    num_workers: int
    init_vae: str = None   # tiny: the dtc.safetensors whose frozen VAE it starts from
    vae_steps: int = 0     # tiny: autoencoder steps of a VAE trained from scratch instead (with --vae_steps)
    vae_batch_size: int = 0
    vae_lr: float = 0.0
    vae_kl: float = 0.0    # weight of the KL term (per latent element) against the L1 (per pixel)
    vae_edge: float = 0.0  # weight of the L1 of the image gradients against the L1 (train_vae)
    world_samples: int = 0  # tiny without --data: the teaching world's training samples, drawn once (PreDrawn)
    lr_schedule: str = "constant"  # or "cosine": 5 % linear warm-up, then a cosine to zero at max_steps


PRESETS = {
    # 15k steps at a global batch of 32 (4 x 8 GPUs) is ~40 epochs of VITON-HD's 11,647 pairs (paper §4.1: 40 epochs)
    "sd15": Preset(size=512, batch_size=4, lr=1e-5, max_steps=15_000, save_every=1000, sample_every=1000, num_workers=4),
    # num_workers: the processes that draw the teaching world before training (both cores; none run during it)
    "tiny": Preset(size=64, batch_size=32, lr=1e-3, max_steps=1200, save_every=200, sample_every=200, num_workers=2,
                   init_vae=BUNDLED_TINY, vae_batch_size=8, vae_lr=1e-3, vae_kl=1e-6, vae_edge=1.0,
                   world_samples=10_000, lr_schedule="cosine"),
}
# what a resumed run may change (files may have moved); every other option comes from the checkpoint
CHANGEABLE = {"max_steps", "save_every", "sample_every", "log_every", "num_workers", "device", "data", "sd", "dinov2",
              "vgg_weights"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--preset", default="tiny", choices=list(PRESETS), help="the recipe (see Presets above)")
    p.add_argument("--data", help="VITON-HD release, DressCode release (all categories) or one of its category "
                   "folders, or a triplet folder (default: tiny trains on the teaching world; sd15 needs one)")
    p.add_argument("--out_dir", default="runs/dtc", help="the run's folder (made when training starts)")
    p.add_argument("--resume", action="store_true", help="continue from OUT_DIR/ckpt.pt (a fresh start if none)")
    p.add_argument("--sd", help="sd15: SD 1.5, SD 1.5-inpainting or Paint-by-Example single file; default: none")
    p.add_argument("--dinov2", help="sd15: DINOv2 hub file, e.g. dinov2_vitg14_pretrain.pth; default: none")
    p.add_argument("--vgg_weights", help="torchvision vgg19 file (default: none, and the perceptual loss is off)")
    p.add_argument("--vgg_weight", type=float, default=1e-3, help="lambda of the VGG loss (docs/method.md §3.1)")
    p.add_argument("--p_uncond", type=float, default=0.2, help="guidance dropout per sample (the hint is kept)")
    p.add_argument("--max_steps", type=int, help="optimizer steps (default: the preset's)")
    p.add_argument("--vae_steps", type=int, help="tiny: train a VAE from scratch for this many autoencoder steps "
                   "first, instead of taking --init_vae's (default: the preset's, 0)")
    p.add_argument("--vae_batch_size", type=int, help="tiny: the autoencoder phase's batch, at most --batch_size "
                   "(default: the preset's)")
    p.add_argument("--vae_lr", type=float, help="tiny: the autoencoder phase's AdamW learning rate (default: the "
                   "preset's)")
    p.add_argument("--vae_kl", type=float, help="tiny: weight of the autoencoder's KL term against its L1 (default: "
                   "the preset's)")
    p.add_argument("--vae_edge", type=float, help="tiny: weight of the autoencoder's image-gradient L1 against its L1 "
                   "(default: the preset's)")
    p.add_argument("--init_vae", help="tiny: take the frozen VAE of this dtc.safetensors (default: the bundled "
                   "model's, assets/dtc_tiny.safetensors, unless --vae_steps trains one)")
    p.add_argument("--world_samples", type=int, help="tiny without --data: distinct teaching-world samples, drawn "
                   "once before training (default: the preset's, or as many as a shorter run sees)")
    p.add_argument("--batch_size", type=int, help="per process and micro-step (default: the preset's)")
    p.add_argument("--grad_accum", type=int, default=1, help="micro-steps per optimizer step")
    p.add_argument("--lr", type=float, help="AdamW learning rate, the peak of a cosine schedule (default: the preset's; "
                   "sd15: 1e-5)")
    p.add_argument("--lr_schedule", choices=["constant", "cosine"], help="constant (sd15, the paper's), or cosine: 5 %% "
                   "linear warm-up, then a cosine to zero at --max_steps (tiny) (default: the preset's)")
    p.add_argument("--weight_decay", type=float, default=0.01, help="AdamW (torch's and PBE's default)")
    p.add_argument("--clip_grad", type=float, default=1.0, help="max gradient norm; 0 = off")
    p.add_argument("--ema", type=float, default=0.0, help="EMA decay of the weights, e.g. 0.9999; 0 = off")
    p.add_argument("--size", type=int, help="training resolution (default: the preset's; sd15: 512, tiny: 64)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA when available")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                   help="autocast dtype (auto: bfloat16 on GPU, float32 on CPU); the weights stay float32")
    p.add_argument("--grad_checkpointing", action="store_true", help="recompute U-Net blocks in backward")
    p.add_argument("--train", default="all", choices=TRAINED,
                   help="all: every part of the DTC model (the paper); hint: the main U-Net frozen as initialised, "
                   "the hint encoder, adapter (none with --hint_kind=latent), fusion, token projection and null "
                   "context trained (ControlNet's recipe, for one 24 GB GPU: memory per batch size in the README)")
    p.add_argument("--save_every", type=int, help="steps between checkpoints (default: the preset's)")
    p.add_argument("--sample_every", type=int, help="steps between sample grids, and one at the last step; 0 = none "
                   "(default: the preset's)")
    p.add_argument("--log_every", type=int, default=50, help="steps between printed lines (log.jsonl has all)")
    p.add_argument("--seed", type=int, default=0, help="keys every random draw of the run (data order, init, noise)")
    p.add_argument("--num_workers", type=int, help="DataLoader worker processes (default: the preset's)")
    p.add_argument("--skip_bad", action="store_true", help="skip bad samples with a warning instead of stopping")
    p.add_argument("--overfit_batch", action="store_true",
                   help="debugging: one fixed batch with fixed t and noise every step; the loss must fall")
    # DTC variants for the ablations (paper §4.3 and Table 2)
    p.add_argument("--image_tokens", default="all", choices=["all", "cls"], help="cls: PBE-style, CLS token only")
    p.add_argument("--no_hint", dest="hint", action="store_false", help="no hint branch (the PBE-style baseline)")
    p.add_argument("--fusion", default="film", choices=["film", "add", "xattn"],
                   help="how the hint features enter the main U-Net's skips (paper Table 1)")
    p.add_argument("--hint_input", default="full", choices=["full", "latent_only"],
                   help="the hint encoder's input: full = [z_t, z_masked + adapter(hint), mask], t, context; "
                   "latent_only = z_masked + adapter(hint) alone, computed once per image")
    p.add_argument("--hint_kind", default="image", choices=list(HINT_KINDS),
                   help="what the hint shows (paper §4.3): image = the reference in the mask's largest rectangle (DTC); "
                   "edges = its Sobel edges; latent = the reference pasted into the masked source, VAE-encoded, no adapter")
    p.add_argument("--misalign", type=float, default=0.0, help="tiny without --data: how far the worn product departs "
                   "from the hint's rectangle (shift, scale, turn, sleeves, folds, shading); 0 = aligned, 1 = strong")
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    for key in ("size", "batch_size", "lr", "max_steps", "save_every", "sample_every", "num_workers", "vae_steps",
                "vae_batch_size", "vae_lr", "vae_kl", "vae_edge", "lr_schedule"):  # every Preset field but 2 below
        if getattr(args, key) is None:
            setattr(args, key, getattr(preset, key))
    if args.world_samples is None:  # no more samples than the run will see: a smoke run draws a small world
        seen = max(1, args.max_steps) * args.batch_size * args.grad_accum * int(os.environ.get("WORLD_SIZE", 1))
        args.world_samples = min(preset.world_samples, seen)
    if args.init_vae is None and not args.vae_steps:  # a VAE is taken unless one is trained
        args.init_vae = preset.init_vae
    return args


def check_options(args):
    """Every option's meaning, checked before any model is built or file written: each problem is one line.
    Returns the device ("cpu" or "cuda") and dtype picked for "auto"."""
    for option, least in (("batch_size", 1), ("grad_accum", 1), ("max_steps", 0), ("vae_steps", 0), ("save_every", 1),
                          ("sample_every", 0), ("log_every", 1), ("num_workers", 0)):
        if getattr(args, option) < least:
            raise bad_option(args, option, f"must be at least {least}")
    for option, hi in (("weight_decay", math.inf), ("clip_grad", math.inf), ("p_uncond", 1), ("vgg_weight", math.inf),
                       ("vae_kl", math.inf), ("vae_edge", math.inf)):
        if not (math.isfinite(getattr(args, option)) and 0 <= getattr(args, option) <= hi):
            raise bad_option(args, option, f"must be a finite number >= 0{'' if hi == math.inf else f' and <= {hi}'}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise bad_option(args, "lr", "must be a finite number > 0")
    if args.preset == "tiny" and args.data is None and args.world_samples < 1:
        raise bad_option(args, "world_samples", "must be at least 1 (the teaching world's training samples)")
    if args.vae_steps and args.init_vae:
        raise bad_option(args, "init_vae", "takes a trained VAE and --vae_steps trains a new one: give one of them")
    if args.vae_steps and not (math.isfinite(args.vae_lr) and args.vae_lr > 0):
        raise bad_option(args, "vae_lr", "must be a finite number > 0 (the autoencoder phase trains with it)")
    if args.vae_steps and args.vae_batch_size < 1:
        raise bad_option(args, "vae_batch_size", "must be at least 1 (the autoencoder phase trains with it)")
    if not (math.isfinite(args.misalign) and args.misalign >= 0):
        raise bad_option(args, "misalign", "must be a finite number >= 0 (0: the hint lines up with the product)")
    if args.misalign and (args.data is not None or args.preset != "tiny"):
        raise bad_option(args, "misalign", "draws the teaching world: it needs the tiny preset without --data")
    if not 0 <= args.ema < 1:
        raise bad_option(args, "ema", "the EMA decay must be >= 0 and < 1 (0: off)")
    if args.size < 1:
        raise bad_option(args, "size", "the training resolution must be a positive number of pixels")
    if not 0 <= args.seed < 2 ** 63:
        raise bad_option(args, "seed", "must be 0 ... 2^63 - 1")
    if args.train == "hint" and not args.hint:
        raise bad_option(args, "train", "trains the hint branch, and --no_hint has none")
    device, dtype = check_dtype(args)  # --device=cuda without CUDA, --dtype the device lacks: said before any work
    check_files(args, "sd", "dinov2", "vgg_weights", "init_vae")
    check_folder(args, "data")
    check_output_folder(args.out_dir, "--out_dir")
    return device, dtype


# -----------------------------------------------------------------------------
# 2. Building: the model, the frozen parts, the data


class Trainee(nn.Module):
    """Everything the optimizer updates, as one module (DDP wraps one): the DTC model and, in the tiny preset, its
    image encoder. forward = dtc.diffusion_loss, with the reference tokens computed here, WITH gradients, when the
    image encoder trains (a frozen one's come from dtc.prepare)."""

    def __init__(self, model, image_encoder=None):
        super().__init__()
        self.model, self.image_encoder = model, image_encoder
        self.schedule = Schedule()

    def forward(self, cond, encoder_reference, generator, drop):
        if self.image_encoder is not None:
            tokens = encode_image_tokens(self.image_encoder, encoder_reference, self.model.cfg.encoder_input_size)
            cond = dict(cond, tokens=tokens)
        return diffusion_loss(self.model, self.schedule, cond, generator, drop)


def build_model(args):
    """(trainee, frozen), float32 (autocast computes in bfloat16 on GPU)."""
    variant = dict(image_tokens=args.image_tokens, hint=bool(args.hint), fusion=args.fusion, hint_input=args.hint_input,
                   hint_kind=args.hint_kind)
    if args.preset == "sd15":
        if not args.sd or not args.dinov2:
            raise CheckpointError("the sd15 preset needs --sd (an SD 1.5 file) and --dinov2 (a DINOv2 hub file)")
        model, frozen = from_original(args.sd, args.dinov2, dtype=torch.float32, seed=args.seed,
                                      train_size=args.size, **variant)
        return Trainee(freeze_for(model, args.train)), frozen
    encoder = DINOv2(replace(TINY_ENCODER, img_size=args.size))
    encoder.mask_token.requires_grad_(False)  # for DINOv2's own masked-patch training: unused here
    cfg = tiny_config(args.size, **variant)
    model = DiffuseToChoose(cfg)
    # one fresh generator per part, on the same key: with the full hint input the hint encoder's convs start equal
    # to the main encoder's (ControlNet's copy; with latent_only its 4-channel conv_in shifts the draws after it).
    # The VAE's init is in train_vae
    for part in (model.unet, model.hint_encoder) if cfg.hint else (model.unet,):
        init_from_scratch(part, keyed_generator(STREAM_DTC_INIT, args.seed))
    return Trainee(freeze_for(model, args.train), encoder), Frozen(vae=AutoencoderKL(TINY_VAE), image_encoder=encoder)


def build_dataset(args, ref_size, train=True):
    """The dataset of the layout --data holds (data.find_layout, the rule evaluate.py reads it by too): a VITON-HD
    or DressCode release, one DressCode category, or a triplet folder; tiny without --data: the teaching world."""
    if args.data is None:
        if args.preset != "tiny":
            raise DataError("--data is required (a VITON-HD or DressCode release, or a triplet folder)")
        return TeachingWorld(args.size, "train" if train else "heldout", length=args.world_samples if train else 4,
                             seed=args.seed, ref_size=ref_size, misalign=args.misalign)
    common = dict(train=train, seed=args.seed, skip_bad=args.skip_bad)
    layout, root, category = find_layout(args.data)
    if layout == "vitonhd":
        return VitonHDDataset(root, "train", args.size, ref_size, **common)
    if layout == "dresscode":
        return DressCodeDataset(root, "train", args.size, ref_size, category=category, **common)
    return TripletDataset(root, args.size, ref_size, **common)


def check_enough_samples(dataset, args, b, accum, ranks=1):
    """The global batch G = b x ranks x accum, or a DataError when the data holds fewer than G samples."""
    G = b * ranks * accum
    if len(dataset) < G:
        raise DataError(f"{args.data or 'the teaching world'}: {len(dataset)} samples, fewer than one global batch "
                        f"({G} = --batch_size={b} x {ranks} processes x --grad_accum={accum})")
    return G


def micro_batches(dataset, args, b, accum, ranks=1, rank=0, epoch=0, position=0):
    """Yields (epoch, position, [this rank's accum micro-batches of b]) per optimizer step, forever, starting at
    step `position` of `epoch`. The epoch's order is a permutation keyed by (seed, epoch) alone; step s takes
    samples [s G, (s+1) G) of it (G = b ranks accum) and rank r its micro-batches r accum ... r accum + accum - 1."""
    G = check_enough_samples(dataset, args, b, accum, ranks)
    per_epoch = len(dataset) // G
    while True:
        order = torch.randperm(len(dataset), generator=keyed_generator(STREAM_EPOCH_ORDER, args.seed, epoch)).tolist()
        mine = [order[s * G + m * b + i] for s in range(position, per_epoch)
                for m in range(rank * accum, (rank + 1) * accum) for i in range(b)]
        if isinstance(dataset, PreDrawn):  # tensors in memory: a batch is one indexing, no loader needed
            loader = (dataset.batch(mine[j:j + b]) for j in range(0, len(mine), b))
        else:
            dataset.set_epoch(epoch)  # a fresh loader (and workers) per epoch, as data.py asks
            loader = iter(DataLoader(dataset, batch_size=b, sampler=mine, num_workers=args.num_workers,
                                     pin_memory=torch.cuda.is_available()))
        for s in range(position, per_epoch):
            yield epoch, s, [next(loader) for _ in range(accum)]
        epoch, position = epoch + 1, 0


class PreDrawn:
    """The teaching world drawn once, before training, instead of inside every step: samples as tensors in memory,
    indexed like a dataset (`batch`). Why: a scene costs about 8 ms of small tensor ops to draw and its hint's
    largest rectangle a few ms of Python, and encoding the target and the masked source with the frozen VAE is
    another sixth of a step; done per step they took about 40 % of the tiny preset's time, for results that depend
    on the sample alone. Why not DataLoader workers: they would draw in parallel, but anew every epoch, on the
    cores the step needs (2 here), and cannot run the VAE. The price: a sample keeps the augmentation drawn for it
    once (its epoch-0 box rule, flip and rotation) instead of new draws every epoch; --world_samples sets how many
    distinct samples there are. Every draw is keyed, so a resumed run draws the same world again.
    After draw_world: source, target, mask (1 = keep), encoder_reference and hint, per sample (N,C,H,W);
    after encode_drawn (once the VAE is frozen): encoder_reference, hint, mask_lat and the VAE posteriors'
    moments (N,2E,h,w) of the target and the masked source (and the target, for the VGG loss; with the latent hint,
    its image's moments in place of the hint)."""

    def __init__(self, tensors):
        self.tensors = tensors

    def __len__(self):
        return len(self.tensors["mask_lat" if "mask_lat" in self.tensors else "mask"])

    def batch(self, indices):
        return {k: v[indices] for k, v in self.tensors.items()}


def with_hints(samples, hint_kind):
    """DataLoader collate for draw_world: the batch and its hint images (dtc.hint_image), made in the workers."""
    batch = default_collate(samples)
    batch["hint"] = hint_image(hint_kind, batch["reference"], batch["mask"], batch["source"])
    return batch


def draw_world(world, args, show):
    """Every sample of the teaching world, drawn by --num_workers processes (each on one thread) -> PreDrawn."""
    keys = ("source", "target", "mask", "encoder_reference", "hint")
    loader = DataLoader(world, batch_size=64, num_workers=args.num_workers,
                        collate_fn=partial(with_hints, hint_kind=args.hint_kind))
    parts = {k: [] for k in keys}
    for batch in tqdm(loader, desc="drawing the world", disable=not show, dynamic_ncols=True):
        for k in keys:
            parts[k].append(batch[k])
        if STOP:
            raise SystemExit("stopped while drawing the world, before anything was written: start again")
    return PreDrawn({k: torch.cat(v) for k, v in parts.items()})


@torch.no_grad()
def encode_drawn(drawn, vae, keep_target, hint_kind, device, show=False, batch_size=256):
    """What the frozen VAE makes of every pre-drawn sample (the work dtc.prepare does per step): the posterior
    moments of the target and of the masked source (and of the latent hint's pasted image), and the mask at latent
    size. The images are dropped."""
    x = drawn.tensors
    moments = {"z0_moments": [], "z_masked_moments": []} | ({"hint_moments": []} if hint_kind == "latent" else {})
    for i in tqdm(range(0, len(drawn), batch_size), desc="encoding the world", disable=not show, dynamic_ncols=True):
        target, source, mask, hint = (x[k][i:i + batch_size].to(device) for k in ("target", "source", "mask", "hint"))
        images = dict(z0_moments=target, z_masked_moments=source * mask, hint_moments=hint * 2 - 1)  # PBE: hole = 0
        for key in moments:
            posterior = vae.encode(images[key])
            moments[key].append(torch.cat([posterior.mean, posterior.logvar], 1).cpu())
    out = {k: torch.cat(v) for k, v in moments.items()}
    out["mask_lat"] = latent_mask(x["mask"], out["z0_moments"].shape[-2:])
    out["encoder_reference"] = x["encoder_reference"]
    if hint_kind != "latent":
        out["hint"] = x["hint"]
    if keep_target:
        out["target"] = x["target"]
    return PreDrawn(out)


def drawn_conditioning(batch, generator):
    """dtc.prepare's result for a pre-drawn batch, without the tokens: the posterior samples drawn in prepare's
    order (masked source, the latent hint if any, then target)."""
    z_masked = DiagonalGaussian(batch["z_masked_moments"]).sample(generator) * LATENT_SCALE
    if "hint_moments" in batch:
        hint = DiagonalGaussian(batch["hint_moments"]).sample(generator) * LATENT_SCALE
    else:
        hint = batch["hint"]
    z0 = DiagonalGaussian(batch["z0_moments"]).sample(generator) * LATENT_SCALE
    return dict(z_masked=z_masked, z0=z0, mask_lat=batch["mask_lat"], hint=hint)


# -----------------------------------------------------------------------------
# 3. The steps: tiny's VAE phase, and one DTC optimizer step over this rank's micro-batches


def cosine_rate(lr, step, steps, warmup):
    """The learning rate of step `step` (0-based) of `steps`: a linear warm-up over `warmup` steps, then a cosine
    from lr down to zero at the last step (Loshchilov & Hutter 2017, without restarts)."""
    return lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))


def image_gradients(x):
    """(B,C,H,W) -> the differences between vertical and between horizontal neighbours, (B,C,H-1,W), (B,C,H,W-1)."""
    return x[..., 1:, :] - x[..., :-1, :], x[..., :, 1:] - x[..., :, :-1]


def train_vae(vae, dataset, args, device, show):
    """Tiny preset, phase 1 (with --vae_steps): the VAE as an autoencoder of the training targets (the masked
    sources are only ever encoded, as conditioning): L1 on a posterior sample's reconstruction, + --vae_edge x the
    L1 of its image gradients, + a tiny KL. SD's VAE recipe has LPIPS and a GAN term for sharpness instead, which
    need pretrained or adversarial networks; the gradient term is the cheap stand-in (without it the decoder
    smooths edges: teaching world, 3000 steps, held-out targets: 23.3 dB and 0.46 of the target's edge energy
    without, 23.9 dB and 0.51 with). The learning rate warms up for 50 steps, then follows a cosine to zero. Then
    rescaled so that latents x LATENT_SCALE have unit variance, as SD's scale factor makes them for SD's VAE.
    Every process trains the same copy on the same batches: no communication."""
    init_from_scratch(vae, keyed_generator(STREAM_VAE_INIT, args.seed))
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    stream = micro_batches(dataset, args, min(args.vae_batch_size, args.batch_size), 1)
    bar = tqdm(range(args.vae_steps), desc="vae", disable=not show, dynamic_ncols=True)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = cosine_rate(args.vae_lr, step, args.vae_steps, warmup=50)
        x = next(stream)[2][0]["target"].to(device)
        posterior = vae.encode(x)
        recon = vae.decode(posterior.sample(keyed_generator(STREAM_VAE_POSTERIOR, args.seed, step)))
        l1 = F.l1_loss(recon, x)
        edge = sum(F.l1_loss(a, b) for a, b in zip(image_gradients(recon), image_gradients(x)))
        kl = 0.5 * (posterior.mean ** 2 + posterior.std ** 2 - 1 - posterior.logvar).mean()
        (l1 + args.vae_edge * edge + args.vae_kl * kl).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(l1=f"{l1.item():.4f}")
        if STOP:
            raise Interrupted(STOP, "in the VAE phase, before the first checkpoint: nothing was written; run the "
                              "same command again")
    with torch.no_grad():
        std = vae.encode(next(stream)[2][0]["target"].to(device)).mean.std().item()
        fold_latent_scale(vae, 1 / (LATENT_SCALE * std))
    return vae.requires_grad_(False).eval()


def dtc_step(trainee, ddp, frozen, vgg, batches, step, args, rank, device, autocast):
    """Forward and backward over this rank's micro-batches, gradients accumulated (DDP averages over ranks).
    Returns the sums over the micro-batches of (loss, loss_eps, loss_vgg)."""
    totals = torch.zeros(3, device=device)
    for j, batch in enumerate(batches):
        m = rank * len(batches) + j  # the micro-batch's index within the global batch
        g = keyed_generator(STREAM_DTC_STEP, args.seed, 0 if args.overfit_batch else step, m)
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        encoder_reference, target = batch["encoder_reference"], batch.get("target")
        # DDP all-reduces the gradients in the backward of the last micro-batch only
        last = j == len(batches) - 1
        with nullcontext() if last or ddp is trainee else ddp.no_sync():
            with autocast:
                if "z0_moments" in batch:  # the pre-drawn world: the frozen parts' work is already done
                    cond = drawn_conditioning(batch, g)
                else:  # the tokens here only when the image encoder is frozen (else Trainee computes them)
                    cond = prepare(frozen, batch["source"], batch["mask"], batch["reference"],
                                   trainee.model.cfg.encoder_input_size, g, target=target,
                                   encoder_reference=encoder_reference, tokens=trainee.image_encoder is None,
                                   hint_kind=trainee.model.cfg.hint_kind)
                cond = {k: v.float() for k, v in cond.items()}  # float32 latents: the noise target stays exact
                drop = (torch.rand(len(encoder_reference), generator=g) < args.p_uncond).to(device)
                loss_eps, eps, z_t, t = ddp(cond, encoder_reference, g, drop)
                loss_vgg = torch.zeros((), device=device)
                if vgg is not None:  # DCI-VTON's refinement loss: the decoded x0 estimate against the target,
                    x0 = trainee.schedule.predict_x0(z_t, eps, t)  # gradients through the frozen decoder
                    loss_vgg = vgg(frozen.vae.decode(x0 / LATENT_SCALE), target)
                loss = loss_eps + args.vgg_weight * loss_vgg
            (loss / len(batches)).backward()
        totals += torch.stack([loss.detach(), loss_eps.detach(), loss_vgg.detach()]).float()
    return totals


# -----------------------------------------------------------------------------
# 4. The loop

STOP = 0  # the signal (Ctrl-C's SIGINT, SIGTERM) that asked the run to stop after the current step; 0: none


def request_stop(signum, frame):
    global STOP
    if STOP:  # asked twice: quit now
        raise KeyboardInterrupt
    STOP = signum
    print(f"\n{signal.Signals(signum).name}: stopping after this step (again to quit at once)", file=sys.stderr)


def train(args, trainee, frozen, vgg, dataset, ckpt, ranks, rank, device, dtype):
    show = rank == 0
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    named = [(n, p) for n, p in trainee.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, fused=True)  # one kernel, CPU too
    ema = {n: p.detach().clone() for n, p in named} if args.ema else None
    step, epoch, position = 0, 0, 0
    if ckpt is not None and ckpt["step"] > 0:  # (the step-0 checkpoint after tiny's VAE phase has no optimizer)
        opt.load_state_dict(ckpt["optimizer"])
        ema = {n: t.to(device) for n, t in ckpt["ema"].items()} if ckpt["ema"] is not None else None
        step, epoch, position = ckpt["step"], ckpt["epoch"], ckpt["position"]
        torch.set_rng_state(ckpt["rng"]["torch"])
        random.setstate(ckpt["rng"]["python"])
        if ckpt["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    ddp = DistributedDataParallel(trainee, device_ids=[device.index] if device.type == "cuda" else None) \
        if ranks > 1 else trainee
    stream = micro_batches(dataset, args, args.batch_size, args.grad_accum, ranks, rank, epoch, position)
    if args.overfit_batch:  # the run's first batch, again and again
        stream = itertools.repeat(next(micro_batches(dataset, args, args.batch_size, args.grad_accum, ranks, rank)))
    G = args.batch_size * ranks * args.grad_accum
    fixed = samples_to_show(args, trainee) if show and args.sample_every else None
    log = open(os.path.join(args.out_dir, "log.jsonl"), "a") if show else None
    bar = tqdm(total=args.max_steps, initial=step, desc="dtc", disable=not show, dynamic_ncols=True)
    stopping = False
    while step < args.max_steps and not stopping:
        t0 = time.perf_counter()
        epoch, position, batches = next(stream)
        lr = args.lr if args.lr_schedule == "constant" else cosine_rate(args.lr, step, args.max_steps, args.max_steps // 20 + 1)
        for group in opt.param_groups:
            group["lr"] = lr
        totals = dtc_step(trainee, ddp, frozen, vgg, batches, step, args, rank, device, autocast)
        grad_norm = nn.utils.clip_grad_norm_(params, args.clip_grad) if args.clip_grad > 0 else None
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            for n, p in named:
                ema[n].lerp_(p.detach(), 1 - args.ema)
        step += 1
        packed = torch.cat([totals, torch.tensor([float(STOP > 0)], device=totals.device)])
        if ranks > 1:  # the logged losses are global means; every process stops together
            dist.all_reduce(packed)
        loss, loss_eps, loss_vgg = (packed[:3] / (ranks * args.grad_accum)).tolist()
        stopping = packed[3].item() > 0
        if not math.isfinite(loss):  # the last checkpoint on disk is still a good one
            raise SystemExit(f"error: the loss is {loss} at step {step}; try a lower --lr")
        record = dict(step=step, epoch=epoch, loss=loss, loss_eps=loss_eps, loss_vgg=loss_vgg, lr=lr,
                      grad_norm=None if grad_norm is None else grad_norm.item(),
                      images_per_s=G / (time.perf_counter() - t0))
        if show:
            log.write(json.dumps(record) + "\n")
            log.flush()
            bar.update()
            bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{record['images_per_s']:.1f}")
            if step % args.log_every == 0:
                bar.write(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))
            if step % args.save_every == 0 or step == args.max_steps or stopping:
                save_checkpoint(args, trainee, frozen, opt, ema, step, epoch, position + 1)
            if args.sample_every and (step % args.sample_every == 0 or step == args.max_steps):  # the last one too
                save_samples(trainee, frozen, fixed, os.path.join(args.out_dir, "samples", f"step_{step:06d}.png"),
                             args.seed, device, autocast)
    bar.close()
    if show:
        log.close()
        plot_losses(os.path.join(args.out_dir, "log.jsonl"), os.path.join(args.out_dir, "loss.png"))
    if stopping:  # an unfinished run is no success: exit status 128 + the signal's number (a peer's stop: SIGTERM's)
        raise Interrupted(STOP or signal.SIGTERM, f"at step {step} of {args.max_steps}: "
                          f"{os.path.join(args.out_dir, 'ckpt.pt')} saved; continue with "
                          f"python train.py --out_dir={args.out_dir} --resume")
    if show:
        if ema is not None:  # the final weights are the averaged ones
            with torch.no_grad():
                for n, p in named:
                    p.copy_(ema[n])
        path = os.path.join(args.out_dir, "dtc.safetensors")
        save_dtc(trainee.model, path, frozen=frozen if args.preset == "tiny" else None)
        print(f"done: {path}")


# -----------------------------------------------------------------------------
# 5. Checkpoints, sample grids and the loss curve


def save_checkpoint(args, trainee, frozen, opt, ema, step, epoch, position):
    """OUT_DIR/ckpt.pt: written to a temporary file, then renamed, so a crash never leaves half a checkpoint.
    The global RNG states are kept too, although the training draws come from keyed generators, not from them."""
    state = dict(args=vars(args), dtc_config=asdict(trainee.model.cfg), step=step, epoch=epoch, position=position,
                 trainee=trainee.state_dict(), optimizer=opt.state_dict() if opt is not None else None, ema=ema,
                 vae=frozen.vae.state_dict() if args.preset == "tiny" else None,
                 rng=dict(torch=torch.get_rng_state(), python=random.getstate(),
                          cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None))
    path = os.path.join(args.out_dir, "ckpt.pt")
    torch.save(state, f"{path}.tmp")
    os.replace(f"{path}.tmp", path)


def read_checkpoint(path):
    """OUT_DIR/ckpt.pt through checkpoint.py's reader (weights_only), checked to hold what save_checkpoint writes."""
    ckpt = load_pickle(path)
    keys = ("args", "dtc_config", "step", "epoch", "position", "trainee", "optimizer", "ema", "vae", "rng")
    missing = [k for k in keys if k not in ckpt] if isinstance(ckpt, dict) else keys
    if missing or not isinstance(ckpt["args"], dict) or not isinstance(ckpt["step"], int):
        raise CheckpointError(f"{path}: not a checkpoint written by train.py (missing or wrong: "
                              f"{', '.join(missing) or 'args, step'})")
    return ckpt


def samples_to_show(args, trainee):
    """A few fixed samples, without training randomness, batched: the rows of every sample grid."""
    data = build_dataset(args, (trainee.model.cfg.encoder_input_size,) * 2, train=False)
    return next(iter(DataLoader(data, batch_size=min(4, len(data)))))


@torch.no_grad()
def save_samples(trainee, frozen, fixed, path, seed, device, autocast, steps=20):
    """One row per fixed sample: source | mask (white = fill) | reference | hint | sample (DDIM, the model's
    guidance)."""
    source, mask, reference = (fixed[k].to(device) for k in ("source", "mask", "reference"))
    g = torch.Generator().manual_seed(seed)
    hint = hint_image(trainee.model.cfg.hint_kind, reference, mask, source)
    with autocast:
        x = generate(trainee.model, frozen, source, mask, reference, g, steps, hint=hint, progress=False)
    T = max(128, source.shape[-1])  # rows at least 128 px high, so 64 px images stay visible
    rows = [grid([to_pil(source[i]), mask_to_pil(mask[i]), to_pil(reference[i]), to_pil(hint[i] * 2 - 1),
                  to_pil(x[i])], T) for i in range(len(source))]
    image = Image.new("RGB", (max(r.width for r in rows), T * len(rows)), "white")
    for i, row in enumerate(rows):
        image.paste(row, (0, i * T))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image.save(path)


def plot_losses(log_path, png_path, W=800, H=400, pad=40):
    """The loss per step (grey) and its running mean (blue), drawn with PIL."""
    with open(log_path) as f:
        records = [json.loads(line) for line in f]
    if len(records) < 2:
        return
    steps, losses = [r["step"] for r in records], [r["loss"] for r in records]
    k = max(1, len(losses) // 50)
    mean = [sum(losses[max(0, i - k + 1):i + 1]) / min(k, i + 1) for i in range(len(losses))]
    lo, hi = min(losses), max(max(losses), min(losses) + 1e-9)
    xy = [(pad + (s - steps[0]) / (steps[-1] - steps[0]) * (W - 2 * pad), H - pad - (v - lo) / (hi - lo) * (H - 2 * pad))
          for s, v in zip(steps + steps, losses + mean)]
    im = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(im)
    d.rectangle([pad, pad, W - pad, H - pad], outline="black")
    d.line(xy[:len(steps)], fill=(190, 190, 190))
    d.line(xy[len(steps):], fill=(30, 80, 200), width=2)
    d.text((pad, 12), f"loss (grey) and its running mean over {k} steps (blue): {mean[-1]:.4f} at step {steps[-1]}; "
                      f"y from {lo:.3g} to {hi:.3g}, x from step {steps[0]} to {steps[-1]}", fill="black")
    im.save(png_path)


# -----------------------------------------------------------------------------
# 6. Main


def restore_args(args, saved, argv):
    """A resumed run keeps the options it was started with; only CHANGEABLE ones may be given anew."""
    given = {a[2:].split("=")[0] for a in argv if a.startswith("--")}
    for key, value in saved.items():
        if key in ("out_dir", "resume") or (key in given and key in CHANGEABLE):
            continue
        if key in given and getattr(args, key) != value:
            print(f"warning: --{key}={getattr(args, key)} ignored: the run was started with {value}", file=sys.stderr)
        setattr(args, key, value)
    return args


def setup(args, ckpt, ranks, rank, device):
    """(trainee, frozen, dataset, vgg) on the device, from the checkpoint when resuming; the teaching world drawn."""
    torch.manual_seed(args.seed)  # the same initial weights in every process (DDP also broadcasts rank 0's)
    trainee, frozen = build_model(args)
    dataset = build_dataset(args, (trainee.model.cfg.encoder_input_size,) * 2)
    check_enough_samples(dataset, args, args.batch_size, args.grad_accum, ranks)  # before any work, not after the VAE's
    multiple = trainee.model.cfg.size_multiple
    if args.size % multiple:
        raise bad_option(args, "size", f"this model trains at a multiple of {multiple}")
    torch.manual_seed(args.seed + rank)  # per-process global RNG; the training draws use keyed generators
    if args.grad_checkpointing:
        trainee.model.unet.grad_checkpointing = True
        if trainee.model.cfg.hint:
            trainee.model.hint_encoder.grad_checkpointing = True
    trainee.to(device, memory_format=torch.channels_last)  # the convs' fastest layout (CPU: 7 % a tiny step)
    frozen.vae.to(device)
    frozen.image_encoder.to(device)
    if ckpt is not None:
        try:
            trainee.load_state_dict(ckpt["trainee"])
            if ckpt["vae"] is not None:
                frozen.vae.load_state_dict(ckpt["vae"])
        except RuntimeError as e:
            raise CheckpointError(f"{args.out_dir}/ckpt.pt: its weights do not fit the run's model: "
                                  f"{first_sentence(str(e).split(chr(10), 1)[-1])[:300]}") from None
    vgg = None
    if args.vgg_weights and args.vgg_weight > 0:  # loaded (and so checked) before the VAE phase
        vgg = VGGLoss(args.vgg_weights).to(device)
    elif args.vgg_weight > 0 and rank == 0:
        print("warning: no --vgg_weights: the VGG perceptual loss is off (paper: on, lambda 1e-3)", file=sys.stderr)
    if args.preset == "tiny" and ckpt is None and args.init_vae:  # a tiny VAE trained before (by default the bundled one)
        _, trained = load_dtc(args.init_vae)
        if trained is None or asdict(trained.vae.cfg) != asdict(frozen.vae.cfg):
            raise CheckpointError(f"{args.init_vae}: holds no tiny VAE of this preset's configuration")
        frozen.vae.load_state_dict(trained.vae.state_dict())
    if isinstance(dataset, TeachingWorld):  # drawn once, before any step (PreDrawn says why)
        dataset = draw_world(dataset, args, show=rank == 0)
    return trainee, frozen, dataset, vgg


def freeze(args, frozen, dataset, vgg, device, dtype, rank):
    """The frozen parts as the DTC phase uses them; returns the dataset, with the pre-drawn world encoded once."""
    if args.preset == "tiny":
        frozen.vae.requires_grad_(False).eval()
        if isinstance(dataset, PreDrawn) and args.max_steps > 0:  # the VAE is frozen from here: encode every sample once
            dataset = encode_drawn(dataset, frozen.vae, keep_target=vgg is not None, hint_kind=args.hint_kind,
                                   device=device, show=rank == 0)
    elif device.type == "cuda" and dtype == torch.bfloat16:
        frozen.vae.to(torch.bfloat16)  # frozen and run under autocast: bfloat16 halves them
        frozen.image_encoder.to(torch.bfloat16)
    return dataset


def main(argv=None):
    global STOP
    STOP = 0
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    ranks, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    ckpt_path, ckpt = os.path.join(args.out_dir, "ckpt.pt"), None
    if os.path.exists(ckpt_path):
        if not args.resume:
            raise SystemExit(f"error: {ckpt_path}: a run is already there; --resume continues it, "
                             "or choose another --out_dir")
        ckpt = read_checkpoint(ckpt_path)
        args = restore_args(args, ckpt["args"], argv)
    device, dtype = check_options(args)  # resuming: the run's own options, restored
    if ckpt is not None and rank == 0:
        print(f"resuming {ckpt_path}: continuing from step {ckpt['step']} of {args.max_steps}"
              f"{' (the VAE phase is done)' if ckpt['step'] == 0 else ''}", file=sys.stderr)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if device == "cuda" else torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if ranks > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    handlers = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        # 1. setup: the model, the frozen parts and the data (the teaching world drawn), nothing written yet
        trainee, frozen, dataset, vgg = setup(args, ckpt, ranks, rank, device)
        # 2. tiny with --vae_steps: the VAE trained from scratch, then a step-0 checkpoint (the run's first writing)
        vae_phase = args.preset == "tiny" and ckpt is None and not args.init_vae
        if vae_phase:  # it writes nothing: a run stopped in it leaves no folder behind
            train_vae(frozen.vae, dataset, args, device, show=rank == 0)
            if ranks > 1:  # GPU kernels need not be deterministic: every process takes rank 0's VAE
                for t in frozen.vae.state_dict().values():
                    dist.broadcast(t, 0)
        dataset = freeze(args, frozen, dataset, vgg, device, dtype, rank)
        os.makedirs(args.out_dir, exist_ok=True)  # everything checked, the VAE trained: the run starts writing here
        if vae_phase and rank == 0:  # the VAE phase is worth keeping
            save_checkpoint(args, trainee, frozen, None, None, 0, 0, 0)
        log_path = os.path.join(args.out_dir, "log.jsonl")
        if ckpt is not None and rank == 0 and os.path.exists(log_path):  # the steps after the checkpoint are redone:
            with open(log_path) as f:                                     # drop their lines (once setup has worked)
                lines = [line for line in f if json.loads(line)["step"] <= ckpt["step"]]
            with open(log_path, "w") as f:
                f.writelines(lines)
        # 3. DTC
        train(args, trainee, frozen, vgg, dataset, ckpt, ranks, rank, device, dtype)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        if ranks > 1:
            dist.destroy_process_group()


if __name__ == "__main__":
    use_free_cores()
    sys.exit(run(main))
