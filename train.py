"""
Train DALL-E's three stages on the Shapes world, in paper order, on a laptop CPU:
  1. the dVAE on pixels (Sec 2.1), 2. the transformer prior on the frozen dVAE's argmax codes (Sec 2.2),
  3. CLIP for reranking (Sec 2.6). Then a report: how often the samples show what their captions say, for seen
  objects and pairs, and for the three zero-shot kinds of world v2 that no training scene shows: objects in places
  they never visit, pairs of objects never seen together, and colour-shape pairs never rendered.

    python train.py                 # the default run: about 10 minutes on 2 CPU cores, writes out/dalle.pt
    python train.py --resume        # continue an interrupted run (Ctrl-C saves one)

The Shapes world (shared/SHAPES.md) is made here on the fly: importing this file has no side effects.
"""
import argparse
import functools
import math
import os
import random
import sys
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from dalle import (DALLE, ArgumentParser, BPETokenizer, CheckpointError, DALLEConfig, gumbel_temperature,
                   image_grid, kl_weight, map_pixels, pick_device)

# -----------------------------------------------------------------------------
# The Shapes world: 64x64, black background, 8 colours, 4 shapes, 2 sizes, positions and relations

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
# DEVIATION (of the toy world, not the paper): centres lie on an 8-pixel lattice and sizes are exact (SHAPES.md
# allows jitter, it does not ask for it): the 8x8 grid of codes then meets each shape in one alignment, which a
# dVAE trained for minutes can learn (400-update probes: 12.5% / 30.5% of seen / held-out reconstructions fully
# right, against 9.8% / 11.7% with a 4-pixel lattice).
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


def caption(objects, relation, rng, where=None):
    """A random true paraphrase of a scene: size and position words are each said or left out (the position
    phrase `where` is always said, if given)."""
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
    if where is None and phrases and rng.random() < 0.5:
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
            iou = (tpl & window).sum() / (tpl | window).sum()
            if iou > best_iou:
                best, best_iou = shape, iou
    return best


def read_objects(image):
    """uint8 (64, 64, 3) -> the objects it shows, each an Obj with shape None when it matches no shape.
    Colour by the nearest palette entry; an object is a connected region of one colour with a solid core; its
    outline takes in the dark halo around it that still holds HALO of its colour (a soft edge, not a new object)."""
    img = image.astype(np.float32)
    palette = np.array(list(COLOURS.values()), np.float32)  # (8, 3)
    dist = np.linalg.norm(img[:, :, None, :] - palette[None, None], axis=-1)  # (64, 64, 8)
    label = np.where((dist.min(-1) < 80) & (img.max(-1) > 60), dist.argmin(-1), -1)  # (64, 64)
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


def make_pool(n, seed):
    rng = random.Random(seed)
    scenes = [random_scene(rng) for _ in range(n)]
    images = torch.from_numpy(np.stack([render(objs) for objs, _ in scenes]))  # (n, 64, 64, 3) uint8
    return scenes, images.permute(0, 3, 1, 2).contiguous()  # (n, 3, 64, 64)


def to_float(images_u8, device):
    return images_u8.to(device).float() / 255  # (B, 3, H, W) in [0, 1]


def to_u8(images):
    return (images * 255).round().byte().cpu()  # images in [0, 1] -> uint8 on the CPU, same shape


def eval_prompts(seed, n_each):
    """Fixed prompts for the report: n_each per group of REPORT_GROUPS, in the whole caption grammar."""
    rng = random.Random(seed + 1)
    prompts = {group: [] for group in REPORT_GROUPS}
    for group in REPORT_GROUPS:
        for _ in range(n_each):
            objects, relation, where = report_scene(rng, group)
            prompts[group].append(caption(objects, relation, rng, where))
    return prompts


def fmt_time(s):
    return f"{int(s // 60)}m{int(s % 60):02d}s"

# -----------------------------------------------------------------------------
# The three stages


def train_dvae(model, pool, args, device, state):
    """Stage 1 (Sec 2.1, App. A.2): gumbel-softmax relaxation, tau 1 -> 1/16, KL weight beta ramped up to --beta;
    then, for the last sixth of the updates, the decoder alone on the encoder's argmax codes."""
    vae, steps, K = model.vae, args.dvae_steps, model.config.image_vocab_size
    relaxed = steps - steps // 6  # updates with the relaxation; the rest train the decoder on argmax codes
    # DEVIATION: batch 8 (paper: 8 per GPU, 512 in all), lr 1e-3 (paper: 1e-4), beta ramped over a quarter of the
    # run to 1 (paper: to 6.6 over 5,000 of 3M updates): a toy run has a few thousand updates, not millions, and on a
    # CPU the number of updates is what buys quality (equal-time probes, 8 / 16 / 32 images a step: 68% / 53% / 25%
    # of seen reconstructions fully right). No EMA of weights for the same reason.
    # DEVIATION: the reconstruction term is the squared error of sigmoid(mu), not the logit-Laplace NLL. With the
    # NLL, every short run we tried (up to 1,600 updates, several inits and learning rates) collapsed to a few
    # codes: its L1-like pull goes to the median pixel, which is black, so the codes never start to matter.
    opt = torch.optim.AdamW(vae.parameters(), lr=args.dvae_lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-4)
    if state.get("opt"):
        opt.load_state_dict(state["opt"])
    gen = torch.Generator(device=device).manual_seed(args.seed)
    fixed = to_float(pool[1][:64], device)  # (64, 3, H, W): codes in use are counted here, a batch is too small
    crops, cell = torch.Generator().manual_seed(args.seed), SIZE // model.config.grid_size
    t0, start = time.time(), state.get("step", 0)
    for step in range(start, steps):
        idx = torch.randint(len(pool[1]), (args.dvae_batch,), generator=torch.Generator().manual_seed(step))
        images = to_float(pool[1][idx], device).contiguous(memory_format=torch.channels_last)  # (B, 3, H, W)
        if step < relaxed and args.dvae_crop:
            # DEVIATION: the relaxed updates see a random crop of whole cells (--dvae-crop 32: a quarter of the image
            # at half the cost; the nets are convolutional), so more updates fit the time (README: Deviations).
            # The decoder phase sees whole images, as the prior's codes come from whole images.
            y, x = (cell * torch.randint(0, (SIZE - args.dvae_crop) // cell + 1, (2,), generator=crops)).tolist()
            images = images[:, :, y:y + args.dvae_crop, x:x + args.dvae_crop]  # (B, 3, crop, crop)
        if step < relaxed:
            lr = cosine_lr(step, relaxed, args.dvae_lr, args.dvae_lr / 80)  # App. A.2: 1e-4 -> 1.25e-6
            tau, beta = gumbel_temperature(step, relaxed), kl_weight(step, relaxed // 4, args.beta)
            _, loss, stats = vae(images, tau, beta, generator=gen, recon_loss="mse")
            knobs = f"tau {tau:.3f} beta {beta:.2f}"
        else:
            # DEVIATION (not in the paper): the decoder alone, on the argmax codes that the prior is trained on and
            # will hand it. It learnt from gumbel samples of q, and q keeps its entropy under the KL term (on object
            # cells the argmax has about a third of q's mass), so it decoded argmax codes badly. The encoder is frozen
            # here, the codes do not change. Default run: seen reconstructions fully right 65% -> 77%; CLIP's best of
            # 8 right on 144 seen prompts 67% -> 81%. Probes: lr 1e-4, or a cosine from 3e-4 or 1e-3, did worse; the
            # paper's own cure, tau held at 1/16 after 5% of the updates, left 18% of reconstructions right this short.
            lr, knobs = 0.3 * args.dvae_lr, "decoder on argmax codes"
            if vae.blank_code < 0:  # once: blank cells get the code the encoder gives them most (dalle.py)
                blank = vae.blank_cells(fixed)  # (64, h, w)
                if blank.any():
                    with torch.no_grad():
                        vae.blank_code.fill_(vae.logits(fixed).argmax(1)[blank].mode().values)
            with torch.no_grad():
                one_hot = F.one_hot(vae.encode(images), K).permute(0, 3, 1, 2).float()  # (B, K, h, w)
            mu, _ = vae.decode_soft(one_hot)  # (B, 3, H, W)
            loss = ((torch.sigmoid(mu) - map_pixels(images)) ** 2).mean()
            stats = {"mse": loss.item(), "kl": 0.0}
        for g in opt.param_groups:
            g["lr"] = lr
        check_finite(loss, "dvae", step)
        opt.zero_grad(set_to_none=True)  # in the decoder phase the encoder has no gradients: AdamW leaves it be
        loss.backward()
        opt.step()
        if step % args.log_every == 0 or step == steps - 1 or step == relaxed:
            with torch.no_grad():
                used = vae.logits(fixed).argmax(1).unique().numel()
            rate = (step + 1 - start) * args.dvae_batch / (time.time() - t0)
            log("dvae", step, steps, f"loss {loss.item():7.4f} mse {stats['mse']:.4f} kl {stats['kl']:5.2f}",
                f"{knobs} | codes {used:3d}/{K}", f"{rate:6.0f} img/s", (steps - step - 1) * args.dvae_batch / rate)
        state.update(step=step + 1, opt=opt.state_dict())
    state.update(stage="prior", step=0, opt=None)


def train_prior(model, pool, codes, args, device, state, prompts):
    """Stage 2 (Sec 2.2, App. B.2): cross-entropy, 1/8 text + 7/8 image, BPE dropout 0.1, AdamW (0.9, 0.96)."""
    prior, steps = model.transformer, args.prior_steps
    opt = torch.optim.AdamW(prior.parameters(), lr=args.prior_lr, betas=(0.9, 0.96), eps=1e-8, weight_decay=4.5e-2)
    if state.get("opt"):
        opt.load_state_dict(state["opt"])
    scenes = pool[0]
    # DEVIATION: two-object scenes are drawn --pair-weight times as often as single objects (the pool has about
    # as many of each): a pair is the harder thing to learn, and singles come out right long before pairs do
    draws = [i for i, (_, relation) in enumerate(scenes) for _ in range(args.pair_weight if relation else 1)]
    t0, start = time.time(), state.get("step", 0)
    for step in range(start, steps):
        # DEVIATION: warm-up over 5% of the run, then cosine decay (paper: 5,000 updates, then plateau decay);
        # batch 32, lr 2e-3 (paper: 1024, 4.5e-4): a CPU affords a thousand updates, not hundreds of thousands.
        # Same dVAE, same time (a random candidate of 8 right on seen prompts): 1,120 x 32 at lr 2e-3 22%, at
        # 1e-3 16% (1-thread probes; 2,240 x 16 at 2e-3 reached 29%, but on 2 threads batch 16 runs at 2/3 the speed)
        lr = args.prior_lr * min(1, (step + 1) / max(1, steps // 20)) * cosine_lr(step, steps, 1, 0.05)
        for g in opt.param_groups:
            g["lr"] = lr
        rng = random.Random(args.seed * 1000003 + step)
        idx = rng.sample(draws, args.prior_batch)
        # DEVIATION: for classifier-free guidance (not in the paper), some captions are left empty (all pads)
        captions = ["" if rng.random() < args.null_caption else caption(*scenes[i], rng) for i in idx]
        text = model.tokenize(captions, dropout=0.1, rng=rng)  # Sec 2.2 fn. 5
        _, losses = prior(text, codes[idx].to(device))
        check_finite(losses["loss"], "prior", step)
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(prior.parameters(), 4.0)  # App. B.2
        opt.step()
        if step % args.log_every == 0 or step == steps - 1:
            rate = (step + 1 - start) * args.prior_batch * prior.config.block_size / (time.time() - t0)
            log("prior", step, steps, f"loss {losses['loss'].item():6.3f} text {losses['text'].item():6.3f} "
                f"image {losses['image'].item():6.3f}", f"lr {lr:.2e}", f"{rate:6.0f} tok/s",
                (steps - step - 1) * args.prior_batch * prior.config.block_size / rate)
        if args.sample_every and step and step % args.sample_every == 0:
            write_samples(model, prompts, os.path.join(args.out_dir, f"samples_{step:05d}.png"))
        state.update(step=step + 1, opt=opt.state_dict())
    state.update(stage="clip", step=0, opt=None)


def train_clip(model, pool, codes, args, device, state):
    """Stage 3 (Sec 2.6): CLIP's symmetric contrastive loss over (caption, image) pairs, for reranking."""
    clip, steps, h = model.clip, args.clip_steps, model.config.grid_size
    opt = torch.optim.AdamW(clip.parameters(), lr=args.clip_lr, weight_decay=0.1)
    if state.get("opt"):
        opt.load_state_dict(state["opt"])
    scenes, images_u8 = pool
    # CLIP will rank decoded samples, so half of each batch is the dVAE's reconstructions: those of the first
    # quarter of the pool, decoded once from their codes (decoding at every step costs more than CLIP itself)
    n_rec, half = len(scenes) // 4, args.clip_batch // 2
    recon_u8 = to_u8(model.vae.decode(codes[:n_rec].view(-1, h, h).to(device)))  # (n_rec, 3, H, W)
    t0, start = time.time(), state.get("step", 0)
    for step in range(start, steps):
        for g in opt.param_groups:
            g["lr"] = min(1, (step + 1) / max(1, steps // 10)) * cosine_lr(step, steps, args.clip_lr, args.clip_lr / 20)
        rng = random.Random(args.seed * 1000033 + step)
        # distinct scenes: reconstructions from the first quarter, renders from the rest
        idx = rng.sample(range(n_rec), half) + rng.sample(range(n_rec, len(scenes)), args.clip_batch - half)
        batch = [scenes[i] for i in idx]
        images = torch.cat([recon_u8[idx[:half]], images_u8[idx[half:]]])  # (B, 3, H, W) uint8
        # DEVIATION: NegCLIP's hard negatives (Yuksekgonul et al. 2022), not the paper's CLIP: each two-object scene
        # brings its swapped twin, so captions that differ only in binding or relation meet in one batch
        if args.clip_swaps:
            twins = [swapped(*s, rng) for s in batch if s[1] is not None]
            twins = [t for t in twins if t is not None]
            batch += twins
            images = torch.cat([images, torch.from_numpy(np.stack([render(o) for o, _ in twins])).permute(0, 3, 1, 2)])
        text = model.tokenize([caption(*s, rng) for s in batch])
        images = to_float(images, device)  # (B + twins, 3, H, W)
        loss = clip(text, images)
        check_finite(loss, "clip", step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % args.log_every == 0 or step == steps - 1:
            rate = (step + 1 - start) * args.clip_batch / (time.time() - t0)
            log("clip", step, steps, f"loss {loss.item():6.3f}", f"temp {1 / clip.logit_scale.exp().item():.4f}",
                f"{rate:6.0f} img/s", (steps - step - 1) * args.clip_batch / rate)
        state.update(step=step + 1, opt=opt.state_dict())
    state.update(stage="done", step=0, opt=None)


def cosine_lr(step, total, top, bottom):
    return bottom + (top - bottom) * 0.5 * (1 + math.cos(math.pi * min(step / max(total, 1), 1)))


def check_finite(loss, stage, step):
    if not torch.isfinite(loss):
        raise FloatingPointError(f"{stage} loss became {loss.item()} at step {step}; the last checkpoint is kept. "
                                 f"Try a lower learning rate or another --seed.")


def log(stage, step, steps, losses, knobs, rate, eta_s):
    print(f"{stage:<5} {step + 1:5d}/{steps} | {losses} | {knobs} | {rate} | eta {fmt_time(eta_s)}", flush=True)


@torch.no_grad()
def write_samples(model, prompts, path, n=8, keep=4):
    model.eval()
    images, _ = model.generate(prompts, n=n, keep=keep, seed=0)  # (P, keep, 3, H, W)
    image_grid(images).save(path)
    model.train()

# -----------------------------------------------------------------------------
# The report


@torch.no_grad()
def encode_pool(model, images_u8, device, batch=32):  # on 2 CPU threads, batches of 32 run ~2x faster than 512
    return torch.cat([model.vae.encode(to_float(images_u8[i:i + batch], device).contiguous(
        memory_format=torch.channels_last)).flatten(1).cpu() for i in range(0, len(images_u8), batch)])  # (n, T_img)


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
def report(model, args, device, codes_pool):
    model.eval()
    c, lines = model.config, []
    rng = random.Random(args.seed + 7)
    scenes = {g: [report_scene(rng, g)[:2] for _ in range(128)] for g in REPORT_GROUPS}  # for the dVAE and checker
    all_scenes = sum(scenes.values(), [])
    images_u8 = torch.from_numpy(np.stack([render(o) for o, _ in all_scenes])).permute(0, 3, 1, 2)
    images = to_float(images_u8, device)
    codes = model.vae.encode(images)  # (n, h, w)
    recon = model.vae.decode(codes)  # (n, 3, H, W)
    recon_u8 = to_u8(recon)
    used = codes_pool.unique().numel()
    lines.append(f"dVAE: reconstruction MSE {((recon - images) ** 2).mean().item():.5f} (pixels in [0, 1]); "
                 f"codebook usage {used}/{c.image_vocab_size} = {used / c.image_vocab_size:.0%} of K "
                 f"(blank cells all get code {model.vae.blank_code.item()})")
    right = {"clean": checker_right(all_scenes, images_u8), "recon": checker_right(all_scenes, recon_u8)}
    lines.append(f"checker on {len(all_scenes)} clean renders: {np.mean(right['clean']):.1%} right; on their dVAE "
                 f"reconstructions (128 scenes a group):")
    for i, (group, group_scenes) in enumerate(scenes.items()):
        ok = right["recon"][128 * i:128 * (i + 1)]
        sizes = f" ({by_size(group_scenes, ok)})" if group_scenes[0][1] is None else ""
        lines.append(f"  {group:<18} {np.mean(ok):5.1%}{sizes}")
    seen = [i for i, g in enumerate(REPORT_GROUPS) if g.startswith("seen")]  # the scenes the prior learnt from
    text = model.tokenize([caption(o, r, rng) for i in seen for o, r in scenes[REPORT_GROUPS[i]]])
    _, losses = model.transformer(text, torch.cat([codes[128 * i:128 * (i + 1)] for i in seen]).flatten(1))
    lines.append(f"transformer loss on seen scenes: {losses['text'].item():.3f} nats per text token (pads included), "
                 f"{losses['image'].item():.3f} nats per image token (ln K = {math.log(c.image_vocab_size):.2f})")
    lines.append("samples (8 a prompt): right = every object and attribute the caption names, nothing else; random = "
                 "mean of the 8, best = CLIP's pick, any = a right one among the 8")
    results = {}
    for group, prompts in eval_prompts(args.seed, args.eval_prompts).items():
        images, scores = model.generate(prompts, n=8, keep=8, seed=args.seed)  # (P, 8, 3, H, W), best first
        u8 = to_u8(images).permute(0, 1, 3, 4, 2).numpy()  # (P, 8, H, W, 3)
        verdicts = [[judge(parse(prompt), u8[p, j]) for j in range(8)] for p, prompt in enumerate(prompts)]
        r = {k: np.array([[v[k] for v in row] for row in verdicts]) for k in verdicts[0][0]}  # (P, 8) each
        results[group] = {k: (v.mean(), v[:, 0].mean(), v.any(1).mean()) for k, v in r.items()}
        a = results[group]["all"]
        line = (f"  {group:<18} ({len(prompts)} prompts) random {a[0]:5.1%} | best {a[1]:5.1%} | any {a[2]:5.1%} || "
                f"best: colour {results[group]['colour'][1]:5.1%} shape {results[group]['shape'][1]:5.1%}")
        large = np.array([parse(p)["objects"][0].get("size") == "large" for p in prompts])
        if not parse(prompts[0])["relation"] and large.any():
            line += f" | asked large {r['all'][large, 0].mean():5.1%}"
        lines.append(line)
    return lines, results


def cell_patches(images_u8, cell):
    """uint8 images (N, 3, H, W) -> their cell x cell patches as bytes, N * (H / cell) * (W / cell) in raster order."""
    N, _, H, W = images_u8.shape
    patches = images_u8.reshape(N, 3, H // cell, cell, W // cell, cell).permute(0, 2, 4, 1, 3, 5)
    return [bytes(p) for p in patches.reshape(-1, 3 * cell * cell).numpy()]


@torch.no_grad()
def patch_limit(model, pool, device, path):
    """Why held-out colour-shape pairs fail (README): how many of a held-out object's cells show pixels that no
    training image shows (with the code grid's cells, and with cells half as wide), and a picture: each held-out
    kind small and large, its unseen cells outlined, beside its dVAE reconstruction."""
    cell, rng, lines = model.config.image_size // model.config.grid_size, random.Random(0), []
    objects = [place_one(rng, kind, size) for size in SIZES.values() for kind in sorted(HELD_OUT)]
    renders = torch.from_numpy(np.stack([render([o]) for o in objects])).permute(0, 3, 1, 2)  # (16, 3, H, W)
    for c in (cell // 2, cell):
        seen = set(cell_patches(pool[1], c))  # blank cells are in it: every training image has some
        keys = cell_patches(renders, c)
        unseen = np.array([k not in seen for k in keys]).reshape(len(objects), SIZE // c, SIZE // c)
        lines.append(f"{c}x{c} cells: {unseen.sum()} of the {sum(k != bytes(3 * c * c) for k in keys)} non-blank "
                     f"cells of 16 held-out objects show pixels that no training image shows")
    outlined = to_float(renders, device)  # (16, 3, H, W); `unseen` is the last loop's: the code grid's cells
    for n, r, c in zip(*np.nonzero(unseen)):  # a magenta frame around each cell no training image shows
        box = outlined[n, :, r * cell:(r + 1) * cell, c * cell:(c + 1) * cell]  # (3, cell, cell), a view
        box[:, [0, -1], :] = torch.tensor([1.0, 0.0, 1.0])[:, None, None]
        box[:, :, [0, -1]] = torch.tensor([1.0, 0.0, 1.0])[:, None, None]
    recon = model.vae.decode(model.vae.encode(to_float(renders, device)))  # (16, 3, H, W)
    pairs = torch.stack([outlined, recon], 1).reshape(2, 8 * 2, *recon.shape[1:])  # (2 sizes, 8 kinds x 2, 3, H, W)
    grid = image_grid(pairs)
    grid.resize((2 * grid.width, 2 * grid.height), Image.NEAREST).save(path)  # twice the size, to see the cells
    return lines


# -----------------------------------------------------------------------------


def benchmark(device):
    """Speed at the reference config of issue #2 (lucidrains/DALLE-pytorch's figures were taken at it):
    64 px, 8x8 codes, K 512, text 32 tokens of a 1024 vocab, n_embd 256, 4 layers, 8 heads, batch 32."""
    c = DALLEConfig(n_embd=256, n_head=8, n_layer=4)
    tokenizer = BPETokenizer()
    tokenizer.train(" ".join(caption(*random_scene(random.Random(i)), random.Random(i)) for i in range(500)), 1024)
    model = DALLE(c, tokenizer).to(device)
    text = torch.randint(0, c.text_vocab_size, (32, c.text_seq_len), device=device)
    codes = torch.randint(0, c.image_vocab_size, (32, c.image_seq_len), device=device)
    opt = torch.optim.AdamW(model.transformer.parameters(), lr=1e-4)

    def timed(fn, repeats):
        fn()  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.time()
        for _ in range(repeats):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.time() - t0) / repeats

    def train_step():
        _, losses = model.transformer(text, codes)
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        opt.step()
    step = timed(train_step, 10)
    model.eval()
    gen = timed(lambda: model.generate(["a red circle above a blue square"], n=16, keep=16), 10)
    print(f"benchmark on {device} ({torch.get_num_threads()} threads): training step at batch 32 {step:.3f} s = "
          f"{32 * c.block_size / step:,.0f} tokens/s; 16 images generated, decoded and scored {gen:.3f} s")


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default="out", help="where the checkpoint, pictures and report go (default out)")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the first available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from OUT_DIR/dalle.pt")
    p.add_argument("--dvae-steps", type=int, default=3000,
                   help="stage 1 updates (the last sixth train the decoder alone on argmax codes)")
    p.add_argument("--prior-steps", type=int, default=1120, help="stage 2 updates")
    p.add_argument("--clip-steps", type=int, default=350, help="stage 3 updates")
    p.add_argument("--pool", type=int, default=8000, help="scenes rendered for training")
    p.add_argument("--eval-prompts", type=int, default=96, help="report prompts per group")
    p.add_argument("--sample-every", type=int, default=200, help="prior steps between sample grids (0: never)")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--benchmark", action="store_true", help="time a training step and generation, then exit")
    # what a student need not touch, but a tiny test run does
    p.add_argument("--dvae-batch", type=int, default=8, help=argparse.SUPPRESS)
    p.add_argument("--prior-batch", type=int, default=32, help=argparse.SUPPRESS)
    p.add_argument("--clip-batch", type=int, default=128, help=argparse.SUPPRESS)
    p.add_argument("--dvae-lr", type=float, default=1e-3, help=argparse.SUPPRESS)
    p.add_argument("--prior-lr", type=float, default=2e-3, help=argparse.SUPPRESS)
    p.add_argument("--clip-lr", type=float, default=2e-3, help=argparse.SUPPRESS)
    p.add_argument("--beta", type=float, default=1.0, help=argparse.SUPPRESS)
    p.add_argument("--logit-scale", type=float, default=3.0, help=argparse.SUPPRESS)
    p.add_argument("--null-caption", type=float, default=0.0,
                   help="share of the prior's captions left empty, so that sample.py --guidance works (default 0)")
    p.add_argument("--pair-weight", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--dvae-crop", type=int, default=32, help=argparse.SUPPRESS)  # 0: whole images
    p.add_argument("--clip-swaps", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--config", default="", help=argparse.SUPPRESS)  # e.g. n_layer=2,n_embd=64 for tests
    args = p.parse_args(argv)
    for name in ("dvae_steps", "prior_steps", "clip_steps", "pool", "eval_prompts", "log_every"):
        if getattr(args, name) < (1 if name in ("pool", "log_every", "eval_prompts") else 0):
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.dvae_crop % 8 or not 0 <= args.dvae_crop <= SIZE:
        p.error(f"--dvae-crop must be whole 8-pixel cells within the {SIZE}-pixel image (0: no crop), got {args.dvae_crop}")
    if not 0 <= args.null_caption < 1 or args.pair_weight < 1:
        p.error(f"need 0 <= --null-caption < 1 and --pair-weight >= 1, got {args.null_caption}, {args.pair_weight}")
    if args.pool < 4 * max(args.dvae_batch, args.prior_batch, args.clip_batch):
        p.error("--pool must hold at least 4 batches of scenes")
    return args


def build_model(args, pool):
    overrides = dict(kv.split("=") for kv in args.config.split(",") if kv)
    config = DALLEConfig(**{k: int(v) for k, v in overrides.items()})
    tokenizer = BPETokenizer()
    rng = random.Random(args.seed)
    corpus = "\n".join(caption(*pool[0][i], rng) for i in range(min(len(pool[0]), 5000)))
    tokenizer.train(corpus, config.text_vocab_size)
    model = DALLE(config, tokenizer)
    # DEVIATION: two init scales on top of openai's init (the paper does not give one for training).
    # openai's init gives logits of about 0.1 against gumbel noise of std 1.3: codes would carry almost nothing
    # through the relaxation at first, and a toy run has no time to wait for them to grow
    # likewise the codebook conv: a one-hot input gives it outputs of about 1/sqrt(K), so codes look all alike
    with torch.no_grad():
        model.vae.encoder.output.conv.weight.mul_(args.logit_scale)
        model.vae.decoder.input.weight.mul_(5.0)
    return model


def main(argv=None):
    args = parse_args(argv)
    try:
        device = pick_device(args.device)
    except ValueError as e:
        sys.exit(f"error: {e}")
    if args.benchmark:
        return benchmark(device)
    torch.manual_seed(args.seed)
    os.makedirs(args.out_dir, exist_ok=True)
    ckpt_path = os.path.join(args.out_dir, "dalle.pt")
    t_start = time.time()
    pool = make_pool(args.pool, args.seed)
    state = {"stage": "dvae", "step": 0}
    if args.resume:
        try:
            model, ckpt = DALLE.load(ckpt_path, device)
        except CheckpointError as e:
            sys.exit(f"error: cannot resume: {e}")
        state = {"stage": ckpt["stage"], "step": ckpt["step"], "opt": ckpt.get("opt")}
        print(f"resuming {ckpt_path} at stage {state['stage']}, step {state['step']}")
    else:
        model = build_model(args, pool).to(device)
    model.train()
    model.vae.to(memory_format=torch.channels_last)  # faster convolutions on CPUs
    c = model.config
    print(f"device {device}, {torch.get_num_threads()} threads | dVAE {sum(p.numel() for p in model.vae.parameters()) / 1e6:.2f}M, "
          f"transformer {sum(p.numel() for p in model.transformer.parameters()) / 1e6:.2f}M, CLIP "
          f"{sum(p.numel() for p in model.clip.parameters()) / 1e6:.2f}M params | {c.image_size}px -> "
          f"{c.grid_size}x{c.grid_size} codes of K={c.image_vocab_size}, text {c.text_seq_len} tokens "
          f"(BPE vocab {len(model.tokenizer.vocab)})")
    prompts = ["a large yellow square on the left", "a green triangle above a red square",  # seen
               "a green circle at the top", "a red circle above a blue square",  # a new place, a new pair
               "a red triangle", "a blue circle to the left of a white square"]  # held-out colour-shape pairs

    def save():
        model.save(ckpt_path, step=state["step"], stage=state["stage"], opt=state.get("opt"),
                   null_caption=args.null_caption)
    try:
        if state["stage"] == "dvae":
            train_dvae(model, pool, args, device, state)
            save()
            write_recon(model, pool, device, os.path.join(args.out_dir, "dvae_recon.png"))
        codes = encode_pool(model, pool[1], device)  # (n, T_img): the frozen dVAE's argmax codes
        if state["stage"] == "prior":
            train_prior(model, pool, codes, args, device, state, prompts)
            save()
        if state["stage"] == "clip":
            train_clip(model, pool, codes, args, device, state)
            save()
    except KeyboardInterrupt:
        save()
        print(f"\ninterrupted: saved {ckpt_path} at stage {state['stage']}, step {state['step']}; "
              f"continue with: python train.py --resume")
        sys.exit(130)
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"training done in {fmt_time(time.time() - t_start)}; checkpoint {ckpt_path}")
    write_samples(model, prompts, os.path.join(args.out_dir, "final.png"))
    lines, _ = report(model, args, device, codes)
    lines += patch_limit(model, pool, device, os.path.join(args.out_dir, "held_out_patches.png"))
    lines.append(f"total time {fmt_time(time.time() - t_start)} on {device}")
    with open(os.path.join(args.out_dir, "report.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("report\n  " + "\n  ".join(lines))


@torch.no_grad()
def write_recon(model, pool, device, path, n=8):
    model.eval()
    images = to_float(pool[1][:n], device)
    recon = model.vae.decode(model.vae.encode(images))
    image_grid(torch.stack([images, recon])).save(path)  # row 1 originals, row 2 reconstructions
    model.train()


if __name__ == "__main__":
    main()
