"""
The Shapes world (README: The Shapes world): the toy dataset train.py learns from, made on the fly. Scenes of one or
two coloured shapes on black, their captions, the three zero-shot kinds no training scene shows, the checker that
reads a picture back into what it shows, and the report: how often the samples show what their captions say.

    from shapes import caption, judge, parse, random_scene, render
    objects, relation = random_scene(random.Random(0))
    judge(parse(caption(objects, relation, random.Random(0))), render(objects))["all"]    # True

Read it top-down: the world, its captions, the checker, the training pool, the report and its pictures.
"""
import functools
import math
import random
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image, ImageDraw

from dalle import draw_masks, image_grid, labelled_rows, to_float, to_u8

# -----------------------------------------------------------------------------
# The world: 64x64, black background, 8 colours, 4 shapes, 2 sizes, positions and relations

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 90, 230), "yellow": (240, 220, 40),
           "purple": (150, 60, 200), "orange": (245, 140, 30), "cyan": (40, 210, 220), "white": (235, 235, 235)}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = {"small": 14, "large": 28}  # bounding box in pixels
POSITIONS = ("on the left", "on the right", "at the top", "at the bottom", "in the center")
RELATIONS = ("to the left of", "to the right of", "above", "below")
# World v2 (SHAPES.md): three kinds of zero-shot test, none ever rendered in any training scene of any stage
HELD_OUT = {("red", "triangle"), ("green", "square"), ("blue", "circle"), ("yellow", "diamond"),
            ("purple", "circle"), ("orange", "triangle"), ("cyan", "square"), ("white", "diamond")}  # 1. colour-shape
NEW_PAIRS = [(("red", "circle"), ("blue", "square")), (("green", "triangle"), ("yellow", "circle")),
             (("purple", "square"), ("orange", "diamond")), (("cyan", "triangle"), ("white", "circle")),
             (("yellow", "square"), ("red", "diamond")), (("blue", "triangle"), ("green", "circle")),
             (("orange", "square"), ("cyan", "diamond")), (("white", "triangle"), ("purple", "diamond")),
             (("red", "square"), ("cyan", "circle")), (("green", "diamond"), ("white", "square")),
             (("blue", "diamond"), ("orange", "circle")), (("yellow", "triangle"), ("purple", "triangle"))]  # 2.
NEW_PLACES = {("green", "circle"): "at the top", ("red", "square"): "on the left", ("yellow", "triangle"): "on the right",
              ("blue", "diamond"): "at the bottom", ("purple", "square"): "in the center",
              ("orange", "circle"): "on the left", ("cyan", "triangle"): "at the top",
              ("white", "circle"): "on the right"}  # 3. an object and the region its centre never visits
PAIRS = [(c, s) for c in COLOURS for s in SHAPES]
SEEN_PAIRS = [p for p in PAIRS if p not in HELD_OUT]
SIZE = 64
MARGIN = 8  # a relation holds between the centres by at least this many pixels
# DEVIATION (of the toy world, not the paper): centres on an 8-pixel lattice, exact sizes (SHAPES.md allows jitter):
# the 8x8 grid of codes meets each shape in one alignment, which a dVAE trained for minutes can learn (README)
LATTICE = 8


@dataclass
class Obj:
    colour: str
    shape: str
    size: int      # bounding box side in pixels
    cx: float      # bounding box centre
    cy: float


def size_word(size):
    return "small" if size < (SIZES["small"] + SIZES["large"]) / 2 else "large"


def true_positions(obj, margin=0.0):
    """The position phrases that hold for an object: its centre in the left / right / top / bottom third, or
    in the middle on both axes, with `margin` pixels to spare (captions keep 2 so that pixels agree)."""
    lo, hi = SIZE / 3 - margin, 2 * SIZE / 3 + margin
    mid = lambda v: SIZE / 3 + margin <= v <= 2 * SIZE / 3 - margin  # noqa: E731
    holds = (obj.cx < lo, obj.cx > hi, obj.cy < lo, obj.cy > hi, mid(obj.cx) and mid(obj.cy))
    return [p for p, ok in zip(POSITIONS, holds) if ok]


def relation_holds(a, b, relation, margin=MARGIN):
    dx, dy = b.cx - a.cx, b.cy - a.cy  # image y grows downwards
    return {"to the left of": dx >= margin, "to the right of": -dx >= margin,
            "above": dy >= margin, "below": -dy >= margin}[relation]


def lattice(rng, size):
    """A centre coordinate that keeps the object inside the canvas, on a LATTICE-pixel grid."""
    lo, hi = math.ceil((size / 2 + 1) / LATTICE), (SIZE - size // 2 - 2) // LATTICE
    return LATTICE * rng.randint(lo, hi)


def in_training(objects):
    """Whether a scene may be rendered for training: it shows none of the three held-out kinds (world v2)."""
    kinds = [(o.colour, o.shape) for o in objects]
    return (not any(k in HELD_OUT for k in kinds)
            and not (len(kinds) == 2 and (tuple(kinds) in NEW_PAIRS or tuple(kinds[::-1]) in NEW_PAIRS))
            and not any(NEW_PLACES.get(k) in true_positions(o) for k, o in zip(kinds, objects)))


def place_one(rng, kind, size=None):
    """One object of kind (colour, shape) at a random lattice point, of the given size (default: either)."""
    size = size or SIZES[rng.choice(list(SIZES))]
    return Obj(*kind, size, lattice(rng, size), lattice(rng, size))


def place_two(rng, first, second):
    """Two small objects with a random relation between them: no overlap (a 2 px gap), the relation by MARGIN."""
    relation = rng.choice(RELATIONS)
    while True:
        a, b = place_one(rng, first, SIZES["small"]), place_one(rng, second, SIZES["small"])
        apart = max(abs(a.cx - b.cx) - (a.size + b.size) / 2, abs(a.cy - b.cy) - (a.size + b.size) / 2) >= 2
        if apart and relation_holds(a, b, relation):
            return [a, b], relation


def random_scene(rng):
    """A training scene: a list of 1 or 2 objects and the relation between them (or None), half of each, drawn
    again until it shows none of the held-out kinds."""
    while True:
        if rng.random() < 0.5:
            objects, relation = [place_one(rng, rng.choice(SEEN_PAIRS))], None
        else:
            objects, relation = place_two(rng, *rng.sample(SEEN_PAIRS, 2))
        if in_training(objects):
            return objects, relation


OPPOSITE = {"to the left of": "to the right of", "to the right of": "to the left of", "above": "below", "below": "above"}


def swapped(objects, relation, rng):
    """A hard negative for CLIP (NegCLIP's, README: Deviations): a two-object scene with its colours, its shapes
    or its places swapped, which no caption of the original describes -> (objects, relation), or None."""
    a, b = objects
    options = [([replace(a, cx=b.cx, cy=b.cy), replace(b, cx=a.cx, cy=a.cy)], OPPOSITE[relation])]
    if a.colour != b.colour:
        options.append(([replace(a, colour=b.colour), replace(b, colour=a.colour)], relation))
    if a.shape != b.shape:
        options.append(([replace(a, shape=b.shape), replace(b, shape=a.shape)], relation))
    options = [o for o in options if in_training(o[0])]  # a swap may make a held-out kind: never train on it
    return rng.choice(options) if options else None


REPORT_GROUPS = ("seen objects", "new places", "seen pairs", "new pairs", "held-out objects", "held-out in pairs")


def report_scene(rng, kind):
    """A scene of one report group (REPORT_GROUPS) -> (objects, relation, position phrase to say or None)."""
    if kind in ("seen objects", "seen pairs"):
        while True:
            objects, relation = random_scene(rng)
            if (relation is None) == (kind == "seen objects"):
                return objects, relation, None
    if kind == "new places":  # the object inside the region it never visits in training
        (colour, shape), where = rng.choice(sorted(NEW_PLACES.items()))
        while True:
            obj = place_one(rng, (colour, shape))
            if where in true_positions(obj, margin=2):
                return [obj], None, where
    if kind == "new pairs":
        return (*place_two(rng, *rng.sample(rng.choice(NEW_PAIRS), 2)), None)
    if kind == "held-out objects":
        return [place_one(rng, rng.choice(sorted(HELD_OUT)))], None, None
    if kind == "held-out in pairs":  # one held-out object beside a seen one, in either order
        pair = [rng.choice(sorted(HELD_OUT)), rng.choice(SEEN_PAIRS)]
        rng.shuffle(pair)
        return (*place_two(rng, *pair), None)
    raise ValueError(f"unknown report group {kind!r}, expected one of {REPORT_GROUPS}")


def draw_shape(draw, shape, box, fill):
    """Draw one shape filling box = [x0, y0, x1, y1]; the renderer and the checker's templates share it."""
    x0, y0, x1, y1 = box
    xm, ym = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "triangle":  # apex up, base horizontal
        draw.polygon([(xm, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "diamond":  # a square rotated 45 degrees
        draw.polygon([(xm, y0), (x1, ym), (xm, y1), (x0, ym)], fill=fill)
    else:
        draw.polygon([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], fill=fill)


def render(objects):
    """objects -> uint8 array (64, 64, 3)."""
    img = Image.new("RGB", (SIZE, SIZE), (0, 0, 0))
    draw = ImageDraw.Draw(img)
    for o in objects:
        r = o.size / 2
        draw_shape(draw, o.shape, [o.cx - r, o.cy - r, o.cx + r, o.cy + r], COLOURS[o.colour])
    return np.asarray(img)


def _noun(colour, shape, size=None):
    words = " ".join(w for w in (size, colour, shape) if w)
    return ("an " if words[0] in "aeiou" else "a ") + words


def moved(obj, rng):
    """A hard negative for CLIP: the same object where none of its own position phrases holds, with 2 pixels to
    spare either way, and never in a held-out place -> (objects, None), or None."""
    if not true_positions(obj, margin=2):  # a caption names a place only with 2 pixels to spare: none to move from
        return None
    own = set(true_positions(obj, margin=-2))
    for _ in range(20):
        o = replace(obj, cx=lattice(rng, obj.size), cy=lattice(rng, obj.size))
        if true_positions(o, margin=2) and not own & set(true_positions(o, margin=-2)) and in_training([o]):
            return [o], None
    return None


def caption(objects, relation, rng, where=None, say_place=0.5):
    """A random true paraphrase of a scene: the size word is said or left out, a position phrase that holds is said
    with probability say_place (the phrase `where` always, if given)."""
    if relation is not None:
        a, b = objects
        core = f"{_noun(a.colour, a.shape)} {relation} {_noun(b.colour, b.shape)}"
        form = rng.randrange(4)
        if form == 1:  # without articles
            return f"{a.colour} {a.shape} {relation} {b.colour} {b.shape}"
        return ("", "", "a picture of ", "there is ")[form] + core
    o = objects[0]
    size = size_word(o.size) if rng.random() < 0.5 else None
    phrases = true_positions(o, margin=2)
    if where is None and phrases and rng.random() < say_place:
        where = rng.choice(phrases)
    tail = f" {where}" if where else ""
    form = rng.randrange(5)
    if form == 1:
        return " ".join(w for w in (size, o.colour, o.shape) if w) + tail
    if form == 4:
        return f"{_noun(size, o.shape)} that is {o.colour}{tail}"
    return ("", "", "a picture of ", "there is ")[min(form, 3)] + _noun(o.colour, o.shape, size) + tail


def parse(text):
    """A caption -> what it asks for: {'objects': [{'colour', 'shape', 'size'?}], 'position'?, 'relation'?}.
    Returns None for text outside the world."""
    text = " " + text.lower().strip() + " "
    relation = next((r for r in RELATIONS if f" {r} " in text), None)
    parts = text.split(f" {relation} ") if relation else [text]
    objects = []
    for part in parts:
        words = part.split()
        colours = [w for w in words if w in COLOURS]
        shapes = [w for w in words if w in SHAPES]
        if len(colours) != 1 or len(shapes) != 1:
            return None
        obj = {"colour": colours[0], "shape": shapes[0]}
        sizes = [w for w in words if w in SIZES]
        if sizes:
            obj["size"] = sizes[0]
        objects.append(obj)
    spec = {"objects": objects, "relation": relation}
    position = next((p for p in POSITIONS if f" {p} " in text), None)
    if position and not relation:
        spec["position"] = position
    return spec

# -----------------------------------------------------------------------------
# The checker: reads colour, shape, size and position back from the pixels

MIN_AREA = 20          # components smaller than this are specks, not objects
MIN_CORE = 4           # nor are thin rims: an object has this many pixels whose 4 neighbours are all its own
MIN_SHAPE_IOU = 0.6    # a blob that matches no template this well has no shape
HALO = 0.4             # a dark pixel beside an object that holds this much of its colour is part of its outline


def _components(mask):
    """4-connected components of a bool (64, 64) mask -> list of (ys, xs) index arrays. Each row's runs of True
    are joined to the runs they touch in the row above (union-find over runs, not pixels: fast in Python)."""
    edges = np.diff(np.pad(mask, ((0, 0), (1, 1))).astype(np.int8), axis=1)  # (64, 65): +1 run starts, -1 ends
    ys, x0s = np.nonzero(edges == 1)
    x1s = np.nonzero(edges == -1)[1]  # run i covers row ys[i], columns x0s[i] .. x1s[i] - 1
    parent, rows = list(range(len(ys))), {}
    for i, y in enumerate(ys):
        rows.setdefault(y, []).append(i)

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i
    for i, y in enumerate(ys):
        for k in rows.get(y - 1, ()):
            if x0s[k] < x1s[i] and x0s[i] < x1s[k]:  # the runs overlap: one component
                parent[find(i)] = find(k)
    comps = {}
    for i in range(len(ys)):
        comps.setdefault(find(i), []).append(i)
    return [(np.repeat(ys[r], x1s[r] - x0s[r]), np.concatenate([np.arange(x0s[i], x1s[i]) for i in r]))
            for r in comps.values()]


@functools.lru_cache(maxsize=None)
def _template(shape, bh, bw, grow):
    """bool (bh, bw): shape drawn in the box 2 px inside the window, grown (or shrunk) by grow px."""
    tpl = Image.new("1", (bw, bh))
    draw_shape(ImageDraw.Draw(tpl), shape, [2 - grow / 2, 2 - grow / 2, bw - 3 + grow / 2, bh - 3 + grow / 2], 1)
    return np.asarray(tpl, dtype=bool)


def _classify(mask):
    """The shape whose template best overlaps a bool mask (IoU), drawn in the mask's bounding box grown or shrunk
    by up to 2 px: a decoder's soft edges shave or pad a small shape's tips by a pixel (README: the checker)."""
    ys, xs = np.nonzero(mask)
    window = np.pad(mask, 2)[ys.min():ys.max() + 5, xs.min():xs.max() + 5]  # the box, 2 px wider on every side
    bh, bw = window.shape
    best, best_iou = None, MIN_SHAPE_IOU
    for shape in SHAPES:
        for grow in (-2, -1, 0, 1, 2):
            if min(bh, bw) - 5 + grow < 2:
                continue
            tpl = _template(shape, bh, bw, grow)
            iou = np.count_nonzero(tpl & window) / np.count_nonzero(tpl | window)
            if iou > best_iou:
                best, best_iou = shape, iou
    return best


def read_objects(image):
    """uint8 (64, 64, 3) -> the objects it shows, each an Obj with shape None when it matches no shape.
    Colour by the nearest palette entry; an object is a connected region of one colour with a solid core; its
    outline takes in the dark halo around it that still holds HALO of its colour (a soft edge, not a new object)."""
    img = image.astype(np.float32)
    palette = np.array(list(COLOURS.values()), np.float32)  # (8, 3)
    dist2 = (img ** 2).sum(-1, keepdims=True) - 2 * img @ palette.T + (palette ** 2).sum(-1)  # (64, 64, 8): squared
    label = np.where((dist2.min(-1) < 80 ** 2) & (img.max(-1) > 60), dist2.argmin(-1), -1)  # (64, 64)
    objects = []
    for i in np.unique(label[label >= 0]):
        colour = list(COLOURS)[i]
        share = img @ palette[i] / (palette[i] @ palette[i])  # (64, 64): how much of this colour each pixel holds
        for ys, xs in _components(label == i):
            comp = np.zeros((SIZE, SIZE), bool)
            comp[ys, xs] = True
            core = comp[1:-1, 1:-1] & comp[:-2, 1:-1] & comp[2:, 1:-1] & comp[1:-1, :-2] & comp[1:-1, 2:]
            if len(ys) < MIN_AREA or core.sum() < MIN_CORE:
                continue
            near = np.zeros_like(comp)
            near[max(ys.min() - 2, 0):ys.max() + 3, max(xs.min() - 2, 0):xs.max() + 3] = True
            mask = comp | (near & (label == -1) & (share >= HALO))  # (64, 64)
            mys, mxs = np.nonzero(mask)
            size = max(mys.max() - mys.min(), mxs.max() - mxs.min()) + 1
            objects.append(Obj(colour, _classify(mask), size, (mxs.min() + mxs.max()) / 2, (mys.min() + mys.max()) / 2))
    return objects


def judge(spec, image):
    """Whether an image shows everything a parsed caption asks for -> {'colour', 'shape', 'all'} booleans.
    'all': exactly the asked objects, each of the right colour and shape, and size / position / relation."""
    found = read_objects(image)
    want = spec["objects"]
    if spec["relation"]:
        if len(found) != 2:
            return {"colour": False, "shape": False, "all": False}
        verdicts = []
        for a, b in (found, found[::-1]):  # either object may be the first one named
            colour = a.colour == want[0]["colour"] and b.colour == want[1]["colour"]
            shape = colour and a.shape == want[0]["shape"] and b.shape == want[1]["shape"]
            where = shape and relation_holds(a, b, spec["relation"], margin=MARGIN / 2)
            verdicts.append((where, shape, colour))
        where, shape, colour = max(verdicts)
        return {"colour": colour, "shape": shape, "all": where}
    if len(found) != 1:
        return {"colour": False, "shape": False, "all": False}
    o, w = found[0], want[0]
    colour, shape = o.colour == w["colour"], o.shape == w["shape"]
    size = "size" not in w or size_word(o.size) == w["size"]
    where = "position" not in spec or spec["position"] in true_positions(o)
    return {"colour": colour, "shape": shape, "all": colour and shape and size and where}

# -----------------------------------------------------------------------------
# Data: a pool of scenes rendered once; captions are drawn afresh every time a scene is used


def render_all(scenes):
    """A list of scenes' objects -> their renders as one uint8 tensor (N, 3, H, W)."""
    return torch.from_numpy(np.stack([render(objects) for objects in scenes])).permute(0, 3, 1, 2)


PICTURE_PROMPTS = ["a large yellow square on the left", "a green triangle above a red square",  # seen
                   "a green circle at the top", "a red circle above a blue square",  # a new place, a new pair
                   "a red triangle", "a blue circle to the left of a white square"]  # held-out colour-shape pairs


class ShapesData:
    """The Shapes world's training pool, what train.py's stages draw from: uint8 images (n, 3, 64, 64), rendered
    once, and an item per image, its scene (objects, relation). train.Data serves a folder of pictures the same way;
    the Shapes world adds what its scenes allow: CLIP's twins."""

    def __init__(self, items, images):
        self.items, self.images = items, images

    def caption(self, item, rng, say_place=0.5):
        return caption(*item, rng, say_place=say_place)

    def clip_batch(self, cfg, rng):
        """One CLIP batch -> (B' captions, uint8 images (B', 3, H, W)): clip_batch distinct scenes of the pool, then
        with clip_swaps each scene's twin (B' >= clip_batch)."""
        idx = rng.sample(range(len(self.items)), min(cfg.clip_batch, len(self.items)))
        items, images = [self.items[i] for i in idx], self.images[idx]  # images (B, 3, H, W) uint8
        # the share of one-object captions that name the place; with clip_moves, drawn here: those get moved twins
        say = [float(rng.random() < cfg.place_phrase) if cfg.clip_moves else cfg.place_phrase for _ in items]
        if cfg.clip_swaps:
            # DEVIATION: NegCLIP's hard negatives (Yuksekgonul et al. 2022), not the paper's CLIP: captions that
            # differ only in binding, relation or place meet in one batch (README: Deviations)
            twins = []  # a pair's twin has its colours, shapes or places swapped; a placed object's, the object moved
            for item, p in zip(items, say):
                if item[1] is not None:
                    twins.append(swapped(*item, rng))
                elif cfg.clip_moves and p == 1:
                    twins.append(moved(item[0][0], rng))
            twins = [t for t in twins if t is not None]
            if twins:  # a moved scene's twin differs from it in the place alone: its caption names it too
                items, say = items + twins, say + [1.0] * len(twins)
                images = torch.cat([images, render_all([objects for objects, _ in twins])])  # (B', 3, H, W)
        return [caption(*item, rng, say_place=p) for item, p in zip(items, say)], images

    def corpus(self, rng):
        return "\n".join(caption(*item, rng) for item in self.items[:5000])


def make_pool(n, seed):
    """n training scenes, rendered once -> ShapesData (its images (n, 3, 64, 64) uint8)."""
    rng = random.Random(seed)
    scenes = [random_scene(rng) for _ in range(n)]
    return ShapesData(scenes, render_all([objs for objs, _ in scenes]).contiguous())


def eval_prompts(n_each):
    """Fixed prompts for the report: n_each per group of REPORT_GROUPS, in the whole caption grammar, the same for
    every seed, so that two seeds' figures differ by what they learnt, not by the prompts drawn."""
    rng = random.Random(1)
    prompts = {group: [] for group in REPORT_GROUPS}
    for group in REPORT_GROUPS:
        for _ in range(n_each):
            objects, relation, where = report_scene(rng, group)
            prompts[group].append(caption(objects, relation, rng, where))
    return prompts


# -----------------------------------------------------------------------------
# The report: what the samples show, read back by the checker, and its pictures



def checker_right(scenes, images_u8):
    """Whether the checker reads each scene's caption back from its pixels (all attributes) -> list of bools."""
    rng = random.Random(0)
    return [judge(parse(caption(objs, rel, rng)), img.permute(1, 2, 0).numpy())["all"]
            for (objs, rel), img in zip(scenes, images_u8)]


def by_size(scenes, right):
    """The share right among large and among small single objects -> 'large x% small y%'."""
    right, large = np.asarray(right), np.array([len(o) == 1 and o[0].size > SIZES["small"] for o, _ in scenes])
    return f"large {right[large].mean():.0%} small {right[~large].mean():.0%}"


@torch.no_grad()
def report_dvae(model, cfg, device, codes_pool, n=128):
    """The dVAE's reconstructions of n scenes per report group, read back by the checker -> (lines, picture rows)."""
    c, lines, rows = model.config, [], []
    rng = random.Random(cfg.seed + 7)
    scenes = {g: [report_scene(rng, g)[:2] for _ in range(n)] for g in REPORT_GROUPS}
    all_scenes = sum(scenes.values(), [])
    images_u8 = render_all([o for o, _ in all_scenes])  # (6n, 3, H, W)
    images = to_float(images_u8, device)  # (6n, 3, H, W)
    codes = model.image_codes(images)  # (6n, h, w)
    recon = model.vae.decode(codes)  # (6n, 3, H, W)
    recon_u8, used = to_u8(recon), codes_pool.unique().numel()
    lines.append(f"dVAE: reconstruction MSE {((recon - images) ** 2).mean().item():.5f} (pixels in [0, 1]); "
                 f"codebook usage {used}/{c.image_vocab_size} = {used / c.image_vocab_size:.0%} of K "
                 f"(blank cells all get code {model.blank_code})")
    right = {"clean": checker_right(all_scenes, images_u8), "recon": checker_right(all_scenes, recon_u8)}
    lines.append(f"checker on {len(all_scenes)} clean renders: {np.mean(right['clean']):.1%} right; on their dVAE "
                 f"reconstructions ({n} scenes a group):")
    for i, (group, group_scenes) in enumerate(scenes.items()):
        ok = right["recon"][n * i:n * (i + 1)]
        sizes = f" ({by_size(group_scenes, ok)})" if group_scenes[0][1] is None else ""
        lines.append(f"  {group:<18} {np.mean(ok):5.1%}{sizes}")
        pairs = torch.stack([images[n * i:n * i + 5], recon[n * i:n * i + 5]], 1).flatten(0, 1)  # (10, 3, H, W)
        labels = [x for k in range(5) for x in ("render", "dVAE right" if ok[k] else "dVAE wrong")]
        rows.append((group, pairs, labels))
    seen = [i for i, g in enumerate(REPORT_GROUPS) if g.startswith("seen")]  # the scenes the prior learnt from
    text = model.tokenize([caption(o, r, rng) for i in seen for o, r in scenes[REPORT_GROUPS[i]]])
    _, losses = model.transformer(text, torch.cat([codes[n * i:n * (i + 1)] for i in seen]).flatten(1))
    lines.append(f"transformer loss on seen scenes: {losses['text'].item():.3f} nats per text token (pads included), "
                 f"{losses['image'].item():.3f} nats per image token (ln K = {math.log(c.image_vocab_size):.2f})")
    return lines, rows


def judge_all(prompts, images):
    """prompts (P,), images (P, N, 3, H, W) -> {'colour', 'shape', 'all'}: bool arrays (P, N), the checker's."""
    u8 = to_u8(images).permute(0, 1, 3, 4, 2).numpy()  # (P, N, H, W, 3)
    verdicts = [[judge(parse(prompt), u8[p, j]) for j in range(u8.shape[1])] for p, prompt in enumerate(prompts)]
    return {k: np.array([[v[k] for v in row] for row in verdicts]) for k in verdicts[0][0]}


@torch.no_grad()
def report_samples(model, cfg, by_group):
    """Each group's prompts, N candidates each, reranked by CLIP and read by the checker -> (lines, results, rows)."""
    N, lines, results, rows = cfg.candidates, [], {}, []
    lines.append(f"samples ({N} a prompt): right = every object and attribute the caption names, nothing else; "
                 f"random = mean of the {N}, best = CLIP's pick, any = a right one among the {N}")
    for group, prompts in by_group.items():
        images, scores, _ = model.generate(prompts, n=N, keep=N, seed=cfg.seed)  # best first
        r = judge_all(prompts, images)  # (P, N) each
        results[group] = {k: (v.mean(), v[:, 0].mean(), v.any(1).mean()) for k, v in r.items()}
        a = results[group]["all"]
        line = (f"  {group:<18} ({len(prompts)} prompts) random {a[0]:5.1%} | best {a[1]:5.1%} | any {a[2]:5.1%} || "
                f"best: colour {results[group]['colour'][1]:5.1%} shape {results[group]['shape'][1]:5.1%}")
        large = np.array([parse(p)["objects"][0].get("size") == "large" for p in prompts])
        if not parse(prompts[0])["relation"] and large.any():
            line += f" | asked large {r['all'][large, 0].mean():5.1%}"
        lines.append(line)
        rows.append((f"{group}: \"{prompts[0]}\"", images[0],
                     [f"{s:.3f} {'right' if ok else 'wrong'}" for s, ok in zip(scores[0].tolist(), r["all"][0])]))
    return lines, results, rows


def best_of(right, n):
    """right (P, M) bools in CLIP's order, best first -> the expected share right of CLIP's pick among n of the M
    drawn at random: the candidate at rank r (0-based) is the pick when it and n - 1 of the M - 1 - r below it are
    drawn, in comb(M - 1 - r, n - 1) of the comb(M, n) draws (n = 1: a random candidate; n = M: CLIP's best)."""
    M = right.shape[1]
    weights = np.array([math.comb(M - 1 - r, n - 1) for r in range(M)]) / math.comb(M, n)  # (M,), sums to 1
    return float((right * weights).sum(1).mean())


@torch.no_grad()
def rerank_curve(model, cfg, by_group, ns=(1, 2, 4, 8, 16, 32)):
    """The toy counterpart of Fig. 9c: the share of CLIP's picks that are right against the number of candidates,
    from max(ns) candidates for each of the first curve_prompts prompts of each group the model can draw (the
    held-out groups stay near 0 at every N: README, Results) -> (lines, {group: [%]})."""
    curve = {}
    for group, prompts in by_group.items():
        if group.startswith("held-out"):
            continue
        images, _, _ = model.generate(prompts[:cfg.curve_prompts], n=max(ns), keep=max(ns), seed=cfg.seed + 1)
        right = judge_all(prompts[:cfg.curve_prompts], images)["all"]  # (P, max(ns)), best first
        curve[group] = [100 * best_of(right, n) for n in ns]
    lines = [f"reranking (Fig. 9c): % of CLIP's picks right, best of N candidates ({len(images)} prompts a group, "
             f"{max(ns)} drawn for each)", f"  {'N':<18}" + "".join(f"{n:7d}" for n in ns)]
    lines += [f"  {group:<18}" + "".join(f"{v:7.1f}" for v in values) for group, values in curve.items()]
    return lines, curve, ns


def cell_patches(images_u8, cell):
    """uint8 images (N, 3, H, W) -> their cell x cell patches as bytes, N * (H / cell) * (W / cell) in raster order."""
    N, _, H, W = images_u8.shape
    patches = images_u8.reshape(N, 3, H // cell, cell, W // cell, cell).permute(0, 2, 4, 1, 3, 5)
    return [bytes(p) for p in patches.reshape(-1, 3 * cell * cell).numpy()]


@torch.no_grad()
def patch_limit(model, data, device, path):
    """Why held-out colour-shape pairs fail (README): how many of a held-out object's cells show pixels that no
    training image shows (with the code grid's cells, and with cells half as wide), and a picture: each held-out
    kind small and large, its unseen cells outlined, beside its dVAE reconstruction."""
    cell, rng, lines = model.config.image_size // model.config.grid_size, random.Random(0), []
    objects = [place_one(rng, kind, size) for size in SIZES.values() for kind in sorted(HELD_OUT)]
    renders = render_all([[o] for o in objects])  # (16, 3, H, W)
    for c in (cell // 2, cell):
        seen = set(cell_patches(data.images, c))  # blank cells are in it: every training image has some
        keys = cell_patches(renders, c)
        unseen = np.array([k not in seen for k in keys]).reshape(len(objects), SIZE // c, SIZE // c)
        lines.append(f"{c}x{c} cells: {unseen.sum()} of the {sum(k != bytes(3 * c * c) for k in keys)} non-blank "
                     f"cells of 16 held-out objects show pixels that no training image shows")
    outlined = to_float(renders, device)  # (16, 3, H, W); `unseen` is the last loop's: the code grid's cells
    magenta = torch.tensor([1.0, 0.0, 1.0], device=outlined.device)[:, None, None]  # (3, 1, 1)
    for n, r, c in zip(*np.nonzero(unseen)):  # a magenta frame around each cell no training image shows
        box = outlined[n, :, r * cell:(r + 1) * cell, c * cell:(c + 1) * cell]  # (3, cell, cell), a view
        box[:, [0, -1], :] = magenta
        box[:, :, [0, -1]] = magenta
    recon = model.vae.decode(model.image_codes(to_float(renders, device)))  # (16, 3, H, W)
    pairs = torch.stack([outlined, recon], 1).reshape(2, 8 * 2, *recon.shape[1:])  # (2 sizes, 8 kinds x 2, 3, H, W)
    grid = image_grid(pairs)
    grid.resize((2 * grid.width, 2 * grid.height), Image.NEAREST).save(path)  # twice the size, to see the cells
    return lines

# -----------------------------------------------------------------------------
# Pictures with words: sample rows with their CLIP scores, and line charts (no plotting library needed)


def plot(panels, path, size=(300, 200), pad=(52, 22, 16, 30)):
    """panels: [(title, {name: (xs, ys)}, x_ticks, log_y, y_range or None)] -> one PNG of line charts side by side;
    with x_ticks the x axis is log scale, with those ticks."""
    colours = [(40, 110, 230), (240, 120, 30), (40, 160, 60), (200, 40, 170), (200, 170, 0), (90, 90, 90)]
    left, top, right, bottom = pad
    img = Image.new("RGB", (len(panels) * (size[0] + left + right), size[1] + top + bottom), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for p, (title, series, x_ticks, log_y, y_range) in enumerate(panels):
        ox = p * (size[0] + left + right) + left
        fx = math.log10 if x_ticks else float
        fy = (lambda v: math.log10(max(v, 1e-6))) if log_y else float  # noqa: E731
        xs = [fx(x) for xs, _ in series.values() for x in xs]
        y0, y1 = [fy(v) for v in y_range] if y_range else (min(fy(y) for _, ys in series.values() for y in ys),
                                                            max(fy(y) for _, ys in series.values() for y in ys))
        x0, x1, y1 = min(xs), max(xs), max(y1, y0 + 1e-9)
        px = lambda x: ox + (fx(x) - x0) / (x1 - x0 + 1e-9) * size[0]  # noqa: E731
        py = lambda y: top + (1 - (fy(y) - y0) / (y1 - y0)) * size[1]  # noqa: E731
        draw.rectangle([ox, top, ox + size[0], top + size[1]], outline=(0, 0, 0))
        draw.text((ox, 4), title, fill=(0, 0, 0))
        for v in (y0, y1):  # the y axis ends, in the data's units, right-aligned against the axis
            label = f"{10 ** v if log_y else v:.3g}"
            draw.text((ox - 4 - draw.textlength(label), top + (1 - (v - y0) / (y1 - y0)) * size[1] - 6), label,
                      fill=(0, 0, 0))
        for x in x_ticks or [x0, x1]:  # the x ticks, or the axis ends
            label = f"{x:.0f}"
            draw.text((px(x) - draw.textlength(label) / 2, top + size[1] + 4), label, fill=(0, 0, 0))
        for i, (name, (sx, sy)) in enumerate(series.items()):
            colour = colours[i % len(colours)]
            draw.line([(px(x), py(y)) for x, y in zip(sx, sy)], fill=colour, width=2)
            draw.text((ox + 6, top + 4 + 11 * i), name, fill=colour)
    img.save(path)


def smooth(values, k=25):
    """A running mean over k updates: the per-update losses are noisy."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - k] if i >= k else 0)
        out.append(total / min(i + 1, k))
    return out


def draw_losses(history, path):
    """The default run's loss curves, one panel per stage, from the per-update losses in the checkpoint."""
    panels = []
    for stage, names in (("dvae", ("loss", "mse")), ("decoder", ("loss",)), ("prior", ("text", "image")),
                         ("clip", ("loss",))):
        rows = history.get(stage) or []
        if rows:
            steps = [r[0] + 1 for r in rows]
            series = {name: (steps, smooth([r[i + 1] for r in rows])) for i, name in enumerate(names)}
            panels.append((f"{stage}: loss per update (mean of 25), log scale", series, None, True, None))
    if panels:
        plot(panels, path)




@torch.no_grad()
def write_samples(model, path, n=8, keep=4):
    """The best `keep` of n candidates for each of PICTURE_PROMPTS, a row each under its prompt, with CLIP's score and
    the checker's verdict under each picture."""
    model.eval()
    images, scores, _ = model.generate(PICTURE_PROMPTS, n=n, keep=keep, seed=0)  # (P, keep, 3, H, W)
    right = judge_all(PICTURE_PROMPTS, images)["all"]  # (P, keep)
    labelled_rows([(f'"{prompt}"', pictures, [f"{s:.3f} {'right' if right[p, k] else 'wrong'}"
                                              for k, s in enumerate(row)])
                   for p, (prompt, pictures, row) in enumerate(zip(PICTURE_PROMPTS, images, scores.tolist()))],
                  scale=3).save(path)
    model.train()


@torch.no_grad()
def write_recon(model, data, device, path, n=8):
    """The first n training images over their dVAE reconstructions (dvae_recon.png, after stage 1)."""
    model.eval()
    images = to_float(data.images[:n], device)
    image_grid(torch.stack([images, model.vae.decode(model.image_codes(images))])).save(path)
    model.train()


def report(model, cfg, data, codes, device, out):
    """The report's figures -> its lines; its pictures go to out(name): the dVAE's reconstructions and the samples
    of every group read by the checker, the reranking curve, the held-out cells, the masks."""
    model.eval()
    lines, recon_rows = report_dvae(model, cfg, device, codes)
    by_group = eval_prompts(cfg.eval_prompts)  # {group: prompts}, the same for every seed
    more, _, sample_rows = report_samples(model, cfg, by_group)
    lines += more
    if cfg.curve_prompts:
        more, curve, ns = rerank_curve(model, cfg, by_group)
        lines += more
        plot([("% right: CLIP picks the best of N candidates (N on a log scale)",
               {g: (list(ns), v) for g, v in curve.items()}, list(ns), False, (0, 100))], out("rerank_curve.png"),
             size=(420, 240))
    lines += patch_limit(model, data, device, out("held_out_patches.png"))
    labelled_rows(recon_rows).save(out("recon_by_group.png"))
    labelled_rows(sample_rows).save(out("samples_by_group.png"))
    draw_masks().save(out("masks.png"))  # Fig. 11's three masks on a 4x4 grid, the kernel 3x3
    return lines
