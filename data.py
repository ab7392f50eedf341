"""
Training and evaluation data for Diffuse to Choose: image reading, three dataset layouts (our own triplet
folders and the VITON-HD and DressCode releases), the training-time randomness, and a toy "teaching world" that draws
products into scenes so the whole pipeline can be trained and judged on a CPU.

Conventions (every function here keeps them):
- Images are float tensors (3,H,W) in [-1,1]. Files are read fully decoded, upright (EXIF orientation
  applied), transparency composited on WHITE, and converted to RGB.
- Masks inside the model are Paint-by-Example's: float (1,H,W), 1 = keep, 0 = the region to fill.
  Mask FILES on disk follow the user convention: white = region to fill, thresholded at 128 (JPEG leaves
  grey edges), so a file is inverted on reading and on writing.
- Sizes are (H, W), as torch writes them; messages print W x H, as image viewers do. File sizes always
  come from the files opened, never from constants.
- A sample is a dict: "source" (3,H,W) the photo (masked later by the model code), "target" (3,H,W)
  what the region should become (= source when the layout has no target), "mask" (1,H,W) 1 = keep,
  "reference" (3,h,w) the product image, "encoder_reference" (3,h,w) what the image encoder sees, "name"
  str. Sources are resized to the dataset's `size` (bilinear with antialias; masks and parse maps
  NEAREST) and references to `ref_size`, so the default
  collate batches them; the model resizes the reference again for its image encoder and its hint.
- Randomness never touches a global RNG: sample i of epoch e draws only from
  `sample_rng(seed, e, i)`, so a resumed run sees exactly the samples it would have seen. With
  DataLoader workers, call `set_epoch` before each epoch's iterator and do not use persistent workers
  (they keep the dataset copy of the epoch they were started in).
- Training randomness (train=True), as in the paper: per sample the fine mask or its bounding box,
  50/50 (supplement 5.1), a horizontal flip (p=0.5) of the whole sample and a rotation uniform in
  +-20 degrees with white fill of the image encoder's copy of the reference, "encoder_reference" (4.1;
  `augment` says why). With train=False nothing is random.
- Bad data raises DataError, one line naming the file and the problem. With skip_bad=True a dataset
  drops bad samples up front (one warning with the count) and replaces samples that fail to decode
  later by the next good index (counted in `skipped`).
"""
import math
import os
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image, ImageFile, ImageOps
from torch.utils.data import Dataset

from dtc import largest_rectangle

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
OUTPUT_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}  # an output's extension sets its format


class DataError(ValueError):
    """A data file that cannot be used; the message names the file and what is wrong."""


# ----------------------------------------------------------------------------------------------
# 1. Reading and writing images and masks

def _decode(path):
    """The fully decoded, upright PIL image at `path` (any mode)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    # PIL's default; set here because any library may flip it globally, and a truncated file must
    # fail loudly instead of training on a half-grey photo
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with Image.open(path) as im:
            im.load()  # the full decode: a truncated JPEG/PNG raises here, not at Image.open
            return ImageOps.exif_transpose(im)  # phone photos store their rotation in EXIF
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: unreadable image ({e})") from None


def _header(path):
    """(W, H, mode) from the file header alone (fast, for the up-front checks), EXIF rotation applied."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with Image.open(path) as im:
            W, H = im.size
            exif = Image.Exif()
            if "exif" in im.info:  # read at open; im.getexif() would decode a whole PNG
                exif.load(im.info["exif"])
            turned = exif.get(0x0112, 1) in (5, 6, 7, 8)  # orientations that swap width and height
            return (H, W, im.mode) if turned else (W, H, im.mode)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: unreadable image ({e})") from None


def _eight_bit(im):
    """Greyscale stored in more than 8 bits -> "L", scaled by the range its values are stored in: 16-bit modes
    (I;16*) by 65535; 32-bit integers (I) by the smallest of 255, 65535 and 2^32 - 1 that holds their largest value;
    floats (F) by 1 when they lie in [0, 1], else as I. (PIL's own convert clips them at 255: a 16-bit photo would
    turn white.) Other modes are returned as they are."""
    if not im.mode.startswith(("I", "F")):
        return im
    x = TF.pil_to_tensor(im.convert("F")).double().nan_to_num(0)  # (1,H,W), exact for 16-bit values
    top = x.max().item()
    if im.mode.startswith("I;16"):
        top = 65535
    elif not (im.mode == "F" and top <= 1):
        top = next((t for t in (255, 65535, 2 ** 32 - 1) if top <= t), top)
    return TF.to_pil_image((x / max(top, 1e-12) * 255).round().clamp(0, 255).to(torch.uint8))


def load_image(path):
    """PIL RGB image; transparency (RGBA, LA, palette or grey with a transparent colour) goes on white; greyscale
    of 16 or 32 bits by its value range (_eight_bit); CMYK by PIL's conversion."""
    im = _eight_bit(_decode(path))
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        im = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, im).convert("RGB")
    return im.convert("RGB")  # grey, palette and CMYK too


def load_mask(path, size=None, resize=False):
    """(1,H,W) float, 1 = keep, from a file where white (>= 128) = the region to fill.

    size: the source's (H, W). A mask of another size is an error, unless resize=True, which resizes
    the file with NEAREST before thresholding (with a one-line warning when that stretches it: another aspect
    ratio than a rounded scaling of the source would have).
    """
    im = _eight_bit(_decode(path)).convert("L")  # RGB or palette masks: their luminance
    if size is not None and im.size != (size[1], size[0]):
        (w, h), (H, W) = im.size, size
        if not resize:
            raise DataError(f"{path}: mask is {w}x{h}, the source is {W}x{H}")
        if abs(h - w * H / W) > 1 and abs(w - h * W / H) > 1:
            print(f"warning: {path}: the mask is {w}x{h}, another aspect ratio than the source's {W}x{H}: "
                  "it is stretched to the source", file=sys.stderr)
        im = im.resize((W, H), Image.NEAREST)
    fill = TF.pil_to_tensor(im) >= 128  # (1,H,W)
    return (~fill).float()


def check_output_image(path, what):
    """Raises DataError unless an image can be written at `path`: its extension one of OUTPUT_FORMATS, not an
    existing folder, and its nearest existing parent a folder. `what` (the option) is named in the message."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path} ({what}): is an existing folder; name an image file")
    if path.suffix.lower() not in OUTPUT_FORMATS:
        raise DataError(f"{path} ({what}): the extension sets the format and must be one of {', '.join(OUTPUT_FORMATS)}")
    parent = next(p for p in path.absolute().parents if p.exists())
    if not parent.is_dir():
        raise DataError(f"{path} ({what}): {parent} is a file, not a folder")


def write_images(images):
    """Writes {path: PIL image} all or nothing, each in the format of its extension (OUTPUT_FORMATS): every image
    goes to `<path>.tmp` first, and only when all are written are they renamed over the old files. A write that
    fails removes the temporary files and raises DataError: nothing is replaced and nothing is left behind."""
    written = {}
    try:
        for path, image in images.items():
            path = Path(path)
            fmt = OUTPUT_FORMATS[path.suffix.lower()]
            path.parent.mkdir(parents=True, exist_ok=True)
            written[path] = path.with_name(path.name + ".tmp")
            image.save(written[path], format=fmt, **({} if fmt == "PNG" else {"quality": 95}))
    except BaseException as e:
        for tmp in written.values():
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise DataError(f"{path}: cannot be written ({e.strerror or e})") from None
        raise
    for path, tmp in written.items():
        os.replace(tmp, path)


def load_parse(path):
    """(H,W) uint8 label ids of a human-parse map, read BY INDEX.

    The VITON-HD maps are palette ("P") PNGs whose colours are only for display; convert('L') or
    convert('RGB') would turn them into luminances, not ids.
    """
    im = _decode(path)
    if im.mode not in ("P", "L"):
        raise DataError(f"{path}: parse map is mode {im.mode}; expected a palette ('P') or 'L' map of label ids")
    parse = TF.pil_to_tensor(im)[0]  # P and L: the stored indices, (H,W) uint8
    if parse.max() > 19:
        raise DataError(f"{path}: parse map has label {int(parse.max())}; CIHP labels are 0..19")
    return parse


def to_tensor(pil):
    """PIL image -> (3,H,W) float in [-1,1]."""
    return TF.pil_to_tensor(pil.convert("RGB")).float() / 127.5 - 1


def to_pil(x):
    """(3,H,W) (or (1,H,W)) tensor in [-1,1] -> PIL image."""
    return TF.to_pil_image(((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8))


def mask_to_pil(mask):
    """(1,H,W) mask, 1 = keep -> PIL "L" image in the file convention (white = fill)."""
    return TF.to_pil_image(((1 - mask.detach().float().cpu()) * 255).round().to(torch.uint8))


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


# ----------------------------------------------------------------------------------------------
# 2. What every dataset shares: per-sample RNG, resizing, the training randomness, skip_bad

def _mix(*values):
    """A 64-bit hash of integers (splitmix64 steps), stable across runs, machines and Python versions."""
    h = 0
    for v in values:
        h = (h + v + 0x9E3779B97F4A7C15) % 2**64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) % 2**64
        h ^= h >> 31
    return h


def keyed_generator(*values):
    """A torch CPU generator seeded by a tuple of integers: the same tuple gives the same stream on every run and
    machine, and different tuples independent streams. Every random draw here and in train.py takes one, keyed by
    what it is for (a stream's name constant, the seed, the step...), so no draw depends on what was drawn before."""
    # torch's CPU generator seeds its Mersenne Twister from the low 32 bits only: fold the high half in
    h = _mix(*values)
    return torch.Generator().manual_seed((h ^ (h >> 32)) & 0xFFFFFFFF)


def sample_rng(seed, epoch, index):
    """The only source of randomness for sample `index` of `epoch`."""
    return keyed_generator(seed, epoch, index)


def _uniform(g, lo=0.0, hi=1.0):
    return lo + (hi - lo) * torch.rand((), generator=g).item()


def _pair(size):
    return (size, size) if isinstance(size, int) else tuple(size)


def resize_image(x, size):
    """(3,h,w) -> (3,H,W), bilinear with antialias (a triangle filter: no overshoot past [-1,1])."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x[None], size=tuple(size), mode="bilinear", antialias=True, align_corners=False)[0]


def resize_nearest(x, size):
    """Masks and label maps (C,h,w) -> (C,H,W); "nearest-exact" samples pixel centres, like PIL's NEAREST."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x[None].float(), size=tuple(size), mode="nearest-exact")[0].to(x.dtype)


def bbox_mask(mask):
    """(1,H,W) keep-mask -> the same with the bounding box of its fill region filled."""
    fill = mask[0] < 0.5
    if not fill.any():
        return mask
    rows, cols = fill.any(1).nonzero()[:, 0], fill.any(0).nonzero()[:, 0]
    box = torch.ones_like(mask)
    box[:, rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] = 0
    return box


def augment(source, target, mask, reference, g):
    """The paper's flip and rotation (4.1), applied so that the hint still corresponds to the target: the
    horizontal flip (p=0.5) mirrors the whole sample (source, target, mask and reference together: the
    mirrored reference stretched into the mirrored rectangle is again the target's texture), and the
    rotation (uniform in +-20 degrees, corners filled white, the reference's own background) turns only
    the image encoder's copy of the reference; the hint is built from the unrotated one. Both draws are
    made every time, so later draws never shift. Returns (source, target, mask, reference, encoder_reference)."""
    flip = torch.rand((), generator=g).item() < 0.5
    angle = _uniform(g, -20.0, 20.0)
    if flip:
        source, target, mask, reference = (x.flip(-1) for x in (source, target, mask, reference))
    encoder_reference = TF.rotate(reference, angle, interpolation=TF.InterpolationMode.BILINEAR,
                                  fill=[1.0] * reference.shape[0])
    return source, target, mask, reference, encoder_reference


def finish_sample(source, target, mask, reference, name, size, ref_size, g, mask_file, box=None):
    """Resize to the batch sizes, check there is something to fill, then apply the training randomness
    (g is None in evaluation): the fine mask or its bounding box, 50/50 (supplement 5.1; `box` given when
    the dataset has drawn that choice itself), then `augment`. mask_file names the mask's origin for the
    error message. The sample's "encoder_reference" is what the image encoder sees (= "reference" in
    evaluation)."""
    resized = resize_image(source, size)
    target = resized if target is source else resize_image(target, size)
    mask = resize_nearest(mask, size)
    if mask.min() > 0.5:
        raise DataError(f"{mask_file}: no region to fill at {size[1]}x{size[0]} (all keep, or too small to survive the resize)")
    reference = encoder_reference = resize_image(reference, ref_size)
    if g is not None:
        if box is None:
            box = torch.rand((), generator=g).item() < 0.5
        if box:
            mask = bbox_mask(mask)
        resized, target, mask, reference, encoder_reference = augment(resized, target, mask, reference, g)
    return {"source": resized, "target": target, "mask": mask, "reference": reference,
            "encoder_reference": encoder_reference, "name": name}


def _warn_dropped(bad, total):
    if bad:
        warnings.warn(f"skipped {len(bad)} of {total} samples with bad files; first: {bad[0]}", stacklevel=3)


class SampleDataset(Dataset):
    """Base of the datasets below: the seed/epoch RNG and the decode-time skip_bad rule.
    Subclasses define __len__ and load(index, g) -> sample dict (g is None in evaluation)."""

    def __init__(self, seed, train, skip_bad):
        self.seed, self.train, self.skip_bad = seed, train, skip_bad
        self.epoch = 0
        self.skipped = 0  # decode-time replacements, counted in this process (each DataLoader worker has its own)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __getitem__(self, index):
        index = range(len(self))[index]  # IndexError past the end ends plain iteration; negatives work
        for k in range(len(self)):
            j = (index + k) % len(self)  # the replacement for a bad sample is deterministic: the next one
            try:
                return self.load(j, sample_rng(self.seed, self.epoch, j) if self.train else None)
            except DataError as e:
                if not self.skip_bad:
                    raise
                self.skipped += 1
                warnings.warn(f"{e}; sample {j} skipped, the next one used instead", stacklevel=2)
        raise DataError(f"{self}: no sample could be loaded")


# ----------------------------------------------------------------------------------------------
# 3. Triplet folders: root/{source,mask,reference}/ and optional root/target/, matched by file stem

class TripletDataset(SampleDataset):
    """root/source/NAME.*, root/mask/NAME.* (white = fill), root/reference/NAME.*, optional root/target/NAME.*
    (what the region should become when the source shows something else there). Extensions may differ."""

    def __init__(self, root, size, ref_size=(224, 224), train=True, seed=0, skip_bad=False):
        super().__init__(seed, train, skip_bad)
        self.root, self.size, self.ref_size = Path(root), _pair(size), _pair(ref_size)
        folders = ["source", "mask", "reference"] + (["target"] if (self.root / "target").is_dir() else [])
        files = {folder: self._index(self.root / folder) for folder in folders}
        if not files["source"]:
            raise DataError(f"{self.root}: no images in {self.root / 'source'}")
        self.samples, bad = [], []
        for name, source in sorted(files["source"].items()):
            try:  # header-level checks only (no decoding), so this stays fast on large folders
                paths = {"source": source}
                for folder in folders[1:]:
                    if name not in files[folder]:
                        raise DataError(f"{self.root / folder / name}.*: file not found (the source {source.name} has none)")
                    paths[folder] = files[folder][name]
                W, H, _ = _header(source)
                for folder in folders[1:]:
                    w, h, _ = _header(paths[folder])
                    if folder in ("mask", "target") and (w, h) != (W, H):
                        raise DataError(f"{paths[folder]}: {folder} is {w}x{h}, the source is {W}x{H}")
                self.samples.append((name, paths))
            except DataError as e:
                bad.append(e)
        if bad and not skip_bad:
            more = f" (and {len(bad) - 1} more bad samples; skip_bad=True drops them)" if len(bad) > 1 else ""
            raise DataError(f"{bad[0]}{more}")
        _warn_dropped(bad, len(files["source"]))
        if not self.samples:
            raise DataError(f"{self.root}: no usable samples")

    @staticmethod
    def _index(folder):
        """{stem: path} of the images in a folder; two files with one stem are ambiguous."""
        index = {}
        for path in sorted(folder.iterdir()) if folder.is_dir() else []:
            if path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith("."):
                if path.stem in index:
                    raise DataError(f"{path}: two files for sample '{path.stem}' ({index[path.stem].name}, {path.name})")
                index[path.stem] = path
        return index

    def __len__(self):
        return len(self.samples)

    def load(self, i, g):
        name, paths = self.samples[i]
        source = load_image(paths["source"])
        mask = load_mask(paths["mask"], size=(source.height, source.width))
        target = to_tensor(load_image(paths["target"])) if "target" in paths else None
        source = to_tensor(source)
        return finish_sample(source, source if target is None else target, mask, to_tensor(load_image(paths["reference"])),
                             name, self.size, self.ref_size, g, paths["mask"])

    def __repr__(self):
        return f"TripletDataset({self.root})"


def write_triplets(root, samples):
    """Write sample dicts (source, mask, reference, optional target, name) as PNGs in the triplet layout."""
    root = Path(root)
    for s in samples:
        folders = {"source": s["source"], "reference": s["reference"]}
        if "target" in s:
            folders["target"] = s["target"]
        for folder, image in folders.items():
            (root / folder).mkdir(parents=True, exist_ok=True)
            to_pil(image).save(root / folder / f"{s['name']}.png")
        (root / "mask").mkdir(parents=True, exist_ok=True)
        mask_to_pil(s["mask"]).save(root / "mask" / f"{s['name']}.png")


# ----------------------------------------------------------------------------------------------
# 4. VITON-HD: root/{train,test}_pairs.txt and root/<split>/{image,cloth,image-parse-v3}/
#    (the layout and its traps: docs/datasets.md §2)

UPPER_BODY_IDS = (5, 6, 7, 10, 14, 15)  # CIHP upper-clothes, dress, coat, neck (torso-skin), left arm, right arm
FLIP_PAIRS = ((14, 15), (16, 17), (18, 19))  # left/right arm, leg, shoe: a mirror swaps them (CIHP_PGN's flip tool)


def flip_parse(parse):
    """Mirror a label map (..., H, W) left-right, swapping the left/right ids."""
    table = torch.arange(256, dtype=parse.dtype)
    for a, b in FLIP_PAIRS:
        table[a], table[b] = b, a
    return table[parse.long()].flip(-1)


def dilate(fill, radius):
    """Square dilation of a (H,W) bool map by `radius` pixels, as a max-pool (rows, then columns)."""
    if radius <= 0:
        return fill
    x = fill[None, None].float()
    x = F.max_pool2d(x, (1, 2 * radius + 1), stride=1, padding=(0, radius))
    x = F.max_pool2d(x, (2 * radius + 1, 1), stride=1, padding=(radius, 0))
    return x[0, 0] > 0.5


def parse_mask(parse, ids, radius):
    """(1,H,W) keep-mask from a (H,W) label map: the pixels labelled `ids`, dilated by `radius` px (dilated
    because the new garment may be larger than the old one, and so the old garment's outline cannot leak
    through the mask)."""
    fill = torch.isin(parse, torch.tensor(ids, dtype=parse.dtype))
    return (~dilate(fill, radius)).float()[None]


def check_pair_files(paths, pairs_file, n):
    """Header-level checks of the files of one pair-file row (no decoding, so they stay fast on a whole
    release): each exists and is an image, and the parse map is a map of label ids at the photo's size."""
    for path in paths.values():
        if not path.is_file():
            raise DataError(f"{path}: file not found (needed by {pairs_file.name} line {n})")
    W, H, _ = _header(paths["image"])
    _header(paths["cloth"])
    w, h, mode = _header(paths["parse"])
    if mode not in ("P", "L"):
        raise DataError(f"{paths['parse']}: parse map is mode {mode}; expected a palette ('P') or 'L' map of label ids")
    if (w, h) != (W, H):
        raise DataError(f"{paths['parse']}: parse map is {w}x{h}, the image is {W}x{H}")


def read_pair(paths, max_label):
    """The decoded person (3,H,W), cloth (3,h,w) in [-1,1] and parse (H,W) of one pair, checked again after
    decoding (a header can lie about a file that fails to decode)."""
    person, cloth = to_tensor(load_image(paths["image"])), to_tensor(load_image(paths["cloth"]))
    parse = load_parse(paths["parse"])
    if tuple(parse.shape) != tuple(person.shape[-2:]):
        raise DataError(f"{paths['parse']}: parse map is {parse.shape[1]}x{parse.shape[0]}, "
                        f"the image is {person.shape[2]}x{person.shape[1]}")
    if parse.max() > max_label:
        raise DataError(f"{paths['parse']}: parse map has label {int(parse.max())}; this layout's labels are 0..{max_label}")
    return person, cloth, parse


def keep_good(bad, total, skip_bad, what):
    """The bad-row rule of the release readers: the first bad row stops (with a count of the others), or
    with skip_bad they are dropped with one warning."""
    if bad and not skip_bad:
        more = f" (and {len(bad) - 1} more bad {what}; skip_bad=True drops them)" if len(bad) > 1 else ""
        raise DataError(f"{bad[0]}{more}")
    _warn_dropped(bad, total)


def read_pairs_file(pairs_file):
    """[(line number, [column, ...]), ...] of the non-empty rows; columns split on any whitespace (tabs or
    spaces: the releases' files are read that way by every public loader)."""
    if not pairs_file.is_file():
        raise DataError(f"{pairs_file}: file not found")
    lines = [(n, line.split()) for n, line in enumerate(pairs_file.read_text().splitlines(), 1) if line.strip()]
    if not lines:
        raise DataError(f"{pairs_file}: no pairs")
    for n, names in lines:
        if len(names) != 2:
            raise DataError(f"{pairs_file} line {n}: expected 'person.jpg cloth.jpg', got {' '.join(names)!r}")
    return lines


class VitonHDDataset(SampleDataset):
    """Person photos of VITON-HD with the garment region masked and the in-shop cloth as the reference.

    split "train": the garment is ALWAYS cloth/<person name>; column 2 of train_pairs.txt is ignored
    because that file is not paired (every public loader does the same). split "test": paired=True
    uses cloth/<person name> (the person wears it: target = source); paired=False uses column 2 (no
    ground truth: target = source by convention).
    The mask: parse ids UPPER_BODY_IDS at the output size, dilated by int(dilation * W) px (W = the output
    width; 5/256 is DCI-VTON's kernel size rule), then the 50/50 box rule in training.
    hflip: probability (training only) of mirroring the whole sample (person, parse with left/right ids
    swapped, cloth).
    samples: [(name, {"image", "cloth", "parse"} paths)]; name = the person's stem, paired, or
    "<person stem>_<cloth stem>", unpaired.
    """

    def __init__(self, root, split, size, ref_size=(224, 224), train=None, seed=0, skip_bad=False,
                 paired=True, hflip=0.0, dilation=5 / 256):
        train = split == "train" if train is None else train
        super().__init__(seed, train, skip_bad)
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', not {split!r}")
        if split == "train" and not paired:
            raise ValueError("train_pairs.txt is not a pairing: training always uses cloth/<person name>")
        if hflip and not train:
            raise ValueError("hflip is a training augmentation; with train=False nothing is random")
        self.root, self.size, self.ref_size = Path(root), _pair(size), _pair(ref_size)
        self.hflip, self.radius = hflip, int(dilation * self.size[1])
        pairs_file = self.root / f"{split}_pairs.txt"
        lines = read_pairs_file(pairs_file)
        folder = self.root / split
        self.samples, bad = [], []
        for n, (person, cloth) in lines:
            cloth = person if paired else cloth
            paths = {"image": folder / "image" / person, "cloth": folder / "cloth" / cloth,
                     "parse": folder / "image-parse-v3" / (Path(person).stem + ".png")}
            try:
                check_pair_files(paths, pairs_file, n)
                name = Path(person).stem if paired else f"{Path(person).stem}_{Path(cloth).stem}"
                self.samples.append((name, paths))
            except DataError as e:
                bad.append(e)
        keep_good(bad, len(lines), skip_bad, "pairs")
        if not self.samples:
            raise DataError(f"{self.root}: no usable {split} pairs")

    def __len__(self):
        return len(self.samples)

    def load(self, i, g):
        name, paths = self.samples[i]
        person, cloth, parse = read_pair(paths, max_label=19)
        # the flip draw is made in every training sample, so hflip does not shift the later draws
        if g is not None and torch.rand((), generator=g).item() < self.hflip:
            person, parse, cloth = person.flip(-1), flip_parse(parse), cloth.flip(-1)
        parse = resize_nearest(parse[None], self.size)[0]
        mask = parse_mask(parse, UPPER_BODY_IDS, self.radius)
        return finish_sample(person, person, mask, cloth, name, self.size, self.ref_size, g, paths["parse"])

    def __repr__(self):
        return f"VitonHDDataset({self.root})"


# ----------------------------------------------------------------------------------------------
# 4b. DressCode: root/{upper_body,lower_body,dresses}/ each with images/ (NNNNNN_0.jpg the model,
#     NNNNNN_1.jpg the garment), label_maps/NNNNNN_4.png (18 ATR labels, by index) and the pair files
#     train_pairs.txt, test_pairs_paired.txt, test_pairs_unpaired.txt ("model garment", any whitespace)

DRESSCODE_CATEGORIES = ("upper_body", "lower_body", "dresses")
# ATR ids (not CIHP's): 4 upper-clothes, 5 skirt, 6 pants, 7 dress, 12/13 legs, 14/15 arms. ATR has no neck
# class (the neck is part of 11, the head); lower_body holds skirts too, which the parser labels 5.
DRESSCODE_REGION_IDS = {"upper_body": (4, 14, 15), "lower_body": (5, 6, 12, 13), "dresses": (7, 12, 13)}


class DressCodeDataset(SampleDataset):
    """Model photos of DressCode with the category's region masked and the in-shop garment as reference.

    category: one of DRESSCODE_CATEGORIES or "all" (the three, in that order).
    split "train": the garment is always the model's own (NNNNNN_1.jpg of NNNNNN_0.jpg), whatever column 2
    says, as for VITON-HD. split "test": paired=True reads <category>/test_pairs_paired.txt, paired=False
    test_pairs_unpaired.txt (another garment of the same category; no ground truth: target = source).
    The mask: DRESSCODE_REGION_IDS[category] at the output size, dilated by int(dilation * W) px, as for
    VITON-HD. Ids are unique across categories, so names are too.
    samples: [(name, paths)] as VitonHDDataset's, and categories[i] the category of sample i.
    """

    def __init__(self, root, split, size, ref_size=(224, 224), train=None, seed=0, skip_bad=False,
                 paired=True, category="all", dilation=5 / 256):
        train = split == "train" if train is None else train
        super().__init__(seed, train, skip_bad)
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', not {split!r}")
        if split == "train" and not paired:
            raise ValueError("training always uses the model's own garment (paired)")
        if category != "all" and category not in DRESSCODE_CATEGORIES:
            raise ValueError(f"category must be one of {DRESSCODE_CATEGORIES} or 'all', not {category!r}")
        self.root, self.size, self.ref_size = Path(root), _pair(size), _pair(ref_size)
        self.radius = int(dilation * self.size[1])
        file_name = "train_pairs.txt" if split == "train" else f"test_pairs_{'paired' if paired else 'unpaired'}.txt"
        self.samples, self.categories, bad, total = [], [], [], 0
        for cat in DRESSCODE_CATEGORIES if category == "all" else (category,):
            pairs_file = self.root / cat / file_name
            lines = read_pairs_file(pairs_file)
            total += len(lines)
            for n, (model, garment) in lines:
                if split == "train":
                    garment = model.replace("_0.", "_1.")
                paths = {"image": self.root / cat / "images" / model, "cloth": self.root / cat / "images" / garment,
                         "parse": self.root / cat / "label_maps" / (Path(model).stem.replace("_0", "_4") + ".png")}
                try:
                    if not Path(model).stem.endswith("_0") or not Path(garment).stem.endswith("_1"):
                        raise DataError(f"{pairs_file} line {n}: expected 'NNNNNN_0.jpg NNNNNN_1.jpg', got '{model} {garment}'")
                    check_pair_files(paths, pairs_file, n)
                    name = Path(model).stem if paired else f"{Path(model).stem}_{Path(garment).stem}"
                    self.samples.append((name, paths))
                    self.categories.append(cat)
                except DataError as e:
                    bad.append(e)
        keep_good(bad, total, skip_bad, "pairs")
        if not self.samples:
            raise DataError(f"{self.root}: no usable {split} pairs")

    def __len__(self):
        return len(self.samples)

    def load(self, i, g):
        name, paths = self.samples[i]
        person, cloth, parse = read_pair(paths, max_label=17)
        parse = resize_nearest(parse[None], self.size)[0]
        mask = parse_mask(parse, DRESSCODE_REGION_IDS[self.categories[i]], self.radius)
        return finish_sample(person, person, mask, cloth, name, self.size, self.ref_size, g, paths["parse"])

    def __repr__(self):
        return f"DressCodeDataset({self.root})"


# ----------------------------------------------------------------------------------------------
# 5. The teaching world: toy "virtual try-all" scenes that train on a CPU
#
# A product is a flat texture (stripes, checks, dots, glyph strokes, colour blocks; 2-3 colours) with a
# shape of its own: a top (worn by a person) or a cushion (on a sofa). A sample draws a scene, places the
# product's texture into the scene's region with a mild warp and shading, and shows the same product flat
# on white as the reference. The detail (stripe angle and phase, glyph shapes) is what a single global
# embedding loses, so only a model that uses the reference's spatial detail can redraw it.
#
# The world is built so that DTC's hint rule is right in it. The hint stretches the whole reference into
# the largest rectangle inside the mask (dtc.make_hint); so the scene maps the texture relative to that
# same rectangle: the point at relative position (a, b) of the rectangle shows the texture that the
# reference shows at relative position (a, b) of its canvas. Outside the rectangle (a top's sleeves, a
# cushion's rim) the same linear map goes on, past the reference's edge. And the worn product has the flat
# one's silhouette (a top's proportions and sleeves, a cushion's aspect), only scaled: with a box mask the
# rectangle is the region's bounding box and the hint shows the product's outline in place.
# Everything is drawn at SS x the output size and box-filtered down (anti-aliasing).

SS = 2
PATTERNS = ("stripes", "checks", "dots", "glyphs", "blocks")
HELDOUT_FIRST = 1_000_000  # held-out product ids start here; train ids are 0 .. n_products-1
WINDOW = (0.12, 0.88)  # the part of the texture square that the reference's canvas shows
MARGIN = 0.03  # white around the flat product's silhouette, a fraction of the reference canvas


@dataclass(frozen=True)
class Product:
    category: str  # "top" or "cushion"
    pattern: str  # one of PATTERNS
    colours: tuple  # 2 or 3 (r, g, b) in [0,1]; colour 0 is the light ground
    freq: float  # repeats per texture width
    angle: float  # radians: stripe / block direction
    duty: float  # stripe share, dot size or stroke width, per pattern
    phase: float
    strokes: tuple  # glyph strokes ((x0, y0, x1, y1), ...) in texture coordinates
    shape: tuple  # top: (half width / height, sleeve angle below horizontal, sleeve length / height); cushion: (width / height,)


def _hsv(h, s, v):
    """One HSV colour (h wraps) -> (r, g, b) floats."""
    k = [(n + h % 1.0 * 6) % 6 for n in (5, 3, 1)]
    return tuple(round(v - v * s * max(0.0, min(k_, 4 - k_, 1.0)), 4) for k_ in k)


def make_product(pid):
    """The product with integer id `pid`: its parameters depend on the id alone."""
    g = keyed_generator(0x9E0D, pid)
    category = "top" if _uniform(g) < 0.5 else "cushion"
    pattern = PATTERNS[int(_uniform(g) * len(PATTERNS))]
    h = _uniform(g)
    colours = (_hsv(h, _uniform(g, 0.15, 0.5), _uniform(g, 0.72, 0.95)),  # light ground
               _hsv(h + _uniform(g, 0.3, 0.7), _uniform(g, 0.5, 1.0), _uniform(g, 0.2, 0.6)),  # dark
               _hsv(h + _uniform(g, 0.1, 0.9), _uniform(g, 0.6, 1.0), _uniform(g, 0.55, 1.0)))  # accent
    colours = colours[:2] if _uniform(g) < 0.5 else colours
    freq, angle, duty, phase = _uniform(g, 1.25, 3.0), _uniform(g, 0.0, math.pi), _uniform(g, 0.3, 0.7), _uniform(g)
    strokes = ()
    if pattern == "glyphs":  # 2-3 letter-like glyphs in a row, each 2-4 strokes between points of a 3x3 lattice
        n, gw, gh = 2 + int(_uniform(g) < 0.5), 0.16, 0.24
        x0, y0 = 0.5 - n * gw * 1.5 / 2 + gw * 0.25, 0.5 - gh / 2 + _uniform(g, -0.15, 0.15)
        for j in range(n):
            for _ in range(2 + int(_uniform(g) * 3)):
                a, b = int(_uniform(g) * 9), int(_uniform(g) * 9)
                b = (a + 1 + b % 8) % 9  # a stroke joins two different lattice points
                strokes += ((round(x0 + j * gw * 1.5 + a % 3 * gw / 2, 4), round(y0 + a // 3 * gh / 2, 4),
                             round(x0 + j * gw * 1.5 + b % 3 * gw / 2, 4), round(y0 + b // 3 * gh / 2, 4)),)
    if category == "top":
        shape = (_uniform(g, 0.32, 0.42), _uniform(g, 0.75, 1.1), _uniform(g, 0.22, 0.3))
    else:
        shape = (_uniform(g, 0.8, 1.25),)
    return Product(category, pattern, colours, round(freq, 4), round(angle, 4), round(duty, 4), round(phase, 4),
                   strokes, tuple(round(s, 4) for s in shape))


def _segment_distance(u, v, strokes):
    """Distance from each point (u, v) to the nearest stroke."""
    s = torch.tensor(strokes)  # (K,4)
    a, d = s[:, None, :2], s[:, None, 2:] - s[:, None, :2]  # (K,1,2)
    p = torch.stack([u.reshape(-1), v.reshape(-1)], -1)[None]  # (1,N,2)
    t = (((p - a) * d).sum(-1) / (d * d).sum(-1)).clamp(0, 1)  # (K,N): the nearest point's position on each stroke
    return (p - a - t[..., None] * d).norm(dim=-1).min(0).values.reshape(u.shape)


def _frac(x):
    return x - x.floor()  # in [0,1) for negative x too (torch.frac keeps the sign)


def texture(product, u, v):
    """The product's colour at texture coordinates (u, v) in [0,1] (any shape) -> (3, *u.shape) in [0,1]."""
    p, n = product, len(product.colours)
    t = (u - 0.5) * math.cos(p.angle) + (v - 0.5) * math.sin(p.angle)  # position across the stripes
    if p.pattern == "stripes":  # 2 colours with a duty share, or 3 equal bands
        f = _frac(t * p.freq + p.phase)
        idx = (f * 3).long() if n == 3 else (f > p.duty).long()
    elif p.pattern == "checks":  # 2 colours: checkerboard; 3: gingham (the overlap of two stripe sets)
        a, b = _frac(u * p.freq + p.phase) < 0.5, _frac(v * p.freq + p.phase) < 0.5
        idx = a.long() + b.long() if n == 3 else (a ^ b).long()
    elif p.pattern == "dots":  # staggered rows; 3 colours: the dots alternate
        fv = v * p.freq + p.phase
        fu = u * p.freq + 0.5 * (fv.floor() % 2)
        dot = torch.hypot(_frac(fu) - 0.5, _frac(fv) - 0.5) < p.duty * 0.5
        idx = dot.long() * (1 + (n - 2) * ((fu.floor() + fv.floor()) % 2).long())
    elif p.pattern == "glyphs":  # strokes in colour 1; 3 colours: on a band of colour 2
        idx = torch.zeros_like(u, dtype=torch.long)
        if n == 3:
            ys = [s[1] for s in p.strokes] + [s[3] for s in p.strokes]
            idx[(v > min(ys) - 0.08) & (v < max(ys) + 0.08)] = 2
        idx[_segment_distance(u, v, p.strokes) < 0.012 + 0.02 * p.duty] = 1
    else:  # blocks: the square cut into 2 or 3 bands by parallel lines
        cut = (p.phase - 0.5) * 0.4
        idx = (t > cut).long() + ((t > cut + 0.1 + 0.2 * p.duty).long() if n == 3 else 0)
    return torch.tensor(p.colours)[idx].movedim(-1, 0)


def _box(x, y, cx, cy, hw, hh, angle=0.0):
    """Points inside a rectangle of half sizes (hw, hh) centred at (cx, cy), turned by `angle`."""
    c, s = math.cos(angle), math.sin(angle)
    dx, dy = x - cx, y - cy
    return ((dx * c + dy * s).abs() <= hw) & ((dy * c - dx * s).abs() <= hh)


def _ellipse(x, y, cx, cy, rx, ry):
    return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1


def _sleeves(cx, top, w, h, sleeve_angle, sleeve_len):
    """The two sleeve boxes of `_shirt`: (centre x, centre y, half length, half width, angle) per side."""
    return [(cx + side * (0.9 * w + 0.5 * sleeve_len * math.cos(sleeve_angle)),
             top + 0.12 * h + 0.5 * sleeve_len * math.sin(sleeve_angle), 0.5 * sleeve_len, 0.11 * h, side * sleeve_angle)
            for side in (-1, 1)]


def _shirt(x, y, cx, top, w, h, sleeve_angle, sleeve_len):
    """A T-shirt: body of half width w from the shoulder line `top` down h, two sleeves going out and down
    at `sleeve_angle` (radians below horizontal), a round neckline."""
    body = ((x - cx).abs() <= w * (1 - 0.08 * (y - top) / h)) & (y >= top) & (y <= top + h)
    for sx, sy, hw, hh, a in _sleeves(cx, top, w, h, sleeve_angle, sleeve_len):
        body |= _box(x, y, sx, sy, hw, hh, a)
    return body & ~_ellipse(x, y, cx, top, 0.38 * w, 0.12 * h)


def _shirt_bbox(cx, top, w, h, sleeve_angle, sleeve_len):
    """(x0, y0, x1, y1) of `_shirt`, exactly: the body's and the two turned sleeve boxes' extents."""
    x0, y0, x1, y1 = cx - w, top, cx + w, top + h
    for sx, sy, hw, hh, a in _sleeves(cx, top, w, h, sleeve_angle, sleeve_len):
        ex, ey = hw * abs(math.cos(a)) + hh * abs(math.sin(a)), hw * abs(math.sin(a)) + hh * abs(math.cos(a))
        x0, y0, x1, y1 = min(x0, sx - ex), min(y0, sy - ey), max(x1, sx + ex), max(y1, sy + ey)
    return x0, y0, x1, y1


def _superellipse(x, y, cx, cy, rx, ry, angle, power=3.0):
    """Radius-like value of a rounded rectangle with half sizes (rx, ry) (< 1 inside), and local coordinates in [-1,1]."""
    c, s = math.cos(angle), math.sin(angle)
    du, dv = ((x - cx) * c + (y - cy) * s) / rx, ((y - cy) * c - (x - cx) * s) / ry
    return (du.abs() ** power + dv.abs() ** power) ** (1 / power), du, dv


def _grid(h, w):
    """Pixel-centre coordinates in [0,1]: x (h,w) across, y (h,w) down."""
    y = (torch.arange(h) + 0.5) / h
    x = (torch.arange(w) + 0.5) / w
    return x[None].expand(h, w), y[:, None].expand(h, w)


def _texture_coords(x, y, box):
    """Texture coordinates that map the box (x0, y0, x1, y1) onto the WINDOW, and go on linearly outside it."""
    (lo, hi), (x0, y0, x1, y1) = WINDOW, box
    return lo + (x - x0) / (x1 - x0) * (hi - lo), lo + (y - y0) / (y1 - y0) * (hi - lo)


def _paint(image, region, colour):
    image[:, region] = torch.tensor(colour)[:, None]


def _muted(g, lo=0.35, hi=0.95):
    return _hsv(_uniform(g), _uniform(g, 0.0, 0.35), _uniform(g, lo, hi))


@contextmanager
def _one_thread():
    """Run torch single-threaded inside. The world's tensors are small: intra-op threads gain nothing, on a
    busy CPU their hand-offs made a sample 10-30x slower (~8 ms single-threaded, 50-300 ms with 2 contended
    threads), and the thread count changes float rounding, which would make scenes depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class TeachingWorld(SampleDataset):
    """Toy scenes with a product in them; source = target = the scene, mask = the product's region
    (its fine shape), reference = the product flat on white.

    split "train" uses products 0 .. n_products-1 (sample i: product i % n_products); split "heldout"
    uses products HELDOUT_FIRST + i, never seen in training. The scene of sample i depends on (seed,
    split, i) only; train=None means train = (split == "train"), which adds the 50/50 box rule and
    the flip and rotation (finish_sample, as the other datasets). The box rule is drawn before the scene,
    because the scene maps its texture onto the largest rectangle of the mask the model will be given.
    """

    def __init__(self, size=64, split="train", length=10_000, seed=0, ref_size=(64, 64), train=None,
                 n_products=1000, distort=True):
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', not {split!r}")
        super().__init__(seed, split == "train" if train is None else train, skip_bad=False)
        self.size, self.split, self.length = size, split, length
        self.ref_size, self.n_products = _pair(ref_size), n_products
        self.distort = distort  # False: no warp and no shading (the tests check the geometry so)

    def __len__(self):
        return self.length

    def product_id(self, i):
        return i % self.n_products if self.split == "train" else HELDOUT_FIRST + i

    def reference(self, product):
        """(3, *ref_size) in [-1,1]: the product flat on white, its silhouette's bounding box the canvas less
        MARGIN on each side, the texture's WINDOW spread over the whole canvas (as the scene spreads it over
        the rectangle the hint fills)."""
        with _one_thread():
            x, y = _grid(SS * self.ref_size[0], SS * self.ref_size[1])
            if product.category == "top":
                aspect, sleeve, sleeve_len = product.shape
                x0, y0, x1, y1 = _shirt_bbox(0.0, 0.0, aspect, 1.0, sleeve, sleeve_len)  # the shirt at height 1
                sx, sy = (x - MARGIN) / (1 - 2 * MARGIN), (y - MARGIN) / (1 - 2 * MARGIN)  # canvas -> [0,1] of the bbox
                flat = _shirt(x0 + sx * (x1 - x0), y0 + sy * (y1 - y0), 0.0, 0.0, aspect, 1.0, sleeve, sleeve_len)
            else:
                flat = _superellipse(x, y, 0.5, 0.5, 0.5 - MARGIN, 0.5 - MARGIN, 0.0)[0] <= 1
            u, v = _texture_coords(x, y, (0.0, 0.0, 1.0, 1.0))
            image = torch.where(flat, texture(product, u, v), torch.ones(()))
            return F.avg_pool2d(image[None], SS)[0] * 2 - 1

    def scene(self, i, product, box=False):
        """Scene i with `product` in its region (None: the scene without it); box: the texture follows the
        region's bounding box (the mask of the 50/50 box rule) instead of its fine shape.
        Returns image (3,size,size) in [-1,1] and the fine fill map (size,size) bool (True = the region:
        every pixel the product touches)."""
        with _one_thread():
            return self._scene(i, product, box)

    def _scene(self, i, product, box):
        g = keyed_generator(self.seed, ("train", "heldout").index(self.split), i, 0x5CE9E)  # the content stream
        shape_of = make_product(self.product_id(i))  # the scene is drawn for its own product's shape
        S = SS * self.size
        x, y = _grid(S, S)
        # background: a vertical gradient or a wall/floor split, smooth blotches and light pixel noise
        top, bottom = torch.tensor(_muted(g))[:, None, None], torch.tensor(_muted(g, 0.3, 0.8))[:, None, None]
        if _uniform(g) < 0.5:
            image = top + (bottom - top) * y
        else:
            horizon = _uniform(g, 0.55, 0.8)
            image = torch.where(y < horizon, top * (0.92 + 0.08 * y), bottom * (1.1 - 0.3 * (y - horizon)))
        blotches = F.interpolate(torch.rand((1, 3, 5, 5), generator=g), size=(S, S), mode="bilinear", align_corners=False)[0]
        image = image + 0.08 * (blotches - 0.5) + 0.03 * (torch.rand((3, S, S), generator=g) - 0.5)
        draw = self._person if shape_of.category == "top" else self._sofa
        region, warp, shade = draw(g, image, x, y, shape_of.shape)
        fill = F.max_pool2d(region[None, None].float(), SS)[0, 0] > 0
        # the rectangle the hint will fill: the largest one inside the mask (or the whole box), in [0,1] units
        keep = (~fill).float()
        top_, left, bottom_, right = largest_rectangle(bbox_mask(keep[None])[0] if box else keep)
        u, v = _texture_coords(x, y, (left / self.size, top_ / self.size, right / self.size, bottom_ / self.size))
        light = _uniform(g, 0.0, 2 * math.pi)  # a smooth light gradient across the product
        shade = shade * (1 + 0.15 * ((x - 0.5) * math.cos(light) + (y - 0.5) * math.sin(light)))
        if self.distort:
            u, v = warp(u, v)
        else:
            shade = torch.ones(())
        if product is not None:
            assert product.category == shape_of.category, "a scene holds products of its own category"
            image = torch.where(region, texture(product, u, v) * shade, image)
        image = F.avg_pool2d(image.clamp(0, 1)[None], SS)[0] * 2 - 1
        return image, fill

    def _person(self, g, image, x, y, shape):
        """Draws a person without the top into `image`; returns the top's region, its texture warp and shading."""
        aspect, sleeve, sleeve_len = shape
        s, cx, shoulder = _uniform(g, 0.95, 1.15), _uniform(g, 0.38, 0.62), _uniform(g, 0.33, 0.38)
        skin = _hsv(_uniform(g, 0.03, 0.1), _uniform(g, 0.3, 0.6), _uniform(g, 0.35, 0.95))
        hair = _hsv(_uniform(g, 0.0, 0.12), _uniform(g, 0.3, 0.8), _uniform(g, 0.1, 0.5))
        trousers = _hsv(_uniform(g), _uniform(g, 0.2, 0.7), _uniform(g, 0.15, 0.5))
        h = 0.42 * s * _uniform(g, 0.9, 1.1)
        w = aspect * h
        hem = shoulder + h
        _paint(image, _ellipse(x, y, cx, shoulder - 0.19 * s, 0.085 * s, 0.075 * s), hair)
        _paint(image, _ellipse(x, y, cx, shoulder - 0.15 * s, 0.07 * s, 0.09 * s)
               | _box(x, y, cx, shoulder - 0.04 * s, 0.03 * s, 0.05 * s)  # neck
               | _box(x, y, cx, shoulder + 0.5 * h, 0.85 * w, 0.5 * h), skin)  # the torso under the top
        for side in (-1, 1):  # arms hang from the shoulders, a little steeper than the sleeves
            a = sleeve + 0.25
            ax, ay = cx + side * (0.9 * w + 0.19 * s * math.cos(a)), shoulder + 0.05 * h + 0.19 * s * math.sin(a)
            _paint(image, _box(x, y, ax, ay, 0.19 * s, 0.032 * s, side * a), skin)
        _paint(image, (_box(x, y, cx - 0.065 * s, (hem + 1.0) / 2, 0.06 * s, (1.0 - hem) / 2 + 0.01)
                       | _box(x, y, cx + 0.065 * s, (hem + 1.0) / 2, 0.06 * s, (1.0 - hem) / 2 + 0.01)), trousers)
        region = _shirt(x, y, cx, shoulder, w, h, sleeve, sleeve_len * h)
        # a worn top: a mild perspective taper and sine folds; shading like a cylinder around the torso
        taper, fold, phase = _uniform(g, -0.06, 0.06), _uniform(g, 0.003, 0.012), _uniform(g, 0, 2 * math.pi)

        def warp(u, v):
            u = 0.5 + (u - 0.5) * (1 + taper * (v - 0.5)) + fold * torch.sin(2 * math.pi * 3 * v + phase)
            return u, v + fold * torch.sin(2 * math.pi * 2 * u + phase)
        shade = 1.05 - 0.2 * ((x - cx) / (w + 0.12 * s)).clamp(-1, 1) ** 2
        return region, warp, shade

    def _sofa(self, g, image, x, y, shape):
        """Draws a sofa into `image`; returns a cushion's region, its texture warp and shading."""
        colour = _muted(g, 0.25, 0.8)
        darker = tuple(0.8 * c for c in colour)
        x0, x1 = _uniform(g, 0.04, 0.18), _uniform(g, 0.82, 0.96)
        back, seat = _uniform(g, 0.28, 0.36), _uniform(g, 0.6, 0.68)
        arm = 0.08
        _paint(image, _box(x, y, x0 + 0.03, seat + 0.2, 0.015, 0.04) | _box(x, y, x1 - 0.03, seat + 0.2, 0.015, 0.04), (0.15, 0.1, 0.08))
        _paint(image, _box(x, y, (x0 + x1) / 2, (back + seat) / 2, (x1 - x0) / 2 - arm, (seat - back) / 2), darker)
        _paint(image, _box(x, y, (x0 + x1) / 2, seat + 0.08, (x1 - x0) / 2, 0.08), colour)
        for ax in (x0 + arm / 2, x1 - arm / 2):  # armrests with rounded tops
            _paint(image, _box(x, y, ax, (back + 0.14 + seat + 0.16) / 2, arm / 2, (seat + 0.16 - back - 0.14) / 2)
                   | _ellipse(x, y, ax, back + 0.14, arm / 2, 0.03), tuple(0.9 * c for c in colour))
        r, tilt = _uniform(g, 0.17, 0.23), _uniform(g, -0.08, 0.08)
        rx, ry = r * shape[0] ** 0.5, r / shape[0] ** 0.5
        cx = _uniform(g, x0 + arm + rx + 0.02, x1 - arm - rx - 0.02)
        cy = seat - ry * _uniform(g, 0.6, 0.9)
        if _uniform(g) < 0.5:  # a plain cushion beside it, on the side with more room
            other = cx - 1.9 * rx if cx - x0 > x1 - cx else cx + 1.9 * rx
            _paint(image, _superellipse(x, y, other, cy + 0.02, 0.8 * rx, 0.8 * ry, -tilt)[0] <= 1, _muted(g, 0.4, 0.9))
        rr, _, _ = _superellipse(x, y, cx, cy, rx, ry, tilt)
        region = rr <= 1
        bulge = _uniform(g, 0.03, 0.08)

        def warp(u, v):  # a puffed cushion: the pattern swells a little towards the middle
            k = 1 + bulge * (1 - rr.clamp(0, 1) ** 2)
            return 0.5 + (u - 0.5) * k, 0.5 + (v - 0.5) * k
        shade = 1.04 - 0.3 * rr.clamp(0, 1) ** 4
        return region, warp, shade

    def load(self, i, g):
        with _one_thread():
            box = g is not None and torch.rand((), generator=g).item() < 0.5  # the 50/50 rule, drawn first
            product = make_product(self.product_id(i))
            image, fill = self.scene(i, product, box)
            return finish_sample(image, image, (~fill).float()[None], self.reference(product), f"{self.split}_{i:06d}",
                                 (self.size, self.size), self.ref_size, g, f"teaching world {self.split} {i}", box=box)


def write_heldout(root, n, size, seed=0):
    """A held-out evaluation set in the triplet layout WITH target/: target = the scene with a held-out
    product; source = the same scene with a different (train) product of the same category in the
    region, so a model cannot pass by copying the source; mask = the region; reference = the held-out
    product flat (size x size)."""
    world = TeachingWorld(size, "heldout", length=n, seed=seed, ref_size=(size, size), train=False)
    samples = []
    for i in range(n):
        product = make_product(world.product_id(i))
        g = keyed_generator(seed, i, 0xD15, 0)  # the distractor's own stream (4 values: not a sample_rng stream)
        other = make_product(int(_uniform(g) * world.n_products))
        while other.category != product.category:  # train ids until one of the same category
            other = make_product(int(_uniform(g) * world.n_products))
        target, fill = world.scene(i, product)
        source, _ = world.scene(i, other)
        samples.append({"name": f"heldout_{i:05d}", "source": source, "target": target,
                        "mask": (~fill).float()[None], "reference": world.reference(product)})
    write_triplets(root, samples)


if __name__ == "__main__":  # python data.py [out.png]: a preview grid of teaching-world samples
    world = TeachingWorld(64, "train", length=16, seed=0)
    rows = []
    for i in range(16):
        s = world[i]
        masked = s["source"] * s["mask"]  # what the model sees: the region blanked (grey); then the mask, white = fill
        rows.append(torch.cat([s["source"], masked, 1 - 2 * s["mask"].expand(3, -1, -1),
                               resize_image(s["reference"], (64, 64))], -1))
    grid = torch.cat([torch.cat(rows[k::2], -2) for k in range(2)], -1)  # two columns of 8 samples
    to_pil(grid).resize((grid.shape[-1] * 2, grid.shape[-2] * 2), Image.NEAREST).save(sys.argv[1] if len(sys.argv) > 1 else "/tmp/teaching_world.png")
