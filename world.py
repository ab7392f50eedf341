"""
The teaching world: toy "virtual try-all" scenes, drawn on the fly, that let the whole pipeline train and be judged
on a CPU (README, "The teaching world"). A dataset like data.py's: its samples are dicts of the same keys and shapes.
"""
import math
import sys
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from data import (SampleDataset, bbox_mask, finish_sample, keyed_generator, resize_image, size_pair, to_pil, uniform,
                  write_triplets)
from dtc import largest_rectangle

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
# Keys of the world's random streams (data.keyed_generator), one per thing drawn, so that drawing one never shifts
# another: a product is the same in every scene, and a scene's content does not depend on the training randomness
STREAM_PRODUCT = 0x9E0D        # a product's pattern, colours and shape (with its id)
STREAM_SCENE = 0x5CE9E         # a scene's content (after the seed, split and index)
STREAM_DISTRACTOR = 0xD15      # write_heldout's other product (after seed, index; 4 values: no sample_rng stream)
STREAM_MISALIGN = 0x3A11       # a scene's misalignment (--misalign > 0 only, so that 0 draws exactly as before)


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
    g = keyed_generator(STREAM_PRODUCT, pid)
    category = "top" if uniform(g) < 0.5 else "cushion"
    pattern = PATTERNS[int(uniform(g) * len(PATTERNS))]
    h = uniform(g)
    colours = (_hsv(h, uniform(g, 0.15, 0.5), uniform(g, 0.72, 0.95)),  # light ground
               _hsv(h + uniform(g, 0.3, 0.7), uniform(g, 0.5, 1.0), uniform(g, 0.2, 0.6)),  # dark
               _hsv(h + uniform(g, 0.1, 0.9), uniform(g, 0.6, 1.0), uniform(g, 0.55, 1.0)))  # accent
    colours = colours[:2] if uniform(g) < 0.5 else colours
    freq, angle, duty, phase = uniform(g, 1.25, 3.0), uniform(g, 0.0, math.pi), uniform(g, 0.3, 0.7), uniform(g)
    strokes = ()
    if pattern == "glyphs":  # 2-3 letter-like glyphs in a row, each 2-4 strokes between points of a 3x3 lattice
        n, gw, gh = 2 + int(uniform(g) < 0.5), 0.16, 0.24
        x0, y0 = 0.5 - n * gw * 1.5 / 2 + gw * 0.25, 0.5 - gh / 2 + uniform(g, -0.15, 0.15)
        for j in range(n):
            for _ in range(2 + int(uniform(g) * 3)):
                a, b = int(uniform(g) * 9), int(uniform(g) * 9)
                b = (a + 1 + b % 8) % 9  # a stroke joins two different lattice points
                strokes += ((round(x0 + j * gw * 1.5 + a % 3 * gw / 2, 4), round(y0 + a // 3 * gh / 2, 4),
                             round(x0 + j * gw * 1.5 + b % 3 * gw / 2, 4), round(y0 + b // 3 * gh / 2, 4)),)
    if category == "top":
        shape = (uniform(g, 0.32, 0.42), uniform(g, 0.75, 1.1), uniform(g, 0.22, 0.3))
    else:
        shape = (uniform(g, 0.8, 1.25),)
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
    """In [0,1) for negative x too (torch.frac keeps the sign). The clamp: for x just below an integer, x - floor(x)
    rounds to exactly 1.0 in float32, which would index past the last colour band."""
    return (x - x.floor()).clamp(max=1 - 2 ** -24)


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
    return _hsv(uniform(g), uniform(g, 0.0, 0.35), uniform(g, lo, hi))


@contextmanager
def _one_thread():
    """Run torch single-threaded inside. The world's tensors are small: intra-op threads gain nothing, on a
    busy CPU their hand-offs made a sample 10-30x slower (~8 ms single-threaded, 50-300 ms with 2 contended
    threads), and the thread count changes float rounding, which would make scenes depend on it.
    Why a global setting, set and put back per sample: torch has no per-call thread count, and the world runs
    in the training process itself (num_workers=0, the tiny preset's), so setting one thread once would slow
    the training steps too. The count is restored on exit, also on an error, so nothing outside sees it."""
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
                 n_products=1000, distort=True, misalign=0.0):
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', not {split!r}")
        super().__init__(seed, split == "train" if train is None else train, skip_bad=False)
        self.size, self.split, self.length = size, split, length
        self.ref_size, self.n_products = size_pair(ref_size), n_products
        self.distort = distort  # False: no warp and no shading (the tests check the geometry so)
        if not (math.isfinite(misalign) and misalign >= 0):
            raise ValueError(f"misalign must be a number >= 0, not {misalign}")
        self.misalign = misalign  # 0: the hint lines up with the worn product; see _misaligned
        self.references = {}  # product id -> its reference, drawn once (a quarter of a sample's drawing time)

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
        g = keyed_generator(self.seed, ("train", "heldout").index(self.split), i, STREAM_SCENE)
        shape_of = make_product(self.product_id(i))  # the scene is drawn for its own product's shape
        S = SS * self.size
        x, y = _grid(S, S)
        # background: a vertical gradient or a wall/floor split, smooth blotches and light pixel noise
        top, bottom = torch.tensor(_muted(g))[:, None, None], torch.tensor(_muted(g, 0.3, 0.8))[:, None, None]
        if uniform(g) < 0.5:
            image = top + (bottom - top) * y
        else:
            horizon = uniform(g, 0.55, 0.8)
            image = torch.where(y < horizon, top * (0.92 + 0.08 * y), bottom * (1.1 - 0.3 * (y - horizon)))
        blotches = F.interpolate(torch.rand((1, 3, 5, 5), generator=g), size=(S, S), mode="bilinear", align_corners=False)[0]
        image = image + 0.08 * (blotches - 0.5) + 0.03 * (torch.rand((3, S, S), generator=g) - 0.5)
        draw = self._person if shape_of.category == "top" else self._sofa
        m = keyed_generator(self.seed, ("train", "heldout").index(self.split), i, STREAM_MISALIGN) if self.misalign else None
        shape = shape_of.shape
        if m is not None and shape_of.category == "top":  # worn sleeves at another angle than the flat top's
            shape = (shape[0], shape[1] + self.misalign * uniform(m, -0.4, 0.4), shape[2])
        region, warp, shade = draw(g, image, x, y, shape)
        fill = F.max_pool2d(region[None, None].float(), SS)[0, 0] > 0
        # the rectangle the hint will fill: the largest one inside the mask (or the whole box), in [0,1] units
        keep = (~fill).float()
        top_, left, bottom_, right = largest_rectangle(bbox_mask(keep[None])[0] if box else keep)
        u, v = _texture_coords(x, y, (left / self.size, top_ / self.size, right / self.size, bottom_ / self.size))
        light = uniform(g, 0.0, 2 * math.pi)  # a smooth light gradient across the product
        shade = shade * (1 + 0.15 * ((x - 0.5) * math.cos(light) + (y - 0.5) * math.sin(light)))
        if m is not None:
            u, v, warp, shade = self._misaligned(m, u, v, warp, shade)
        if self.distort:
            u, v = warp(u, v)
        else:
            shade = torch.ones(())
        if product is not None:
            assert product.category == shape_of.category, "a scene holds products of its own category"
            image = torch.where(region, texture(product, u, v) * shade, image)
        image = F.avg_pool2d(image.clamp(0, 1)[None], SS)[0] * 2 - 1
        return image, fill

    def _misaligned(self, m, u, v, warp, shade):
        """The texture coordinates moved off the hint's rectangle, as a real garment is only roughly where the
        hint puts it, with folds and shading stronger, all in proportion to self.misalign (1 = strong): shifted by
        up to a quarter of the rectangle, scaled by up to e^0.3, turned by up to 25 degrees about its centre; the
        warp's amplitude x (1 + 3 misalign) and the shading's depth x (1 + 2 misalign)."""
        a = self.misalign
        du, dv = a * uniform(m, -0.25, 0.25), a * uniform(m, -0.25, 0.25)
        scale, turn = math.exp(a * uniform(m, -0.3, 0.3)), math.radians(a * uniform(m, -25, 25))
        c, s = math.cos(turn) / scale, math.sin(turn) / scale
        u, v = 0.5 + c * (u - 0.5) - s * (v - 0.5) + du, 0.5 + s * (u - 0.5) + c * (v - 0.5) + dv
        stronger = 1 + 3 * a

        def warp_more(u, v):
            wu, wv = warp(u, v)
            return u + stronger * (wu - u), v + stronger * (wv - v)
        return u, v, warp_more, 1 + (shade - 1) * (1 + 2 * a)

    def _person(self, g, image, x, y, shape):
        """Draws a person without the top into `image`; returns the top's region, its texture warp and shading."""
        aspect, sleeve, sleeve_len = shape
        s, cx, shoulder = uniform(g, 0.95, 1.15), uniform(g, 0.38, 0.62), uniform(g, 0.33, 0.38)
        skin = _hsv(uniform(g, 0.03, 0.1), uniform(g, 0.3, 0.6), uniform(g, 0.35, 0.95))
        hair = _hsv(uniform(g, 0.0, 0.12), uniform(g, 0.3, 0.8), uniform(g, 0.1, 0.5))
        trousers = _hsv(uniform(g), uniform(g, 0.2, 0.7), uniform(g, 0.15, 0.5))
        h = 0.42 * s * uniform(g, 0.9, 1.1)
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
        taper, fold, phase = uniform(g, -0.06, 0.06), uniform(g, 0.003, 0.012), uniform(g, 0, 2 * math.pi)

        def warp(u, v):
            u = 0.5 + (u - 0.5) * (1 + taper * (v - 0.5)) + fold * torch.sin(2 * math.pi * 3 * v + phase)
            return u, v + fold * torch.sin(2 * math.pi * 2 * u + phase)
        shade = 1.05 - 0.2 * ((x - cx) / (w + 0.12 * s)).clamp(-1, 1) ** 2
        return region, warp, shade

    def _sofa(self, g, image, x, y, shape):
        """Draws a sofa into `image`; returns a cushion's region, its texture warp and shading."""
        colour = _muted(g, 0.25, 0.8)
        darker = tuple(0.8 * c for c in colour)
        x0, x1 = uniform(g, 0.04, 0.18), uniform(g, 0.82, 0.96)
        back, seat = uniform(g, 0.28, 0.36), uniform(g, 0.6, 0.68)
        arm = 0.08
        _paint(image, _box(x, y, x0 + 0.03, seat + 0.2, 0.015, 0.04) | _box(x, y, x1 - 0.03, seat + 0.2, 0.015, 0.04), (0.15, 0.1, 0.08))
        _paint(image, _box(x, y, (x0 + x1) / 2, (back + seat) / 2, (x1 - x0) / 2 - arm, (seat - back) / 2), darker)
        _paint(image, _box(x, y, (x0 + x1) / 2, seat + 0.08, (x1 - x0) / 2, 0.08), colour)
        for ax in (x0 + arm / 2, x1 - arm / 2):  # armrests with rounded tops
            _paint(image, _box(x, y, ax, (back + 0.14 + seat + 0.16) / 2, arm / 2, (seat + 0.16 - back - 0.14) / 2)
                   | _ellipse(x, y, ax, back + 0.14, arm / 2, 0.03), tuple(0.9 * c for c in colour))
        r, tilt = uniform(g, 0.17, 0.23), uniform(g, -0.08, 0.08)
        rx, ry = r * shape[0] ** 0.5, r / shape[0] ** 0.5
        cx = uniform(g, x0 + arm + rx + 0.02, x1 - arm - rx - 0.02)
        cy = seat - ry * uniform(g, 0.6, 0.9)
        if uniform(g) < 0.5:  # a plain cushion beside it, on the side with more room
            other = cx - 1.9 * rx if cx - x0 > x1 - cx else cx + 1.9 * rx
            _paint(image, _superellipse(x, y, other, cy + 0.02, 0.8 * rx, 0.8 * ry, -tilt)[0] <= 1, _muted(g, 0.4, 0.9))
        rr, _, _ = _superellipse(x, y, cx, cy, rx, ry, tilt)
        region = rr <= 1
        bulge = uniform(g, 0.03, 0.08)

        def warp(u, v):  # a puffed cushion: the pattern swells a little towards the middle
            k = 1 + bulge * (1 - rr.clamp(0, 1) ** 2)
            return 0.5 + (u - 0.5) * k, 0.5 + (v - 0.5) * k
        shade = 1.04 - 0.3 * rr.clamp(0, 1) ** 4
        return region, warp, shade

    def load(self, i, g):
        with _one_thread():
            box = g is not None and torch.rand((), generator=g).item() < 0.5  # the 50/50 rule, drawn first
            pid = self.product_id(i)
            product = make_product(pid)
            image, fill = self.scene(i, product, box)
            if pid not in self.references:
                self.references[pid] = self.reference(product)
            return finish_sample(image, image, (~fill).float()[None], self.references[pid], f"{self.split}_{i:06d}",
                                 (self.size, self.size), self.ref_size, g, f"teaching world {self.split} {i}", box=box)


def write_heldout(root, n, size, seed=0, misalign=0.0):
    """A held-out evaluation set in the triplet layout WITH target/: target = the scene with a held-out
    product; source = the same scene with a different (train) product of the same category in the
    region, so a model cannot pass by copying the source; mask = the region; reference = the held-out
    product flat (size x size). misalign: as TeachingWorld's."""
    world = TeachingWorld(size, "heldout", length=n, seed=seed, ref_size=(size, size), train=False, misalign=misalign)
    samples = []
    for i in range(n):
        product = make_product(world.product_id(i))
        g = keyed_generator(seed, i, STREAM_DISTRACTOR, 0)
        other = make_product(int(uniform(g) * world.n_products))
        while other.category != product.category:  # train ids until one of the same category
            other = make_product(int(uniform(g) * world.n_products))
        target, fill = world.scene(i, product)
        source, _ = world.scene(i, other)
        samples.append({"name": f"heldout_{i:05d}", "source": source, "target": target,
                        "mask": (~fill).float()[None], "reference": world.reference(product)})
    write_triplets(root, samples)


if __name__ == "__main__":  # python world.py [out.png]: a preview grid of teaching-world samples
    world = TeachingWorld(64, "train", length=16, seed=0)
    rows = []
    for i in range(16):
        s = world[i]
        masked = s["source"] * s["mask"]  # what the model sees: the region blanked (grey); then the mask, white = fill
        rows.append(torch.cat([s["source"], masked, 1 - 2 * s["mask"].expand(3, -1, -1),
                               resize_image(s["reference"], (64, 64))], -1))
    grid = torch.cat([torch.cat(rows[k::2], -2) for k in range(2)], -1)  # two columns of 8 samples
    to_pil(grid).resize((grid.shape[-1] * 2, grid.shape[-2] * 2), Image.NEAREST).save(sys.argv[1] if len(sys.argv) > 1 else "/tmp/teaching_world.png")
