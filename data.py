"""
Training and evaluation data for Diffuse to Choose: image reading and writing, three dataset layouts (our own
triplet folders and the VITON-HD and DressCode releases; docs/datasets.md) and the training-time randomness. The
synthetic teaching world, whose samples have the same keys and shapes, is world.py.

Conventions (every function here keeps them):
- Images are float tensors (3,H,W) in [-1,1]. Files are read fully decoded, upright (EXIF orientation
  applied), transparency composited on WHITE, and converted to RGB.
- Masks inside the model are Paint-by-Example's: float (1,H,W), 1 = keep, 0 = the region to fill.
  Mask FILES on disk follow the user convention: white = region to fill, thresholded at 128 (JPEG leaves
  grey edges), transparent = keep (a white shape on a transparent layer is that shape), so a file is
  inverted on reading and on writing.
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
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageFile, ImageOps
from torch.utils.data import Dataset

from checkpoint import not_a_file

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
OUTPUT_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}  # an output's extension sets its format


class DataError(ValueError):
    """A data file that cannot be used; the message names the file and what is wrong."""


# ----------------------------------------------------------------------------------------------
# 1. Reading and writing images and masks

def _decode(path):
    """The fully decoded, upright PIL image at `path` (any mode)."""
    path = Path(path)
    if why := not_a_file(path):
        raise DataError(f"{path}: {why}")
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
    if why := not_a_file(path):
        raise DataError(f"{path}: {why}")
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


def pil_to_tensor(im):
    """A PIL image's stored values as a (C,H,W) tensor: uint8 for 8-bit modes (L, P: the indices, RGB, RGBA), float32
    for F. Plain torch, not torchvision: importing torchvision.transforms took 2-5 s of sample.py's start."""
    x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.float32 if im.mode == "F" else torch.uint8)
    return x.view(im.height, im.width, len(im.getbands())).permute(2, 0, 1)


def uint8_to_pil(x):
    """(1,H,W) or (3,H,W) uint8 tensor -> PIL "L" or "RGB" image."""
    return Image.frombytes("L" if len(x) == 1 else "RGB", (x.shape[2], x.shape[1]),
                           bytes(x.permute(1, 2, 0).contiguous().untyped_storage()))


def _eight_bit(im):
    """Greyscale stored in more than 8 bits -> "L", scaled by the range its values are stored in: 16-bit modes
    (I;16*) by 65535; 32-bit integers (I) by the smallest of 255, 65535 and 2^32 - 1 that holds their largest value;
    floats (F) by 1 when they lie in [0, 1], else as I. (PIL's own convert clips them at 255: a 16-bit photo would
    turn white.) Other modes are returned as they are."""
    if not im.mode.startswith(("I", "F")):
        return im
    x = pil_to_tensor(im.convert("F")).double().nan_to_num(0)  # (1,H,W), exact for 16-bit values
    top = x.max().item()
    if im.mode.startswith("I;16"):
        top = 65535
    elif not (im.mode == "F" and top <= 1):
        top = next((t for t in (255, 65535, 2 ** 32 - 1) if top <= t), top)
    return uint8_to_pil((x / max(top, 1e-12) * 255).round().clamp(0, 255).to(torch.uint8))


def _on_background(im, colour):
    """An image with transparency (RGBA, LA, palette or grey with a transparent colour) composited on `colour`
    (an RGB triple), as RGB; any other image as it is."""
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        im = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", im.size, (*colour, 255)), im).convert("RGB")
    return im


def load_image(path):
    """PIL RGB image; transparency (RGBA, LA, palette or grey with a transparent colour) goes on white; greyscale
    of 16 or 32 bits by its value range (_eight_bit); CMYK by PIL's conversion."""
    return _on_background(_eight_bit(_decode(path)), (255, 255, 255)).convert("RGB")  # grey, palette, CMYK too


def load_mask(path, size=None, resize=False):
    """(1,H,W) float, 1 = keep, from a file where white (>= 128) = the region to fill. Transparency means keep:
    the file is read as if laid on black, so a white shape painted on a transparent layer is that shape, whatever
    colour the transparent pixels hold.

    size: the source's (H, W). A mask of another size is an error, unless resize=True, which resizes
    the file with NEAREST before thresholding (with a one-line warning when that stretches it: another aspect
    ratio than a rounded scaling of the source would have).
    """
    im = _on_background(_eight_bit(_decode(path)), (0, 0, 0)).convert("L")  # RGB or palette masks: their luminance
    if size is not None and im.size != (size[1], size[0]):
        (w, h), (H, W) = im.size, size
        if not resize:
            raise DataError(f"{path}: mask is {w}x{h}, the source is {W}x{H}")
        if abs(h - w * H / W) > 1 and abs(w - h * W / H) > 1:
            print(f"warning: {path}: the mask is {w}x{h}, another aspect ratio than the source's {W}x{H}: "
                  "it is stretched to the source", file=sys.stderr)
        im = im.resize((W, H), Image.NEAREST)
    fill = pil_to_tensor(im) >= 128  # (1,H,W)
    return (~fill).float()


def check_output_image(path, what):
    """Raises DataError unless an image can be written at `path`: its extension one of OUTPUT_FORMATS, not an
    existing folder, and its nearest existing parent a folder. `what` (the option) is named in the message."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path} ({what}): is an existing folder; name an image file")
    if path.suffix.lower() not in OUTPUT_FORMATS:
        raise DataError(f"{path} ({what}): the extension sets the format and must be one of {', '.join(OUTPUT_FORMATS)}")
    _check_parent(path, what)


def check_output_folder(path, what):
    """Raises DataError unless a folder of outputs can be made at `path` (or is there): not an existing file, and
    its nearest existing parent a folder. `what` (the option) is named in the message."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DataError(f"{path} ({what}): is a file, expected a folder")
    _check_parent(path, what)


def _check_parent(path, what):
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
    parse = pil_to_tensor(im)[0]  # P and L: the stored indices, (H,W) uint8
    if parse.max() > 19:
        raise DataError(f"{path}: parse map has label {int(parse.max())}; CIHP labels are 0..19")
    return parse


def to_tensor(pil):
    """PIL image -> (3,H,W) float in [-1,1]."""
    return pil_to_tensor(pil.convert("RGB")).float() / 127.5 - 1


def to_pil(x):
    """(3,H,W) (or (1,H,W)) tensor in [-1,1] -> PIL image."""
    return uint8_to_pil(((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8))


def mask_to_pil(mask):
    """(1,H,W) mask, 1 = keep -> PIL "L" image in the file convention (white = fill)."""
    return uint8_to_pil(((1 - mask.detach().float().cpu()) * 255).round().to(torch.uint8))


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


def uniform(g, lo=0.0, hi=1.0):
    """One float drawn uniformly in [lo, hi) from generator g."""
    return lo + (hi - lo) * torch.rand((), generator=g).item()


def size_pair(size):
    """An int or (H, W) size as (H, W)."""
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
    angle = uniform(g, -20.0, 20.0)
    if flip:
        source, target, mask, reference = (x.flip(-1) for x in (source, target, mask, reference))
    return source, target, mask, reference, rotate(reference, angle)


def rotate(x, degrees, fill=1.0):
    """(C,H,W) turned counter-clockwise by `degrees` about its centre, bilinear; what comes in from outside the
    image is `fill` (blended at the edges). The output pixel at (u, v) from the centre shows the input at (u, v)
    turned back; affine_grid works in [-1, 1] on each axis, hence the aspect factors H/W and W/H."""
    C, H, W = x.shape
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    theta = torch.tensor([[c, -s * H / W, 0.0], [s * W / H, c, 0.0]], dtype=x.dtype, device=x.device)
    grid = F.affine_grid(theta[None], [1, C, H, W], align_corners=False)
    return F.grid_sample(x[None] - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0] + fill


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


def keep_good(kept, bad, skip_bad, what, folder):
    """The up-front rule of every reader, once it has checked each sample of `folder` into `kept` or, as its
    DataError, into `bad`: the first bad one stops, counting the others; with skip_bad they are dropped with one
    warning that counts them. Nothing left to keep stops too. `what` names the samples ("samples", "train pairs")."""
    if bad and not skip_bad:
        more = f" (and {len(bad) - 1} more bad {what}; skip_bad=True drops them)" if len(bad) > 1 else ""
        raise DataError(f"{bad[0]}{more}")
    if bad:  # called from the readers' __init__: stacklevel 3 names the line that built the dataset
        total = len(kept) + len(bad)
        warnings.warn(f"skipped {len(bad)} of {total} samples with bad files; first: {bad[0]}", stacklevel=3)
    if not kept:
        raise DataError(f"{folder}: no usable {what}")


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
        self.root, self.size, self.ref_size = Path(root), size_pair(size), size_pair(ref_size)
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
        keep_good(self.samples, bad, skip_bad, "samples", self.root)

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
# 4. The try-on releases, VITON-HD and DressCode: rows "person garment" of pair files, the garment as the reference,
#    the mask from the person's parse map (the layouts and their traps: docs/datasets.md §2 and §3)

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


def read_pairs_file(pairs_file, form="person.jpg cloth.jpg", stems=("", "")):
    """[(line number, [person, garment]), ...] of the non-empty rows; columns split on any whitespace (tabs or
    spaces: the releases' files are read that way by every public loader). A row that is not two names whose stems
    end with `stems` (DressCode's "_0" and "_1") is a DataError naming the line and `form`: a broken pair file stops
    even with skip_bad."""
    if why := not_a_file(pairs_file):
        raise DataError(f"{pairs_file}: {why}")
    lines = [(n, line.split()) for n, line in enumerate(pairs_file.read_text().splitlines(), 1) if line.strip()]
    if not lines:
        raise DataError(f"{pairs_file}: no pairs")
    for n, names in lines:
        if len(names) != 2 or not all(Path(name).stem.endswith(end) for name, end in zip(names, stems)):
            raise DataError(f"{pairs_file} line {n}: expected '{form}', got {' '.join(names)!r}")
    return lines


def check_pair_files(paths, pairs_file, n):
    """Header-level checks of the files of one pair-file row (no decoding, so they stay fast on a whole
    release): each exists and is an image, and the parse map is a map of label ids at the photo's size."""
    for path in paths.values():
        if why := not_a_file(path):
            raise DataError(f"{path}: {why} (needed by {pairs_file.name} line {n})")
    W, H, _ = _header(paths["image"])
    _header(paths["cloth"])
    w, h, mode = _header(paths["parse"])
    if mode not in ("P", "L"):
        raise DataError(f"{paths['parse']}: parse map is mode {mode}; expected a palette ('P') or 'L' map of label ids")
    if (w, h) != (W, H):
        raise DataError(f"{paths['parse']}: parse map is {w}x{h}, the image is {W}x{H}")


class ReleaseDataset(SampleDataset):
    """What the VITON-HD and DressCode readers share. Each pair-file row is a person photo, a garment (the
    reference) and the person's parse map. The mask: the parse map's labels of the garment's category,
    region_ids[category], at the output size, dilated by int(dilation * W) px (W = the output width; 5/256 is
    DCI-VTON's kernel size rule), then the 50/50 box rule in training. target = source: paired, the person wears
    the garment; unpaired, there is no ground truth.
    split "train" is paired only: the releases' training pair files are not pairings, so training takes the
    person's own garment whatever column 2 says (every public loader does the same).
    samples: [(name, {"image", "cloth", "parse"} paths)]; name = the person's stem, paired, or
    "<person stem>_<garment stem>", unpaired. categories[i]: the category of sample i.
    A subclass sets max_label (the parse maps' largest label id) and region_ids, lists its pair-file rows and
    keeps the good ones: keep_good(self.samples, self.add_pairs(rows), ...)."""

    def __init__(self, root, split, size, ref_size, train, seed, skip_bad, paired, dilation):
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', not {split!r}")
        if split == "train" and not paired:
            raise ValueError("the training pair files are not pairings: training always uses the person's own garment")
        super().__init__(seed, split == "train" if train is None else train, skip_bad)
        self.root, self.paired = Path(root), paired
        self.size, self.ref_size = size_pair(size), size_pair(ref_size)
        self.radius = int(dilation * self.size[1])
        self.samples, self.categories = [], []

    def add_pairs(self, rows):
        """Adds the rows [(pairs file, line number, category, paths), ...] whose files pass check_pair_files;
        returns the DataErrors of the others."""
        bad = []
        for pairs_file, n, category, paths in rows:
            try:
                check_pair_files(paths, pairs_file, n)
            except DataError as e:
                bad.append(e)
                continue
            person, garment = paths["image"].stem, paths["cloth"].stem
            self.samples.append((person if self.paired else f"{person}_{garment}", paths))
            self.categories.append(category)
        return bad

    def __len__(self):
        return len(self.samples)

    def load(self, i, g):
        name, paths = self.samples[i]
        person, cloth = to_tensor(load_image(paths["image"])), to_tensor(load_image(paths["cloth"]))
        parse = load_parse(paths["parse"])
        # checked again after decoding: a header can lie about a file that fails to decode
        if tuple(parse.shape) != tuple(person.shape[-2:]):
            raise DataError(f"{paths['parse']}: parse map is {parse.shape[1]}x{parse.shape[0]}, "
                            f"the image is {person.shape[2]}x{person.shape[1]}")
        if parse.max() > self.max_label:
            raise DataError(f"{paths['parse']}: parse map has label {int(parse.max())}; "
                            f"this layout's labels are 0..{self.max_label}")
        parse = resize_nearest(parse[None], self.size)[0]
        mask = parse_mask(parse, self.region_ids[self.categories[i]], self.radius)
        return finish_sample(person, person, mask, cloth, name, self.size, self.ref_size, g, paths["parse"])

    def __repr__(self):
        return f"{type(self).__name__}({self.root})"


# ----------------------------------------------------------------------------------------------
# 4a. VITON-HD: root/{train,test}_pairs.txt and root/<split>/{image,cloth,image-parse-v3}/; upper-body garments only

UPPER_BODY_IDS = (5, 6, 7, 10, 14, 15)  # CIHP upper-clothes, dress, coat, neck (torso-skin), left arm, right arm


class VitonHDDataset(ReleaseDataset):
    """Person photos of VITON-HD with the upper-body garment region masked and the in-shop cloth as the reference
    (ReleaseDataset). split "train" reads train_pairs.txt, "test" test_pairs.txt (the unpaired setting):
    paired=True uses cloth/<person name>, paired=False column 2."""

    max_label = 19  # CIHP's 20 labels
    region_ids = {"upper_body": UPPER_BODY_IDS}

    def __init__(self, root, split, size, ref_size=(224, 224), train=None, seed=0, skip_bad=False,
                 paired=True, dilation=5 / 256):
        super().__init__(root, split, size, ref_size, train, seed, skip_bad, paired, dilation)
        pairs_file, folder = self.root / f"{split}_pairs.txt", self.root / split
        rows = []
        for n, (person, cloth) in read_pairs_file(pairs_file):
            if paired:
                cloth = person  # the person's own, whatever column 2 says
            parse = folder / "image-parse-v3" / (Path(person).stem + ".png")
            rows.append((pairs_file, n, "upper_body", {"image": folder / "image" / person,
                                                       "cloth": folder / "cloth" / cloth, "parse": parse}))
        keep_good(self.samples, self.add_pairs(rows), skip_bad, f"{split} pairs", self.root)


# ----------------------------------------------------------------------------------------------
# 4b. DressCode: root/{upper_body,lower_body,dresses}/ each with images/ (NNNNNN_0.jpg the model,
#     NNNNNN_1.jpg the garment), label_maps/NNNNNN_4.png (18 ATR labels, by index) and the pair files
#     train_pairs.txt, test_pairs_paired.txt, test_pairs_unpaired.txt

DRESSCODE_CATEGORIES = ("upper_body", "lower_body", "dresses")
# ATR ids (not CIHP's): 4 upper-clothes, 5 skirt, 6 pants, 7 dress, 12/13 legs, 14/15 arms. ATR has no neck
# class (the neck is part of 11, the head); lower_body holds skirts too, which the parser labels 5.
DRESSCODE_REGION_IDS = {"upper_body": (4, 14, 15), "lower_body": (5, 6, 12, 13), "dresses": (7, 12, 13)}


class DressCodeDataset(ReleaseDataset):
    """Model photos of DressCode with the category's region masked and the in-shop garment as the reference
    (ReleaseDataset). category: one of DRESSCODE_CATEGORIES or "all" (the three, in that order). split "train"
    reads <category>/train_pairs.txt, "test" test_pairs_paired.txt or, paired=False, test_pairs_unpaired.txt
    (another garment of the same category). Ids are unique across categories, so names are too."""

    max_label = 17  # ATR's 18 labels
    region_ids = DRESSCODE_REGION_IDS

    def __init__(self, root, split, size, ref_size=(224, 224), train=None, seed=0, skip_bad=False,
                 paired=True, category="all", dilation=5 / 256):
        super().__init__(root, split, size, ref_size, train, seed, skip_bad, paired, dilation)
        if category != "all" and category not in DRESSCODE_CATEGORIES:
            raise ValueError(f"category must be one of {DRESSCODE_CATEGORIES} or 'all', not {category!r}")
        file_name = "train_pairs.txt" if split == "train" else f"test_pairs_{'paired' if paired else 'unpaired'}.txt"
        rows = []
        for cat in DRESSCODE_CATEGORIES if category == "all" else (category,):
            pairs_file, folder = self.root / cat / file_name, self.root / cat
            for n, (model, garment) in read_pairs_file(pairs_file, "NNNNNN_0.jpg NNNNNN_1.jpg", ("_0", "_1")):
                if split == "train":
                    garment = model.replace("_0.", "_1.")  # the model's own, whatever column 2 says
                parse = folder / "label_maps" / (Path(model).stem.replace("_0", "_4") + ".png")
                rows.append((pairs_file, n, cat, {"image": folder / "images" / model,
                                                  "cloth": folder / "images" / garment, "parse": parse}))
        keep_good(self.samples, self.add_pairs(rows), skip_bad, f"{split} pairs", self.root)


# ----------------------------------------------------------------------------------------------
# 5. Which layout a folder holds: train.py and evaluate.py read --data through this one rule

def find_layout(folder):
    """(layout, root, category) of a --data folder, from the names in it:
    - ("dresscode", root, "all"): a DressCode release, which holds the category folders. Its root also holds pair
      files named like VITON-HD's (train_pairs.txt, test_pairs_paired.txt, test_pairs_unpaired.txt, rows
      "model garment category"), so it is recognised first, by its folders;
    - ("dresscode", parent, category): one category folder of it (e.g. DressCode/dresses, with its images/);
    - ("vitonhd", root, None): a VITON-HD release, whose root holds train_pairs.txt and/or test_pairs.txt (beside
      train/ and test/; a missing folder is named by the reader, per pair-file line);
    - ("triplets", root, None): anything else, a triplet folder (source/, mask/, reference/, optional target/)."""
    root = Path(folder)
    if any((root / c).is_dir() for c in DRESSCODE_CATEGORIES):
        return "dresscode", root, "all"
    if root.name in DRESSCODE_CATEGORIES and (root / "images").is_dir():
        return "dresscode", root.parent, root.name
    if any((root / f"{split}_pairs.txt").is_file() for split in ("train", "test")):
        return "vitonhd", root, None
    return "triplets", root, None
