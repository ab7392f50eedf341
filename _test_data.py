"""Tests of data.py: image reading, triplet folders, the VITON-HD layout, the teaching world."""
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from data import (DataError, HELDOUT_FIRST, PATTERNS, TeachingWorld, TripletDataset, VitonHDDataset,
                  augment_reference, bbox_mask, flip_parse, load_image, load_mask, load_parse, make_product,
                  sample_rng, to_pil, to_tensor, write_heldout, write_triplets)


def _rand_rgb(h, w, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _truncate(path):
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])


# ---------------------------------------------------------------------------------------------- reading

def test_data_load_image_modes(tmp_path):
    """Transparency goes on white (RGBA, LA, palette with a transparent index); grey, palette, CMYK -> RGB."""
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200  # red everywhere
    rgba[0, 0, 3], rgba[0, 1, 3], rgba[0, 2, 3] = 0, 255, 128  # transparent, opaque, half
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    im = np.asarray(load_image(tmp_path / "a.png")).astype(int)
    assert load_image(tmp_path / "a.png").mode == "RGB"
    assert im[0, 0].tolist() == [255, 255, 255] and im[0, 1].tolist() == [200, 0, 0]
    assert abs(im[0, 2, 0] - 228) <= 1 and abs(im[0, 2, 1] - 127) <= 1  # 0.5*200 + 0.5*255, 0.5*255

    la = np.stack([np.full((3, 3), 40, np.uint8), np.zeros((3, 3), np.uint8)], -1)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    assert np.asarray(load_image(tmp_path / "la.png")).min() == 255

    p = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), "P")
    p.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    p.save(tmp_path / "p.png")
    assert np.asarray(load_image(tmp_path / "p.png"))[0, 1].tolist() == [200, 100, 50]
    p.save(tmp_path / "pt.png", transparency=0)
    im = np.asarray(load_image(tmp_path / "pt.png"))
    assert im[0, 0].tolist() == [255, 255, 255] and im[0, 1].tolist() == [200, 100, 50]

    Image.fromarray(np.full((3, 5), 77, np.uint8), "L").save(tmp_path / "g.png")
    g = load_image(tmp_path / "g.png")
    assert g.mode == "RGB" and g.size == (5, 3) and np.asarray(g).tolist()[0][0] == [77, 77, 77]

    Image.new("CMYK", (3, 3), (0, 0, 0, 0)).save(tmp_path / "c.jpg")
    c = load_image(tmp_path / "c.jpg")
    assert c.mode == "RGB" and np.asarray(c).min() > 240  # no ink = white


def test_data_exif_orientation(tmp_path):
    """A photo stored sideways with an EXIF rotation is read upright, and the header check agrees."""
    for folder in ("source", "mask", "reference"):
        (tmp_path / folder).mkdir()
    stored = _rand_rgb(10, 20, 3)  # 20 wide, 10 high as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    stored.save(tmp_path / "source" / "r.jpg", exif=exif.tobytes())
    assert load_image(tmp_path / "source" / "r.jpg").size == (10, 20)
    mask = np.zeros((20, 10), np.uint8)  # drawn on the upright photo
    mask[5:9, 2:6] = 255
    Image.fromarray(mask).save(tmp_path / "mask" / "r.png")
    stored.save(tmp_path / "reference" / "r.png")
    s = TripletDataset(tmp_path, size=(20, 10), train=False)[0]
    assert s["source"].shape == (3, 20, 10) and torch.equal(s["mask"][0], torch.from_numpy(mask < 128).float())


def test_data_load_image_bad_files(tmp_path):
    """Truncated PNG/JPEG and missing files raise DataError naming the file, even if someone allowed truncation."""
    for ext in ("png", "jpg"):
        path = tmp_path / f"t.{ext}"
        _rand_rgb(48, 64, 0).save(path)
        _truncate(path)
        assert Image.open(path).size == (64, 48)  # the header still reads: only the full decode fails
        with pytest.raises(DataError, match=rf"{path}: unreadable image"):
            load_image(path)
        ImageFile.LOAD_TRUNCATED_IMAGES = True  # another library's global setting must not hide it
        try:
            with pytest.raises(DataError, match=str(path)):
                load_image(path)
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = False
    with pytest.raises(DataError, match=r"nope\.png: file not found"):
        load_image(tmp_path / "nope.png")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"junk\.png: unreadable image"):
        load_image(tmp_path / "junk.png")


def test_data_load_mask_polarity_threshold_size(tmp_path):
    """White (>=128) in the file = fill = 0 in the tensor; wrong size is an error unless resize=True."""
    a = np.array([[0, 127, 128, 255]], np.uint8).repeat(2, 0)  # (2,4)
    Image.fromarray(a, "L").save(tmp_path / "m.png")
    m = load_mask(tmp_path / "m.png")
    assert m.shape == (1, 2, 4) and m.dtype == torch.float32
    assert m[0, 0].tolist() == [1, 1, 0, 0]
    Image.fromarray(a).convert("RGB").save(tmp_path / "rgb.png")
    assert torch.equal(load_mask(tmp_path / "rgb.png"), m)
    with pytest.raises(DataError, match=r"m\.png: mask is 4x2, the source is 8x4"):
        load_mask(tmp_path / "m.png", size=(4, 8))
    big = load_mask(tmp_path / "m.png", size=(4, 8), resize=True)
    assert big.shape == (1, 4, 8) and big[0, 0].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]


def test_data_tensor_round_trip(tmp_path):
    """to_tensor gives (3,H,W) in [-1,1]; to_pil inverts it exactly for 8-bit images."""
    im = _rand_rgb(5, 7, 1)
    x = to_tensor(im)
    assert x.shape == (3, 5, 7) and x.min() >= -1 and x.max() <= 1
    assert np.array_equal(np.asarray(to_pil(x)), np.asarray(im))


def test_data_sample_rng_independent():
    """Each (seed, epoch, index) has its own stream; the same triple gives the same stream."""
    draws = {(s, e, i): torch.rand(4, generator=sample_rng(s, e, i)) for s in (0, 1) for e in (0, 1, 2) for i in range(50)}
    assert torch.equal(torch.rand(4, generator=sample_rng(1, 2, 3)), draws[1, 2, 3])
    assert len({tuple(v.tolist()) for v in draws.values()}) == len(draws)


def test_data_bbox_and_reference_augmentation():
    """bbox_mask fills the fill region's bounding box; the reference flips about half the time and
    rotates with white corners."""
    m = torch.ones(1, 10, 12)
    m[0, 2, 3] = m[0, 6, 8] = 0
    b = bbox_mask(m)
    assert (b[0, 2:7, 3:9] == 0).all() and b.sum() == 120 - 5 * 6
    ref = torch.zeros(3, 40, 40)
    ref[0, :, :20], ref[2, :, 20:] = 1, 1  # left half red, right half blue, on black
    flips, corners = 0, []
    for k in range(200):
        out = augment_reference(ref, torch.Generator().manual_seed(k))
        left = out[:, 20, 10]  # within +-20 degrees this point stays in its half
        assert torch.allclose(left, torch.tensor([1.0, 0, 0]), atol=1e-4) or torch.allclose(left, torch.tensor([0, 0, 1.0]), atol=1e-4)
        flips += bool(left[2] > 0.5)
        corners.append(out[:, 0, 0].min())
    assert 70 < flips < 130
    assert sum(c > 0.99 for c in corners) > 150  # most rotations uncover a white corner


# ---------------------------------------------------------------------------------------------- triplets

def _write_triplet_folder(root, with_target=False):
    """Three samples of different file sizes and formats; the mask fills a rectangle."""
    sizes = {"a": (30, 40), "b": (50, 70), "c": (24, 24)}  # (H, W)
    for k, (name, (h, w)) in enumerate(sizes.items()):
        for folder in ("source", "mask", "reference") + (("target",) if with_target else ()):
            (root / folder).mkdir(parents=True, exist_ok=True)
        _rand_rgb(h, w, k).save(root / "source" / f"{name}.{'jpg' if name == 'a' else 'png'}")
        mask = np.zeros((h, w), np.uint8)
        mask[h // 4: h // 2, w // 3: 2 * w // 3] = 255
        mask[h // 2 + 2, w // 4] = 255  # a second piece, so the bounding box is larger than the fine mask
        Image.fromarray(mask).save(root / "mask" / f"{name}.png")
        _rand_rgb(20 + 3 * k, 16, 10 + k).save(root / "reference" / f"{name}.{'webp' if name == 'b' else 'png'}")
        if with_target:
            _rand_rgb(h, w, 20 + k).save(root / "target" / f"{name}.png")
    return sizes


def test_data_triplet_loads_resizes_and_collates(tmp_path):
    """Sizes follow size/ref_size whatever the files are; target = source without target/; the default collate works."""
    _write_triplet_folder(tmp_path)
    ds = TripletDataset(tmp_path, size=(32, 24), ref_size=(28, 20), train=False)
    assert len(ds) == 3
    for s in ds:
        assert s["source"].shape == (3, 32, 24) and s["mask"].shape == (1, 32, 24) and s["reference"].shape == (3, 28, 20)
        assert s["source"].min() >= -1 and s["source"].max() <= 1
        assert torch.equal(s["target"], s["source"])
        assert set(s["mask"].unique().tolist()) == {0.0, 1.0}
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    assert batch["source"].shape == (3, 3, 32, 24) and batch["name"] == ["a", "b", "c"]


def test_data_triplet_target_and_polarity(tmp_path):
    """target/ is read when present; at the file size the mask is exactly the file's non-white pixels."""
    sizes = _write_triplet_folder(tmp_path, with_target=True)
    h, w = sizes["b"]
    ds = TripletDataset(tmp_path, size=(h, w), ref_size=(23, 16), train=False)  # reference b is 16x23
    s = ds[1]
    assert s["name"] == "b"
    assert torch.equal(s["target"], to_tensor(Image.open(tmp_path / "target" / "b.png")))
    assert not torch.equal(s["target"], s["source"])
    file_mask = torch.from_numpy(np.asarray(Image.open(tmp_path / "mask" / "b.png")).copy())
    assert torch.equal(s["mask"][0], (file_mask < 128).float())
    assert torch.equal(s["reference"], to_tensor(Image.open(tmp_path / "reference" / "b.webp")))  # eval: untouched


def test_data_triplet_train_randomness(tmp_path):
    """Training draws repeat for (seed, epoch, i), change across epochs, and give both fine and box masks."""
    _write_triplet_folder(tmp_path)
    a = TripletDataset(tmp_path, size=(32, 24), train=True, seed=3)
    b = TripletDataset(tmp_path, size=(32, 24), train=True, seed=3)
    b.set_epoch(5)
    a.set_epoch(5)
    for i in range(3):
        assert all(torch.equal(a[i][k], b[i][k]) for k in ("source", "mask", "reference"))
    first = [a[i]["reference"] for i in range(3)]
    a.set_epoch(6)
    assert any(not torch.equal(first[i], a[i]["reference"]) for i in range(3))
    fine = TripletDataset(tmp_path, size=(32, 24), train=False)[0]["mask"]
    box = bbox_mask(fine)
    assert not torch.equal(fine, box)
    kinds = []
    for epoch in range(40):
        a.set_epoch(epoch)
        m = a[0]["mask"]
        assert torch.equal(m, fine) or torch.equal(m, box)
        kinds.append(torch.equal(m, box))
    assert 8 < sum(kinds) < 32
    e = TripletDataset(tmp_path, size=(32, 24), train=False)
    e.set_epoch(7)
    assert torch.equal(e[2]["reference"], TripletDataset(tmp_path, size=(32, 24), train=False)[2]["reference"])


def test_data_triplet_bad_data(tmp_path):
    """Missing counterpart, wrong mask size, empty folder, all-keep mask: DataError naming the file or root."""
    empty = tmp_path / "empty"
    (empty / "source").mkdir(parents=True)
    with pytest.raises(DataError, match=str(empty)):
        TripletDataset(empty, size=(8, 8))
    with pytest.raises(DataError, match=str(tmp_path / "nothing")):
        TripletDataset(tmp_path / "nothing", size=(8, 8))

    root = tmp_path / "r"
    _write_triplet_folder(root)
    (root / "reference" / "b.webp").unlink()
    with pytest.raises(DataError, match=rf"{root / 'reference' / 'b'}\.\*: file not found"):
        TripletDataset(root, size=(8, 8))

    root = tmp_path / "m"
    _write_triplet_folder(root)
    Image.new("L", (10, 10)).save(root / "mask" / "c.png")
    with pytest.raises(DataError, match=rf"{root / 'mask' / 'c.png'}: mask is 10x10, the source is 24x24"):
        TripletDataset(root, size=(8, 8))

    root = tmp_path / "k"
    _write_triplet_folder(root)
    Image.new("L", (24, 24), 0).save(root / "mask" / "c.png")  # all black: nothing to fill
    ds = TripletDataset(root, size=(8, 8), train=False)
    with pytest.raises(DataError, match=rf"{root / 'mask' / 'c.png'}: no region to fill"):
        ds[2]


def test_data_triplet_skip_bad(tmp_path):
    """skip_bad drops bad samples up front with one counted warning, and replaces decode failures by the next index."""
    _write_triplet_folder(tmp_path)
    (tmp_path / "mask" / "a.png").unlink()
    with pytest.warns(UserWarning, match=r"skipped 1 of 3 samples with bad files; first: .*mask.a\.\*: file not found"):
        ds = TripletDataset(tmp_path, size=(16, 16), skip_bad=True, train=False)
    assert [name for name, _ in ds.samples] == ["b", "c"]

    root = tmp_path / "t"
    _write_triplet_folder(root)
    _truncate(root / "source" / "b.png")  # passes the header check, fails the decode
    ds = TripletDataset(root, size=(16, 16), train=False)  # the init cannot see it
    with pytest.raises(DataError, match=rf"{root / 'source' / 'b.png'}: unreadable image"):
        ds[1]
    ds = TripletDataset(root, size=(16, 16), skip_bad=True, train=True)
    with pytest.warns(UserWarning, match="b.png"):
        s = ds[1]
    assert s["name"] == "c" and ds.skipped == 1
    assert torch.equal(s["reference"], ds[2]["reference"])  # exactly sample 2, its own random draws included


def test_data_write_triplets_round_trip(tmp_path):
    """write_triplets writes PNGs with white = fill, which TripletDataset reads back."""
    mask = torch.ones(1, 12, 10)
    mask[:, 3:7, 2:5] = 0
    src = to_tensor(_rand_rgb(12, 10, 0))
    write_triplets(tmp_path, [{"name": "x", "source": src, "mask": mask, "reference": to_tensor(_rand_rgb(9, 9, 1)),
                               "target": to_tensor(_rand_rgb(12, 10, 2))}])
    assert np.asarray(Image.open(tmp_path / "mask" / "x.png"))[4, 3] == 255
    s = TripletDataset(tmp_path, size=(12, 10), ref_size=(9, 9), train=False)[0]
    assert torch.equal(s["mask"], mask) and torch.allclose(s["source"], src, atol=1e-6)


# ---------------------------------------------------------------------------------------------- VITON-HD

# CIHP_PGN display colours: convert('L') of these is NOT the label id
PALETTE = {0: (0, 0, 0), 2: (255, 0, 0), 5: (255, 85, 0), 9: (0, 85, 85), 10: (85, 51, 0), 13: (0, 0, 255),
           14: (51, 170, 221), 15: (0, 255, 255), 16: (85, 255, 170), 17: (170, 255, 85)}
CLOTH_COLOURS = {"00001_00": (220, 30, 30), "00002_00": (30, 200, 30), "00003_00": (30, 30, 220),
                 "00006_00": (230, 200, 20), "00008_00": (200, 20, 200)}


def _parse_map(h, w, shift):
    """A person-like label map: head, neck, upper garment, arms (person's left arm = id 14 on the image's right), legs."""
    p = np.zeros((h, w), np.uint8)
    c = w // 2 + shift
    p[1: h // 5, c - w // 8: c + w // 8] = 13
    p[h // 5: h // 4, c - w // 16: c + w // 16] = 10
    p[h // 4: 3 * h // 5, c - w // 4: c + w // 4] = 5
    p[h // 4: h // 2, c - w // 4 - 3: c - w // 4] = 15  # right arm, on the image's left
    p[h // 4: 2 * h // 3, c + w // 4: c + w // 4 + 4] = 14
    p[3 * h // 5:, c - w // 4: c] = 17
    p[3 * h // 5:, c: c + w // 4] = 16
    return p


def _write_viton(root):
    """train at 64x48 (H x W) with a mismatched train_pairs.txt; test at 40x30 with an unpaired test_pairs.txt."""
    splits = {"train": ((64, 48), ["00001_00", "00002_00", "00003_00"]), "test": ((40, 30), ["00006_00", "00008_00"])}
    parses = {}
    for split, ((h, w), people) in splits.items():
        for folder in ("image", "cloth", "cloth-mask", "image-parse-v3"):
            (root / split / folder).mkdir(parents=True, exist_ok=True)
        for k, name in enumerate(people):
            person = np.asarray(_rand_rgb(h, w, k)).copy()
            person[:, : w // 2, 0] = 255  # left half strongly red: a mirror is easy to see
            Image.fromarray(person).save(root / split / "image" / f"{name}.jpg", quality=95)
            cloth = np.full((h, w, 3), 255, np.uint8)
            cloth[h // 5: 4 * h // 5, w // 5: 4 * w // 5] = CLOTH_COLOURS[name]
            cloth[h // 5: 4 * h // 5, w // 5: w // 3] = (0, 0, 0)  # a dark left edge: asymmetric
            Image.fromarray(cloth).save(root / split / "cloth" / f"{name}.jpg", quality=95)
            Image.fromarray((cloth.min(-1) < 250).astype(np.uint8) * 255).save(root / split / "cloth-mask" / f"{name}.jpg")
            parse = _parse_map(h, w, shift=k - 1)
            im = Image.fromarray(parse, "P")
            palette = [0] * 768
            for i, rgb in PALETTE.items():
                palette[3 * i: 3 * i + 3] = rgb
            im.putpalette(palette)
            im.save(root / split / "image-parse-v3" / f"{name}.png")
            parses[name] = parse
    # as in the release: column 2 of BOTH files names ANOTHER person's cloth
    (root / "train_pairs.txt").write_text("00001_00.jpg 00002_00.jpg\n00002_00.jpg 00003_00.jpg\n00003_00.jpg 00001_00.jpg\n")
    (root / "test_pairs.txt").write_text("00006_00.jpg 00008_00.jpg\n00008_00.jpg 00006_00.jpg\n")
    return parses


def _independent_mask(parse, radius):
    """Keep-mask by plain numpy: the ids, then a square dilation by explicit shifts."""
    fill = np.isin(parse, [5, 6, 7, 10, 14, 15])
    h, w = fill.shape
    padded = np.pad(fill, radius)
    out = np.zeros_like(fill)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            out |= padded[dy: dy + h, dx: dx + w]
    return torch.from_numpy(~out).float()[None]


def _colour(ref):
    """The mean colour of a reference's garment area, 0..255."""
    h, w = ref.shape[-2:]
    return ((ref[:, h // 3: 2 * h // 3, w // 2: 3 * w // 4].mean((1, 2)) + 1) * 127.5).tolist()


def test_data_vitonhd_garment_choice(tmp_path):
    """Training takes cloth/<person> (never column 2); test paired likewise; test unpaired takes column 2."""
    _write_viton(tmp_path)
    ds = VitonHDDataset(tmp_path, "train", size=(64, 48), ref_size=(64, 48), train=False)
    for (name, _), s in zip(ds.samples, ds):
        assert np.allclose(_colour(s["reference"]), CLOTH_COLOURS[name], atol=12)
        assert s["source"].shape == (3, 64, 64 * 3 // 4) and torch.equal(s["target"], s["source"])
    with pytest.raises(ValueError):
        VitonHDDataset(tmp_path, "train", size=(64, 48), paired=False)
    paired = VitonHDDataset(tmp_path, "test", size=(40, 30), ref_size=(40, 30), train=False)
    unpaired = VitonHDDataset(tmp_path, "test", size=(40, 30), ref_size=(40, 30), train=False, paired=False)
    assert np.allclose(_colour(paired[0]["reference"]), CLOTH_COLOURS["00006_00"], atol=12)
    assert np.allclose(_colour(unpaired[0]["reference"]), CLOTH_COLOURS["00008_00"], atol=12)
    assert unpaired[0]["name"] == "00006_00_00008_00" and paired[0]["name"] == "00006_00"
    assert torch.equal(paired[0]["source"], unpaired[0]["source"])


def test_data_vitonhd_mask_by_index(tmp_path):
    """The mask is exactly the dilated {5,6,7,10,14,15} region of the parse read by index, at any size."""
    parses = _write_viton(tmp_path)
    im = Image.open(tmp_path / "train" / "image-parse-v3" / "00001_00.png")
    assert im.mode == "P" and not np.array_equal(np.asarray(im.convert("L")), parses["00001_00"])  # the trap is armed
    assert torch.equal(load_parse(tmp_path / "train" / "image-parse-v3" / "00001_00.png"), torch.from_numpy(parses["00001_00"]))
    ds = VitonHDDataset(tmp_path, "train", size=(64, 48), train=False, dilation=0.1)  # radius int(0.1 * 48) = 4
    for (name, _), s in zip(ds.samples, ds):
        assert torch.equal(s["mask"], _independent_mask(parses[name], 4))
    # default radius int(5/256 * W) at another size; the parse resized by pixel centres (nearest)
    small = VitonHDDataset(tmp_path, "train", size=(32, 100), train=False)
    rows, cols = (np.arange(32) + 0.5) * 64 // 32, (np.arange(100) + 0.5) * 48 // 100
    resized = parses["00002_00"][rows.astype(int)][:, cols.astype(int)]
    assert torch.equal(small[1]["mask"], _independent_mask(resized, int(5 * 100 / 256)))
    test = VitonHDDataset(tmp_path, "test", size=(40, 30), train=False, dilation=0.1)
    assert torch.equal(test[1]["mask"], _independent_mask(parses["00008_00"], 3))


def test_data_flip_parse():
    """flip_parse mirrors and swaps the left/right ids; twice is the identity."""
    p = torch.tensor([[14, 0, 5, 16, 18], [15, 17, 19, 13, 10]], dtype=torch.uint8)
    assert flip_parse(p).tolist() == [[19, 17, 5, 0, 15], [10, 13, 18, 16, 14]]
    r = torch.randint(0, 20, (3, 7, 9), dtype=torch.uint8)
    assert torch.equal(flip_parse(flip_parse(r)), r) and flip_parse(r).dtype == torch.uint8


def test_data_vitonhd_hflip_consistent(tmp_path):
    """hflip=1 mirrors person, mask and cloth together; the other draws stay the same."""
    _write_viton(tmp_path)
    plain = VitonHDDataset(tmp_path, "train", size=(64, 48), ref_size=(64, 48), seed=1, dilation=0.1)
    flipped = VitonHDDataset(tmp_path, "train", size=(64, 48), ref_size=(64, 48), seed=1, dilation=0.1, hflip=1.0)
    for i in range(3):
        a, b = plain[i], flipped[i]
        assert torch.equal(b["source"], a["source"].flip(-1)) and torch.equal(b["mask"], a["mask"].flip(-1))
        # the cloth's dark edge is on the other side (the reference augmentation draws are the same in both)
        assert (a["reference"][:, 32, 14].mean() < -0.5) != (b["reference"][:, 32, 14].mean() < -0.5)
    with pytest.raises(ValueError):
        VitonHDDataset(tmp_path, "train", size=(64, 48), train=False, hflip=0.5)


def test_data_vitonhd_bad_data(tmp_path):
    """Missing cloth -> DataError naming the file and the pair line; skip_bad drops it; bad parse mode/size."""
    _write_viton(tmp_path)
    (tmp_path / "train" / "cloth" / "00002_00.jpg").unlink()
    with pytest.raises(DataError, match=rf"{tmp_path / 'train' / 'cloth' / '00002_00.jpg'}: file not found \(needed by train_pairs.txt line 2\)"):
        VitonHDDataset(tmp_path, "train", size=(64, 48))
    with pytest.warns(UserWarning, match="skipped 1 of 3 samples"):
        ds = VitonHDDataset(tmp_path, "train", size=(64, 48), skip_bad=True)
    assert [n for n, _ in ds.samples] == ["00001_00", "00003_00"]
    parse = tmp_path / "test" / "image-parse-v3" / "00006_00.png"
    Image.open(parse).convert("RGB").save(parse)
    with pytest.raises(DataError, match=rf"{parse}: parse map is mode RGB"):
        VitonHDDataset(tmp_path, "test", size=(40, 30))
    Image.new("P", (31, 40)).save(parse)
    with pytest.raises(DataError, match=rf"{parse}: parse map is 31x40, the image is 30x40"):
        VitonHDDataset(tmp_path, "test", size=(40, 30))
    (tmp_path / "test_pairs.txt").write_text("00006_00.jpg\n")
    with pytest.raises(DataError, match="test_pairs.txt line 1"):
        VitonHDDataset(tmp_path, "test", size=(40, 30))
    (tmp_path / "test_pairs.txt").unlink()
    with pytest.raises(DataError, match="test_pairs.txt: file not found"):
        VitonHDDataset(tmp_path, "test", size=(40, 30))


# ---------------------------------------------------------------------------------------------- teaching world

def test_data_teaching_world_deterministic_and_shapes():
    """Same seed -> identical tensors; another seed -> other scenes; shapes and ranges; fast enough."""
    a = TeachingWorld(64, "train", length=40, seed=0, ref_size=(56, 56))
    b = TeachingWorld(64, "train", length=40, seed=0, ref_size=(56, 56))
    c = TeachingWorld(64, "train", length=40, seed=1, ref_size=(56, 56))
    a.set_epoch(2)
    b.set_epoch(2)
    t0 = time.perf_counter()
    samples = [a[i] for i in range(32)]
    per_sample = (time.perf_counter() - t0) / 32
    assert per_sample < 0.1, f"{per_sample:.3f} s per sample"
    for i in (0, 7, 31):
        assert all(torch.equal(samples[i][k], b[i][k]) for k in ("source", "target", "mask", "reference"))
        assert not torch.equal(samples[i]["source"], c[i]["source"])
    for s in samples:
        assert s["source"].shape == (3, 64, 64) and s["mask"].shape == (1, 64, 64) and s["reference"].shape == (3, 56, 56)
        assert s["source"].min() >= -1 and s["source"].max() <= 1 and s["reference"].min() >= -1 and s["reference"].max() <= 1
        assert set(s["mask"].unique().tolist()) == {0.0, 1.0} and torch.equal(s["source"], s["target"])
    kinds = [torch.equal(s["mask"], bbox_mask(s["mask"])) for s in samples]  # the 50/50 box rule is applied
    assert 4 < sum(kinds) < 30


def test_data_teaching_world_products_disjoint():
    """Train and held-out products come from disjoint ids and have different parameters; all patterns occur."""
    train = TeachingWorld(32, "train", length=500, n_products=300)
    held = TeachingWorld(32, "heldout", length=300)
    train_ids = {train.product_id(i) for i in range(500)}
    held_ids = {held.product_id(i) for i in range(300)}
    assert train_ids == set(range(300)) and min(held_ids) == HELDOUT_FIRST and not train_ids & held_ids
    train_params = {make_product(i) for i in train_ids}
    held_params = {make_product(i) for i in held_ids}
    assert len(train_params) == 300 and len(held_params) == 300 and not train_params & held_params
    assert make_product(5) == make_product(5)
    assert {p.pattern for p in train_params} == set(PATTERNS) == {p.pattern for p in held_params}
    assert {p.category for p in held_params} == {"top", "cushion"}
    assert {len(p.colours) for p in train_params} == {2, 3}


def test_data_teaching_world_product_visible():
    """Inside the region the scene differs from the scene without the product; outside it is identical;
    the reference shows the product on white."""
    world = TeachingWorld(64, "heldout", length=12, seed=4, train=False)
    for i in range(12):
        product = make_product(world.product_id(i))
        with_product, fill = world.scene(i, product)
        without, fill2 = world.scene(i, None)
        assert torch.equal(fill, fill2) and 0.02 < fill.float().mean() < 0.5
        assert torch.equal(with_product[:, ~fill], without[:, ~fill])
        assert (with_product[:, fill] - without[:, fill]).abs().mean() > 0.1
        s = world[i]
        assert torch.equal(s["mask"][0], (~fill).float()) and torch.equal(s["source"], with_product)
        ref = s["reference"]
        assert (ref[:, 0, :] == 1).all() and (ref[:, :, 0] == 1).all() and (ref[:, 28:36, 28:36] < 0.99).any()


def test_data_write_heldout(tmp_path):
    """write_heldout writes a triplet folder with target/: the source holds another product, the target the held-out one."""
    write_heldout(tmp_path, 6, 48, seed=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask", "reference", "source", "target"]
    ds = TripletDataset(tmp_path, size=(48, 48), ref_size=(48, 48), train=False)
    assert len(ds) == 6
    world = TeachingWorld(48, "heldout", length=6, seed=2, ref_size=(48, 48), train=False)
    for i, s in enumerate(ds):
        keep = s["mask"][0] > 0.5
        assert torch.equal(s["source"][:, keep], s["target"][:, keep])
        assert (s["source"][:, ~keep] - s["target"][:, ~keep]).abs().mean() > 0.05
        assert torch.allclose(s["target"], world[i]["target"], atol=1 / 127.5)  # 8-bit PNG rounding
        assert torch.allclose(s["reference"], world[i]["reference"], atol=1 / 127.5)
