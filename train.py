"""
Train DALL-E's three stages on the Shapes world, in paper order, on a laptop CPU:
  1. the dVAE on pixels (Sec 2.1), and then its decoder alone on the argmax codes the prior will hand it,
  2. the transformer prior on the frozen dVAE's codes (Sec 2.2),
  3. CLIP, for reranking the prior's samples (Sec 2.6).
Then a report: how often the samples show what their captions say, for seen objects and pairs, and for the three
zero-shot kinds that no training scene shows: objects in places they never visit, pairs of objects never seen
together, and colour-shape pairs never rendered.

    python train.py                          # the default run: about 7 minutes on 2 CPU cores, writes out/dalle.pt
    python train.py --resume                 # continue an interrupted run (Ctrl-C saves one)
    python train.py --dvae-from out/dalle.pt --out-dir out/ex   # keep that dVAE, train the prior and CLIP again

Read it top-down: the settings (TrainConfig, every one a flag), the recipe's parts, the stages, main. Below the
double ruler: the Shapes world (README: The Shapes world), its checker, the report and its pictures.
Importing this file has no side effects.
"""
import argparse
import functools
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch.nn.parallel import DistributedDataParallel

from dalle import (DALLE, ArgumentParser, BPETokenizer, CheckpointError, DALLEConfig, blank_cells, brief, cosine,
                   draw_masks, gumbel_temperature, image_grid, kl_weight, labelled_rows, logit_laplace_nll,
                   map_pixels, n_params, pick_device, unmap_pixels)

# -----------------------------------------------------------------------------
# The training settings, each with its paper value and, where ours differs, why (README: Deviations).
# DEVIATION: a toy run has thousands of updates, not millions: batches are small and learning rates high.


def setting(default, why, choices=None):
    return field(default=default, metadata={"help": why, "choices": choices})


@dataclass
class TrainConfig:
    seed: int = setting(0, "same seed, same run")
    pool: int = setting(8000, "scenes rendered once for training; their captions are drawn afresh at each use")
    log_every: int = setting(500, "updates between progress lines")
    sample_every: int = setting(1000, "prior updates between sample grids (0: never)")
    # stage 1, the dVAE (Sec 2.1, App. A.2)
    dvae_steps: int = setting(2500, "relaxed updates (paper: 3M)")
    dvae_batch: int = setting(8, "images per update (paper: 512): on a CPU, more small updates win")
    dvae_lr: float = setting(1e-3, "peak lr (paper: 1e-4)")
    dvae_lr_end: float = setting(1 / 80, "the cosine decays the lr to this share of its peak (paper: 1e-4 -> 1.25e-6)")
    dvae_recon: str = setting("mse", "reconstruction term: the paper's logit-laplace (App. A.3) collapsed every "
                                     "short run to a few codes; mse is the squared error of sigmoid(mu)",
                              choices=("mse", "logit-laplace"))
    # DEVIATION: no EMA of the dVAE's weights (paper: decay 0.999 over 3M updates); a run of thousands has no long
    # plateau for an average to smooth (README: Deviations)
    beta: float = setting(1.0, "KL weight once ramped up (paper: 6.6)")
    beta_ramp: float = setting(0.25, "share of the relaxed updates over which beta ramps up (paper: 5k of 3M)")
    # DEVIATION: tau anneals over all the relaxed updates, not only the paper's first 150k of 3M (README: Deviations)
    tau_anneal: float = setting(1.0, "share of the relaxed updates over which tau anneals 1 -> 1/16, then held "
                                     "(paper: 150k of 3M)")
    dvae_crop: int = setting(32, "updates see a random crop this wide, in whole cells (0: the whole image; paper: "
                                 "whole images): a crop costs a third of a whole image, so more updates fit")
    crop_on_object: bool = setting(True, "each image's crop holds a cell it draws on, so that each update sees "
                                         "shapes, not black (else one crop anywhere for the whole batch)")
    logit_scale: float = setting(3.0, "the encoder's output conv starts this many times openai's init, so "
                                      "that codes beat the gumbel noise from the start")
    codebook_scale: float = setting(5.0, "the decoder's codebook conv likewise: one-hot inputs look alike at first")
    # stage 1b, the decoder on the codes the prior will hand it (not in the paper)
    decoder_steps: int = setting(1500, "updates of the decoder alone on the frozen encoder's argmax codes")
    decoder_batch: int = setting(16, "images per decoder update")
    decoder_lr: float = setting(1e-3, "lr of the decoder updates, held")
    # stage 2, the transformer prior (Sec 2.2, App. B.2)
    prior_steps: int = setting(3300, "updates (paper: about 430k)")
    prior_batch: int = setting(32, "captions per update (paper: 1024)")
    prior_lr: float = setting(4e-3, "peak lr (paper: 4.5e-4)")
    prior_warmup: float = setting(0.05, "share of the updates that warm the lr up (paper: 5k updates)")
    prior_lr_end: float = setting(0.05, "the cosine decays the lr to this share of its peak (paper: on plateaus)")
    weight_decay: float = setting(4.5e-2, "the prior's AdamW weight decay (paper: 4.5e-2)")
    grad_clip: float = setting(4.0, "gradient norm clip (paper: 4)")
    bpe_dropout: float = setting(0.1, "BPE dropout of training captions (paper: 0.1, Sec 2.2 fn. 5)")
    pair_weight: int = setting(2, "two-object scenes are drawn this many times as often as single objects "
                                  "(paper: the data as it comes): pairs are what the prior learns last")
    place_phrase: float = setting(0.9, "share of the prior's and CLIP's one-object captions that say where the object "
                                       "is (the report's: half): named, a place is learnt from its words, not from "
                                       "which object it is")
    null_caption: float = setting(0.0, "share of captions left empty, for guidance against the empty caption "
                                       "(not in the paper)")
    # stage 3, CLIP (Sec 2.6)
    clip_steps: int = setting(1200, "updates")
    clip_batch: int = setting(56, "(caption, image) pairs per update, each scene with its twin and broken copy: "
                                  "more updates of fewer pairs teach more in the same time")
    clip_lr: float = setting(4e-3, "peak lr")
    clip_lr_end: float = setting(0.05, "the cosine decays the lr to this share of its peak")
    clip_weight_decay: float = setting(0.1, "CLIP's AdamW weight decay")
    clip_warmup: float = setting(0.1, "share of the updates that warm the lr up: without it CLIP can sit at chance")
    clip_recon_share: float = setting(0.25, "share of the pool that CLIP sees as dVAE reconstructions (half of "
                                            "each batch), as it will rank decoded samples")
    clip_swaps: bool = setting(True, "each two-object scene brings its swapped twin as a hard negative (NegCLIP's)")
    clip_moves: bool = setting(True, "each one-object scene whose caption names its place brings a twin: the same "
                                     "object where that place does not hold, so that CLIP reads the place words")
    clip_broken: float = setting(1.0, "share of a batch's scenes that bring a broken copy as a hard negative: some "
                                      "cells of one object drawn as another shape or colour, which no caption "
                                      "describes (not in the paper; 0: none, each update about a third cheaper)")
    # sampling, in the report and in sample.py (Sec 2.6: temperature 1, no guidance)
    guidance: float = setting(2.0, "classifier-free guidance towards the caption's position phrase: the caption "
                                   "without it is the unconditional (1: the paper's sampling)")
    # the report
    eval_prompts: int = setting(96, "report prompts per group: one prompt moves a figure by about a point")
    candidates: int = setting(8, "candidates per report prompt, reranked by CLIP (paper: 512)")
    curve_prompts: int = setting(16, "prompts per group for the reranking curve, 32 candidates each (Fig. 9c; "
                                     "0: no curve)")

# -----------------------------------------------------------------------------
# The recipe's parts: the optimiser, the learning-rate schedule, each update's random stream, the dVAE's terms


def adamw(module, lr, betas, weight_decay, device):
    """AdamW that decays the weight matrices only, not biases, gains or CLIP's temperature (nanoGPT's rule); fused
    where torch has the kernel (one op for all the parameters instead of a dozen each)."""
    params = [p for p in module.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-8, fused=device.type in ("cpu", "cuda"))


def learning_rate(step, steps, peak, end=1.0, warmup=0.0):
    """The one schedule of every stage: a linear warm-up over the first `warmup` share of the updates, then a
    cosine from peak down to end * peak (end = 1: held)."""
    warm = max(1, round(steps * warmup))
    return peak * min(1.0, (step + 1) / warm) * cosine(step, steps, 1.0, end)


def set_lr(opt, lr):
    for group in opt.param_groups:
        group["lr"] = lr


def step_rng(seed, stage, step):
    """The random stream of one update (its scenes, crop, captions, BPE dropout): the same again on --resume, and
    each process's own under torchrun."""
    return random.Random(f"{stage} {seed} {step}" + (f" rank {RANK}" if RANK else ""))


RANK, WORLD = 0, 1  # this process's rank and the number of processes: torchrun sets them (README: torchrun)


def distributed(device):
    """Join torchrun's process group when there are several processes (gloo on CPU, nccl on CUDA) -> the device
    this process trains on. Each process draws its own batches; DistributedDataParallel averages the gradients."""
    global RANK, WORLD
    RANK, WORLD = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if WORLD > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def ddp(module, device):
    """The module whose forward a stage calls: wrapped so that backward averages its gradients over the processes."""
    if WORLD == 1:
        return module
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                   broadcast_buffers=False)  # the buffers (attention masks) never change


def random_crop(rng, images, codes, crop, cell, on_object):
    """A random crop of whole cells, crop pixels wide, from images (B, 3, H, W) in [0, 1] and, if given, their codes
    (B, h, w). on_object: each image its own crop, around a cell it draws on (one at random), as a crop of black cells
    teaches nothing; else one crop, anywhere, for the whole batch."""
    n = crop // cell  # cells along a side
    if not on_object:
        r, c = (rng.randrange((images.shape[2] - crop) // cell + 1) for _ in range(2))
        images = images[:, :, r * cell:r * cell + crop, c * cell:c * cell + crop]  # (B, 3, crop, crop)
        return images, None if codes is None else codes[:, r:r + n, c:c + n]
    drawn = ~blank_cells(images, cell)  # (B, h, w)
    h, w = drawn.shape[1:]
    corners = []  # each crop's top-left cell: a window of n x n cells inside the grid that holds the chosen cell
    for cells in drawn:
        y, x = rng.choice(cells.nonzero().tolist() or [[rng.randrange(h), rng.randrange(w)]])
        corners.append((rng.randrange(max(0, y - n + 1), min(y, h - n) + 1),
                        rng.randrange(max(0, x - n + 1), min(x, w - n) + 1)))
    images = torch.stack([im[:, r * cell:(r + n) * cell, c * cell:(c + n) * cell]
                          for im, (r, c) in zip(images, corners)])  # (B, 3, crop, crop)
    if codes is not None:
        codes = torch.stack([cd[r:r + n, c:c + n] for cd, (r, c) in zip(codes, corners)])  # (B, n, n)
    return images, codes


def squared_error(x, mu, ln_b):
    """The recipe's reconstruction term: (sigmoid(mu) - x)^2 per subpixel of the mapped pixels x; ln_b unused."""
    return (torch.sigmoid(mu) - x) ** 2


def pixel_mse(images, mu):
    """The progress lines' mse: the reconstruction unmap(sigmoid(mu)) against the pixels in [0, 1], as the report's."""
    return ((unmap_pixels(torch.sigmoid(mu.detach())) - images) ** 2).mean().item()


def recon_term(cfg):
    """The reconstruction term DiscreteVAE.forward uses: App. A.3's logit-Laplace NLL, or the squared error."""
    # DEVIATION: with the NLL every short run collapsed to a few codes (README: Deviations, the dVAE loss)
    return logit_laplace_nll if cfg.dvae_recon == "logit-laplace" else squared_error


def choose_blank_code(vae, images):
    """The code the encoder gives most often to the blank cells of images, or -1 if they have none."""
    # DEVIATION: a blank cell carries nothing, so its argmax is arbitrary; one code for all of them (README)
    blank = blank_cells(images, vae.config.cell_size)  # (B, h, w)
    return int(vae.encode(images)[blank].mode().values) if blank.any() else -1


class Data:
    """What the stages train on: uint8 images (n, 3, H, W), rendered or read once, and an item per image that says
    what it shows. A caption is drawn afresh from the item at each use (the paper's images have several). This base
    class serves a folder of pictures (an item is the list of an image's captions); the Shapes world's subclass,
    below the double ruler, adds what its scenes allow: pairs drawn more often, CLIP's swapped and moved twins."""

    picture_prompts = []  # captions to draw as the prior trains (train_prior's sample_every)
    guide_phrases = []  # what guidance pulls towards (DALLE.generate); none: the caption, against the empty one

    def __init__(self, items, images):
        self.items, self.images = items, images

    def caption(self, item, rng, say_place=0.5):  # say_place: the Shapes world's share of captions naming a place
        return rng.choice(item)

    def weight(self, item, cfg):  # how many times the prior's draws hold this item
        return 1

    def twin(self, item, rng, moves):  # a hard negative for CLIP: an item whose captions (naming the place, with
        return None                     # moves) do not describe this one, or None

    def broken(self, item, image, rng):  # a hard negative for CLIP: the item's uint8 image (3, H, W) changed so
        return None                      # that no caption describes it, or None

    def corpus(self, rng):  # the text the BPE is trained on
        return "\n".join(c for item in self.items for c in item)

    def judge(self, prompts, images):  # which pictures (P, N, 3, H, W) show their prompt, (P, N) bools, if known
        return None


def clip_batch(data, recon_u8, cfg, rng):
    """One CLIP batch -> (B' captions, uint8 images (B' + n, 3, H, W)): half dVAE reconstructions (of the first
    len(recon_u8) images), half the images themselves, all distinct, with clip_swaps each item's twin, and last n
    broken images that no caption describes (clip_broken)."""
    n_rec = len(recon_u8)
    half = min(cfg.clip_batch // 2, n_rec)
    idx = rng.sample(range(n_rec), half) + rng.sample(range(n_rec, len(data.items)),
                                                      min(cfg.clip_batch - half, len(data.items) - n_rec))
    items = [data.items[i] for i in idx]
    images = torch.cat([recon_u8[idx[:half]], data.images[idx[half:]]])  # (B, 3, H, W) uint8
    # the share of one-object captions that name the place; with clip_moves, drawn here: those scenes get moved twins
    say = [float(rng.random() < cfg.place_phrase) if cfg.clip_moves else cfg.place_phrase for _ in items]
    if cfg.clip_swaps:
        # DEVIATION: NegCLIP's hard negatives (Yuksekgonul et al. 2022), not the paper's CLIP: captions that differ
        # only in binding, relation or place meet in one batch (README: Deviations)
        twins = [t for t in (data.twin(item, rng, cfg.clip_moves and p == 1) for item, p in zip(items, say))
                 if t is not None]
        if twins:  # a moved scene's twin differs from it in the place alone: its caption names it too
            items, say = items + twins, say + [1.0] * len(twins)
            images = torch.cat([images, data.render(twins)])  # (B', 3, H, W), B' = B + twins
    # DEVIATION: broken objects as hard negatives, not the paper's CLIP: it picked objects the prior drew from the
    # cells of two shapes or colours over whole ones (README: Deviations)
    n = round(cfg.clip_broken * cfg.clip_batch)
    negatives = [b for b in (data.broken(item, data.images[i], rng) for item, i in zip(items[:n], idx))
                 if b is not None]
    if negatives:
        images = torch.cat([images, torch.stack(negatives)])  # (B' + n, 3, H, W): the last n match no caption
    return [data.caption(item, rng, p) for item, p in zip(items, say)], images


def check_finite(loss, stage, step):
    if not torch.isfinite(loss):
        raise FloatingPointError(f"{stage} loss became {loss.item()} at step {step}; the last checkpoint is kept. "
                                 f"Try a lower learning rate or another --seed.")


def log(stage, step, steps, losses, knobs, rate, eta_s):
    if RANK == 0:  # one process speaks for all
        print(f"{stage:<7} {step + 1:5d}/{steps} | {losses} | {knobs} | {rate} | eta {fmt_time(eta_s)}", flush=True)

# -----------------------------------------------------------------------------
# The stages


def train_dvae(model, data, cfg, device, state):
    """Stage 1 (Sec 2.1, App. A.2): the gumbel-softmax relaxation, tau 1 -> 1/16, the KL weight ramped up to beta."""
    vae, steps, K = model.vae, cfg.dvae_steps, model.config.image_vocab_size
    opt = adamw(vae, cfg.dvae_lr, (0.9, 0.999), 1e-4, device)  # App. A.2
    if state.get("opt"):
        opt.load_state_dict(state["opt"])
    gen = torch.Generator(device=device).manual_seed(cfg.seed + RANK)  # the gumbel noise
    fixed = to_float(data.images[:64], device)  # (64, 3, H, W): codes in use are counted here, a batch is too small
    forward = ddp(vae, device)
    t0, start = time.time(), state.get("step", 0)
    for step in range(start, steps):
        rng = step_rng(cfg.seed, "dvae", step)
        images = to_float(data.images[rng.sample(range(len(data.images)), cfg.dvae_batch)], device)  # (B, 3, H, W)
        # DEVIATION: a random crop of whole cells, around a drawn one: the nets are convolutional (README)
        if cfg.dvae_crop:
            images, _ = random_crop(rng, images, None, cfg.dvae_crop, model.config.cell_size, cfg.crop_on_object)
        set_lr(opt, learning_rate(step, steps, cfg.dvae_lr, cfg.dvae_lr_end))
        tau, beta = gumbel_temperature(step, steps * cfg.tau_anneal), kl_weight(step, steps * cfg.beta_ramp, cfg.beta)
        loss, parts = forward(images.contiguous(memory_format=torch.channels_last), tau, beta, gen, recon_term(cfg))
        check_finite(loss, "dvae", step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        mse = pixel_mse(images, parts["mu"])
        state["history"]["dvae"].append([step, loss.item(), mse])
        if RANK == 0 and (step % cfg.log_every == 0 or step == steps - 1):
            with torch.no_grad():
                used = vae.encode(fixed).unique().numel()
            rate = (step + 1 - start) * cfg.dvae_batch / (time.time() - t0)
            log("dvae", step, steps, f"loss {loss.item():7.4f} mse {mse:.4f} kl {parts['kl'].item():5.2f}",
                f"tau {tau:.3f} beta {beta:.2f} | codes {used:3d}/{K}", f"{rate:6.0f} img/s",
                (steps - step - 1) * cfg.dvae_batch / rate)
        state.update(step=step + 1, opt=opt.state_dict())
    # the encoder is frozen from here on: the codes of blank cells are one code from now on (README: Deviations)
    state.update(stage="decoder", step=0, opt=None, blank_code=choose_blank_code(vae, fixed))


def train_decoder(model, data, codes, cfg, device, state):
    """Stage 1b (not in the paper): the decoder alone learns to draw the frozen encoder's argmax codes of the pool,
    the prior's tokens, on random crops: it learnt from gumbel samples of a q that the KL term keeps spread, and draws
    argmax codes badly until it has seen them."""
    # DEVIATION: the decoder phase (README: Deviations)
    vae, steps, cell = model.vae, cfg.decoder_steps, model.config.cell_size
    opt = adamw(vae.decoder, cfg.decoder_lr, (0.9, 0.999), 1e-4, device)
    if state.get("opt"):
        opt.load_state_dict(state["opt"])
    decoder = ddp(vae.decoder, device)  # vae.decode_soft, made of the decoder's forward
    t0, start = time.time(), state.get("step", 0)
    for step in range(start, steps):
        rng = step_rng(cfg.seed, "decoder", step)
        idx = rng.sample(range(len(codes)), cfg.decoder_batch)
        images, batch = to_float(data.images[idx], device), codes[idx].to(device)  # (B, 3, H, W), (B, h, w)
        if cfg.dvae_crop:
            images, batch = random_crop(rng, images, batch, cfg.dvae_crop, cell, cfg.crop_on_object)
        one_hot = F.one_hot(batch, vae.config.image_vocab_size).permute(0, 3, 1, 2).float()  # (B, K, h', w')
        stats = decoder(one_hot.contiguous(memory_format=torch.channels_last))  # (B, 6, H', W')
        mu, ln_b = stats[:, :3], stats[:, 3:]  # (B, 3, H', W') each, as vae.decode_soft
        loss = recon_term(cfg)(map_pixels(images), mu, ln_b).mean()
        check_finite(loss, "decoder", step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        mse = pixel_mse(images, mu)
        state["history"]["decoder"].append([step, loss.item(), mse])
        if step % cfg.log_every == 0 or step == steps - 1:
            rate = (step + 1 - start) * cfg.decoder_batch / (time.time() - t0)
            log("decoder", step, steps, f"loss {loss.item():7.4f} mse {mse:.4f}", f"lr {cfg.decoder_lr:.2e}",
                f"{rate:6.0f} img/s", (steps - step - 1) * cfg.decoder_batch / rate)
        state.update(step=step + 1, opt=opt.state_dict())
    state.update(stage="prior", step=0, opt=None)


def train_prior(model, data, codes, cfg, device, state, out_dir):
    """Stage 2 (Sec 2.2, App. B.2): cross-entropy, 1/8 text + 7/8 image, BPE dropout, AdamW (0.9, 0.96)."""
    prior, steps = model.transformer, cfg.prior_steps
    opt = adamw(prior, cfg.prior_lr, (0.9, 0.96), cfg.weight_decay, device)  # App. B.2
    if state.get("opt"):
        opt.load_state_dict(state["opt"])
    forward, codes = ddp(prior, device), codes.flatten(1)  # codes (n, T_img)
    draws = [i for i, item in enumerate(data.items) for _ in range(data.weight(item, cfg))]
    tokens = cfg.prior_batch * prior.config.block_size
    t0, start = time.time(), state.get("step", 0)
    for step in range(start, steps):
        # DEVIATION: warm-up, then a cosine (paper: 5,000 updates of warm-up, then decay on plateaus)
        lr = learning_rate(step, steps, cfg.prior_lr, cfg.prior_lr_end, cfg.prior_warmup)
        set_lr(opt, lr)
        rng = step_rng(cfg.seed, "prior", step)
        idx = rng.sample(draws, cfg.prior_batch)
        # DEVIATION: for guidance against the empty caption (not in the paper), a share of captions left empty
        # DEVIATION: most one-object captions name the place (paper: captions as they come; README: Deviations)
        captions = ["" if rng.random() < cfg.null_caption else data.caption(data.items[i], rng, cfg.place_phrase)
                    for i in idx]
        text = model.tokenize(captions, dropout=cfg.bpe_dropout, rng=rng)  # (B, T_txt); Sec 2.2 fn. 5
        _, losses = forward(text, codes[idx].to(device))
        check_finite(losses["loss"], "prior", step)
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(prior.parameters(), cfg.grad_clip)  # App. B.2
        opt.step()
        state["history"]["prior"].append([step, losses["text"].item(), losses["image"].item()])
        if step % cfg.log_every == 0 or step == steps - 1:
            rate = (step + 1 - start) * tokens / (time.time() - t0)
            log("prior", step, steps, f"loss {losses['loss'].item():6.3f} text {losses['text'].item():6.3f} "
                f"image {losses['image'].item():6.3f}", f"lr {lr:.2e}", f"{rate:6.0f} tok/s",
                (steps - step - 1) * tokens / rate)
        if cfg.sample_every and step and step % cfg.sample_every == 0 and RANK == 0 and data.picture_prompts:
            write_samples(model, data, os.path.join(out_dir, f"samples_{step:05d}.png"), cfg.guidance)
        state.update(step=step + 1, opt=opt.state_dict())
    state.update(stage="clip", step=0, opt=None)


def train_clip(model, data, codes, cfg, device, state):
    """Stage 3 (Sec 2.6): CLIP's symmetric contrastive loss over (caption, image) pairs, for reranking."""
    clip, steps = model.clip, cfg.clip_steps
    opt = adamw(clip, cfg.clip_lr, (0.9, 0.999), cfg.clip_weight_decay, device)
    if state.get("opt"):
        opt.load_state_dict(state["opt"])
    clip.visual.to(memory_format=torch.channels_last)  # faster convolutions on CPUs
    forward = ddp(clip, device)
    # CLIP will rank decoded samples, so it sees the dVAE's reconstructions of part of the pool, decoded once
    recon_u8 = to_u8(model.vae.decode(codes[:round(len(codes) * cfg.clip_recon_share)].to(device)))  # (n, 3, H, W)
    t0, start = time.time(), state.get("step", 0)
    for step in range(start, steps):
        set_lr(opt, learning_rate(step, steps, cfg.clip_lr, cfg.clip_lr_end, cfg.clip_warmup))
        rng = step_rng(cfg.seed, "clip", step)
        captions, images = clip_batch(data, recon_u8, cfg, rng)
        text = model.tokenize(captions)  # (B', T_txt)
        loss = forward(text, to_float(images, device).contiguous(memory_format=torch.channels_last))
        check_finite(loss, "clip", step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        state["history"]["clip"].append([step, loss.item()])
        if step % cfg.log_every == 0 or step == steps - 1:
            rate = (step + 1 - start) * cfg.clip_batch / (time.time() - t0)
            log("clip", step, steps, f"loss {loss.item():6.3f}", f"temp {1 / clip.logit_scale.exp().item():.4f}",
                f"{rate:6.0f} img/s", (steps - step - 1) * cfg.clip_batch / rate)
        state.update(step=step + 1, opt=opt.state_dict())
    state.update(stage="done", step=0, opt=None)

# -----------------------------------------------------------------------------
# main: the flags, a new model or a checkpoint's, the stages in order, the report


DVAE_FIELDS = ("image_size", "n_hid", "n_blk_per_group", "n_init", "image_vocab_size")


def parse_args(argv=None):
    """The flags: one per TrainConfig field (--dvae-steps for dvae_steps), and what a run needs besides
    -> (TrainConfig, the other arguments). A bad value is one line and exit status 2."""
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default="out", help="where the checkpoint, pictures and report go (default out)")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the first available)")
    p.add_argument("--resume", action="store_true", help="continue from OUT_DIR/dalle.pt (Ctrl-C saves one)")
    p.add_argument("--dvae-from", default=None, metavar="CKPT",
                   help="keep the dVAE (and tokenizer) of this checkpoint; train the prior and CLIP afresh")
    p.add_argument("--data", default=None, metavar="DIR",
                   help="train on a folder of pictures and captions instead of the Shapes world (README: Your own "
                        "pictures)")
    p.add_argument("--holdout", type=int, default=16,
                   help="with --data: pictures kept out of training, for the report's samples (default 16)")
    p.add_argument("--benchmark", action="store_true", help="time a training step and generation, then exit")
    p.add_argument("--config", default="", help="DALLEConfig fields, e.g. n_layer=2,n_embd=64 (default: its own)")
    for f in fields(TrainConfig):
        flag, default, meta = "--" + f.name.replace("_", "-"), f.default, f.metadata
        shown = f"{default:g}" if isinstance(default, float) else default
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=meta["help"])
        else:
            p.add_argument(flag, type=type(default), default=default, choices=meta["choices"],
                           help=f"{meta['help']} (default {shown})")
    args = p.parse_args(argv)
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    for f in fields(TrainConfig):
        value = getattr(cfg, f.name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
            p.error(f"--{f.name.replace('_', '-')} must not be negative, got {value}")
    for name in ("pool", "log_every", "eval_prompts", "candidates", "dvae_batch", "decoder_batch", "prior_batch",
                 "clip_batch"):
        if getattr(cfg, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if cfg.null_caption >= 1 or cfg.pair_weight < 1:
        p.error("need --null-caption below 1 and --pair-weight at least 1")
    if cfg.pool < 4 * max(cfg.dvae_batch, cfg.decoder_batch, cfg.prior_batch, cfg.clip_batch):
        p.error("--pool must hold at least 4 batches of scenes")
    try:  # DALLEConfig fields, each an integer: a typo is one line, not a traceback
        args.config = {k.strip(): int(v) for k, v in (kv.split("=") for kv in args.config.split(",") if kv)}
        config = DALLEConfig(**args.config)
    except (ValueError, TypeError) as e:
        p.error(f"--config takes DALLEConfig fields as name=integer, comma-separated: {brief(e)}")
    if config.image_size != SIZE and not args.data:
        p.error(f"the Shapes world is drawn at {SIZE} px: --config image_size must be {SIZE} (or train on --data)")
    if cfg.dvae_crop % config.cell_size or cfg.dvae_crop > config.image_size:
        p.error(f"--dvae-crop must be whole {config.cell_size}-pixel cells within the {config.image_size}-pixel "
                f"image (0: no crop), got {cfg.dvae_crop}")
    if args.holdout < 0:
        p.error(f"--holdout must not be negative, got {args.holdout}")
    if args.data and not cfg.null_caption:  # guidance towards position phrases is the Shapes world's (README)
        cfg = replace(cfg, guidance=1.0)
    if args.config and args.resume:
        p.error("--config sizes a new model: --resume keeps its checkpoint's")
    if args.dvae_from and set(args.config) & set(DVAE_FIELDS):
        p.error(f"--dvae-from keeps its checkpoint's dVAE: --config may size the prior and CLIP, not "
                f"{', '.join(sorted(set(args.config) & set(DVAE_FIELDS)))}")
    return cfg, args


def build_model(cfg, data, overrides=None):
    """A new model: the BPE trained on the data's captions, openai's dVAE init with the recipe's two scales."""
    config = DALLEConfig(**(overrides or {}))
    tokenizer = BPETokenizer()
    tokenizer.train(data.corpus(random.Random(cfg.seed)), config.text_vocab_size)
    model = DALLE(config, tokenizer)
    model.guide_phrases = list(data.guide_phrases)  # what guidance pulls towards (README: Deviations, guidance)
    # DEVIATION: two init scales on top of openai's init (the paper gives none for training): the encoder's logits
    # must beat the gumbel noise, and the codebook's outputs must tell one-hot codes apart, from the start
    with torch.no_grad():
        model.vae.encoder.output.conv.weight.mul_(cfg.logit_scale)
        model.vae.decoder.input.weight.mul_(cfg.codebook_scale)
    return model


def load_or_exit(path, device, why):
    try:
        return DALLE.load(path, device)
    except CheckpointError as e:
        sys.exit(f"error: {why}: {e}")


def start(cfg, args, data, device):
    """-> (model, state): a new model, the checkpoint to --resume, or a checkpoint's dVAE for --dvae-from."""
    history = {"dvae": [], "decoder": [], "prior": [], "clip": []}  # per-update losses, for the loss curves
    if args.resume:
        path = os.path.join(args.out_dir, "dalle.pt")
        model, ckpt = load_or_exit(path, device, "cannot resume")
        if RANK == 0:
            print(f"resuming {path} at stage {ckpt['stage']}, step {ckpt['step']}")
        return model, {"stage": ckpt["stage"], "step": ckpt["step"], "opt": ckpt.get("opt"),
                       "blank_code": model.blank_code, "history": ckpt.get("history") or history,
                       "seconds": ckpt.get("seconds") or {}}
    if args.dvae_from:
        old, ckpt = load_or_exit(args.dvae_from, device, "cannot take the dVAE")
        if ckpt.get("stage") in ("dvae", "decoder"):
            sys.exit(f"error: the dVAE of {args.dvae_from} is not trained yet: finish it with --resume")
        try:
            model = DALLE(replace(old.config, **args.config), old.tokenizer).to(device)
        except ValueError as e:
            sys.exit(f"error: --config does not fit the tokenizer of {args.dvae_from}: {brief(e)}")
        model.vae, model.blank_code, model.guide_phrases = old.vae, old.blank_code, list(data.guide_phrases)
        history.update({k: (ckpt.get("history") or history)[k] for k in ("dvae", "decoder")})
        print(f"the dVAE and tokenizer of {args.dvae_from}; the prior and CLIP start afresh")
        return model, {"stage": "prior", "step": 0, "blank_code": old.blank_code, "history": history}
    return build_model(cfg, data, args.config).to(device), {"stage": "dvae", "step": 0, "blank_code": -1,
                                                            "history": history}


def timed(state, stage, fn):
    """Run fn, adding its wall time to state["seconds"][stage] (the report's stage times) -> what fn returns."""
    t0 = time.time()
    result = fn()
    seconds = state.setdefault("seconds", {})
    seconds[stage] = seconds.get(stage, 0.0) + time.time() - t0
    return result


def main(argv=None):
    cfg, args = parse_args(argv)
    try:
        device = distributed(pick_device(args.device))  # under torchrun: this process's rank, device and group
    except ValueError as e:
        sys.exit(f"error: {e}")
    if args.benchmark:
        return benchmark(device)
    torch.manual_seed(cfg.seed)
    os.makedirs(args.out_dir, exist_ok=True)
    out = lambda name: os.path.join(args.out_dir, name)  # noqa: E731
    t_start = time.time()
    if args.data:  # your own pictures, with some held out for the report, at the model's image size
        kept = os.path.join(args.out_dir, "dalle.pt") if args.resume else args.dvae_from
        size = (load_or_exit(kept, "cpu", "cannot read its image size")[0].config if kept
                else DALLEConfig(**args.config)).image_size
        try:
            data, held_out = load_folder(args.data, size, args.holdout, cfg)
        except FolderError as e:
            sys.exit(f"error: {e}")
    else:  # the Shapes world, rendered once
        data, held_out = make_pool(cfg.pool, cfg.seed), None
    model, state = start(cfg, args, data, device)
    model.train()
    model.vae.to(memory_format=torch.channels_last)  # faster convolutions on CPUs
    c = model.config
    if RANK == 0:
        print(f"device {device}, {torch.get_num_threads()} threads" + (f", {WORLD} processes" if WORLD > 1 else "")
              + f" | dVAE {n_params(model.vae) / 1e6:.2f}M, transformer {n_params(model.transformer) / 1e6:.2f}M, "
              f"CLIP {n_params(model.clip) / 1e6:.2f}M params | {c.image_size}px -> {c.grid_size}x{c.grid_size} codes "
              f"of K={c.image_vocab_size}, text {c.text_seq_len} tokens (BPE vocab {len(model.tokenizer.vocab)})")

    def save():  # the recipe travels with the weights as plain data: the settings, the losses, the stage times
        model.blank_code = state["blank_code"]
        if RANK == 0:  # every process holds the same weights; one writes them
            model.save(out("dalle.pt"), step=state["step"], stage=state["stage"], opt=state.get("opt"),
                       train=asdict(cfg), history=state["history"], seconds=state.get("seconds", {}))
    try:
        if state["stage"] == "dvae":  # 1. the dVAE on pixels
            timed(state, "dvae", lambda: train_dvae(model, data, cfg, device, state))
            save()
        model.blank_code = state["blank_code"]
        codes = timed(state, "encode", lambda: encode_pool(model, data.images, device))  # (n, h, w): the tokens
        if state["stage"] == "decoder":  # 1b. its decoder on the frozen encoder's codes
            timed(state, "decoder", lambda: train_decoder(model, data, codes, cfg, device, state))
            save()
            if RANK == 0:
                write_recon(model, data, device, out("dvae_recon.png"))
        if state["stage"] == "prior":  # 2. the prior on [caption | codes]
            timed(state, "prior", lambda: train_prior(model, data, codes, cfg, device, state, args.out_dir))
            save()
        if state["stage"] == "clip":  # 3. CLIP on (caption, image) pairs
            timed(state, "clip", lambda: train_clip(model, data, codes, cfg, device, state))
            save()
    except KeyboardInterrupt:
        save()
        if RANK == 0:
            print(f"\ninterrupted: saved {out('dalle.pt')} at stage {state['stage']}, step {state['step']}; "
                  f"continue with the same command and --resume")
        sys.exit(130)
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    if WORLD > 1:
        dist.destroy_process_group()
    if RANK > 0:
        return
    print(f"training done in {fmt_time(time.time() - t_start)}; checkpoint {out('dalle.pt')}")
    if held_out is None:
        write_report(model, cfg, data, codes, device, state, out, t_start)
    else:
        write_folder_report(model, cfg, data, held_out, codes, device, state, out, t_start)


# =============================================================================
# Below: the data. First your own pictures (--data DIR), then the Shapes world, its checker, the report and its
# pictures. Nothing above depends on how they work, only on a Data to draw from and a report to write.

# -----------------------------------------------------------------------------
# Your own pictures: a folder of images and their captions (README: Your own pictures)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


class FolderError(Exception):
    pass


def read_captions(folder, names):
    """-> {image file name: [captions]}: from captions.tsv (file<TAB>caption lines) if the folder has one, else from
    each image's x.txt beside it (one caption a line). A caption for an image that is not there is an error."""
    captions = {}
    tsv = os.path.join(folder, "captions.tsv")
    if os.path.isfile(tsv):
        with open(tsv, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    name, tab, text = line.rstrip("\n").partition("\t")
                    if not tab or not text.strip():
                        raise FolderError(f"{tsv} line {number} is not file<TAB>caption: {line.strip()[:60]!r}")
                    if name not in names:
                        raise FolderError(f"{tsv} line {number} names {name}, which is not an image in {folder}")
                    captions.setdefault(name, []).append(text.strip())
        return captions
    for txt in sorted(f for f in os.listdir(folder) if f.endswith(".txt")):
        stem = txt[:-4]
        image = next((stem + ext for ext in IMAGE_EXTENSIONS if stem + ext in names), None)
        if image is None:
            raise FolderError(f"{os.path.join(folder, txt)} has no image beside it ({stem}.png or {stem}.jpg)")
        with open(os.path.join(folder, txt), encoding="utf-8") as f:
            lines = [line.strip() for line in f if line.strip()]
        if lines:
            captions[image] = lines
    return captions


def read_image(path, size):
    """An image file -> uint8 (3, size, size): the centred square crop, resized; None if it cannot be read."""
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            side = min(img.size)
            left, top = (img.width - side) // 2, (img.height - side) // 2
            img = img.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
            return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)  # (3, size, size)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def load_folder(folder, size, holdout, cfg):
    """A folder of pictures and captions -> (Data to train on, Data held out for the report: `holdout` pictures
    drawn by the seed). Bad folders raise FolderError with one line; unreadable images are skipped with a warning."""
    if not os.path.isdir(folder):
        raise FolderError(f"--data {folder} is not a folder")
    names = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
    if not names:
        raise FolderError(f"{folder} holds no images (.png, .jpg): nothing to train on")
    captions = read_captions(folder, set(names))
    if not captions:
        raise FolderError(f"{folder} has {len(names)} images but no captions: put each image's in x.txt beside "
                          f"x.png, or all of them in captions.tsv (file<TAB>caption)")
    items, images, skipped = [], [], 0
    for name in sorted(captions):
        image = read_image(os.path.join(folder, name), size)
        if image is None:
            print(f"warning: cannot read {os.path.join(folder, name)}: skipped", file=sys.stderr)
            skipped += 1
            continue
        items.append(captions[name])
        images.append(image)
    if skipped and RANK == 0:
        print(f"warning: skipped {skipped} unreadable image{'s' * (skipped > 1)} of {len(captions)}", file=sys.stderr)
    uncaptioned = len(names) - len(captions)
    if uncaptioned and RANK == 0:
        print(f"note: {uncaptioned} images of {folder} have no caption and are not used", file=sys.stderr)
    order = list(range(len(items)))
    random.Random(cfg.seed).shuffle(order)  # the held-out pictures, and the ones CLIP sees as reconstructions
    keep, held = order[holdout:], order[:holdout]
    need = max(cfg.dvae_batch, cfg.decoder_batch, cfg.prior_batch)
    if len(keep) < need:
        raise FolderError(f"{folder} has {len(keep)} pictures to train on ({holdout} held out), fewer than a batch "
                          f"({need}): add pictures, or lower --holdout and the --*-batch settings")
    data = Data([items[i] for i in keep], torch.stack([images[i] for i in keep]))
    held_out = Data([items[i] for i in held], torch.stack([images[i] for i in held]) if held else None)
    data.picture_prompts = [item[0] for item in held_out.items[:4]]
    return data, held_out


@torch.no_grad()
def write_folder_report(model, cfg, data, held_out, codes, device, state, out, t_start):
    """What needs no checker: the dVAE's reconstruction error and codebook usage, the prior's losses on the
    held-out pictures, and their captions drawn beside the real pictures (holdout.png)."""
    t_report, c = time.time(), model.config
    model.eval()
    test = held_out if held_out.items else Data(data.items[:16], data.images[:16])
    images = to_float(test.images, device)  # (n, 3, H, W)
    test_codes = model.image_codes(images)  # (n, h, w)
    recon = model.vae.decode(test_codes)  # (n, 3, H, W)
    used = codes.unique().numel()
    which = "held-out" if held_out.items else "training"
    lines = [f"dVAE: reconstruction MSE {((recon - images) ** 2).mean().item():.5f} on {len(images)} {which} "
             f"pictures (pixels in [0, 1]); codebook usage {used}/{c.image_vocab_size} codes on the training pictures"]
    text = model.tokenize([item[0] for item in test.items])  # (n, T_txt)
    _, losses = model.transformer(text, test_codes.flatten(1))
    lines.append(f"transformer loss on the {which} pictures' first captions: {losses['text'].item():.3f} nats per "
                 f"text token, {losses['image'].item():.3f} nats per image token (ln K = "
                 f"{math.log(c.image_vocab_size):.2f})")
    rows = []
    for i, item in enumerate(test.items[:8]):
        samples, scores, _ = model.generate([item[0]], n=cfg.candidates, keep=min(4, cfg.candidates), seed=cfg.seed,
                                            guidance=cfg.guidance)
        pictures = torch.cat([images[i:i + 1], recon[i:i + 1], samples[0]])  # (2 + keep, 3, H, W)
        rows.append((f'"{item[0]}"', pictures, ["real", "dVAE"] + [f"{s:.3f}" for s in scores[0].tolist()]))
    labelled_rows(rows).save(out("holdout.png"))
    lines.append(f"holdout.png: {len(rows)} {which} captions, each: the real picture, its dVAE reconstruction, then "
                 f"CLIP's best of {cfg.candidates} samples")
    draw_losses(state["history"], out("loss_curves.png"))
    lines += time_lines(cfg, state, time.time() - t_report, time.time() - t_start, device)
    with open(out("report.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("report\n  " + "\n  ".join(lines))



# -----------------------------------------------------------------------------
# The Shapes world (README: The Shapes world): 64x64, black background, 8 colours, 4 shapes, 2 sizes, positions and relations

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


def broken(objects, rng, image=None):
    """A hard negative for CLIP: the scene with one object broken, 1 to half of the 8x8 cells where it differs from
    the same object of another shape or colour (never a held-out kind; 6 pixels or more of the 64) taken from that
    one -> uint8 (64, 64, 3), or None when fewer than 2 cells differ. image: the scene's render, if at hand."""
    k = rng.randrange(len(objects))
    o = objects[k]
    kinds = [(c, s) for c in COLOURS for s in SHAPES if (c == o.colour) != (s == o.shape) and (c, s) not in HELD_OUT]
    colour, shape = rng.choice(kinds)
    image = (render(objects) if image is None else image).copy()
    other = render(objects[:k] + [replace(o, colour=colour, shape=shape)] + objects[k + 1:])
    differs = other != image  # (64, 64, 3)
    differs = differs[..., 0] | differs[..., 1] | differs[..., 2]  # (64, 64): cheaper than .any(-1)
    c, n = LATTICE, SIZE // LATTICE
    per_cell = differs.reshape(n, c, n, c).swapaxes(1, 2).reshape(n, n, c * c).sum(-1)  # (8, 8): per cell
    cells = [(c * y, c * x) for y, x in zip(*np.nonzero(per_cell >= 6))]  # row by row, as the cells are read
    if len(cells) < 2:
        return None
    for y, x in rng.sample(cells, rng.randint(1, len(cells) // 2)):
        image[y:y + c, x:x + c] = other[y:y + c, x:x + c]
    return image


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


class ShapesData(Data):
    """The Shapes world's training pool: an item is a scene (objects, relation)."""
    picture_prompts = PICTURE_PROMPTS
    guide_phrases = POSITIONS

    def caption(self, item, rng, say_place=0.5):
        return caption(*item, rng, say_place=say_place)

    def weight(self, item, cfg):
        # DEVIATION: two-object scenes drawn pair_weight times as often as single objects (README: Deviations)
        return cfg.pair_weight if item[1] else 1

    def twin(self, item, rng, moves):
        if item[1] is not None:
            return swapped(*item, rng)
        return moved(item[0][0], rng) if moves else None

    def broken(self, item, image, rng):
        image = broken(item[0], rng, image.permute(1, 2, 0).numpy())
        return None if image is None else torch.from_numpy(image).permute(2, 0, 1)  # (3, H, W) uint8

    def render(self, items):
        return render_all([objects for objects, _ in items])

    def corpus(self, rng):
        return "\n".join(caption(*item, rng) for item in self.items[:5000])

    def judge(self, prompts, images):
        return judge_all(prompts, images)["all"]


def make_pool(n, seed):
    """n training scenes, rendered once -> ShapesData (its images (n, 3, 64, 64) uint8)."""
    rng = random.Random(seed)
    scenes = [random_scene(rng) for _ in range(n)]
    return ShapesData(scenes, render_all([objs for objs, _ in scenes]).contiguous())


def to_float(images_u8, device):
    return images_u8.to(device).float() / 255  # (B, 3, H, W) in [0, 1]


def to_u8(images):
    return (images * 255).round().byte().cpu()  # images in [0, 1] -> uint8 on the CPU, same shape


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


def fmt_time(s):
    return f"{int(s // 60)}m{int(s % 60):02d}s"

# -----------------------------------------------------------------------------
# The report: what the samples show, read back by the checker, and the pictures of the README


@torch.no_grad()
def encode_pool(model, images_u8, device, batch=16):  # on 2 CPU threads, 16 at a time runs fastest
    """uint8 images (n, 3, H, W) -> the codes the prior learns (n, h, w), on the CPU."""
    return torch.cat([model.image_codes(to_float(images_u8[i:i + batch], device).contiguous(
        memory_format=torch.channels_last)).cpu() for i in range(0, len(images_u8), batch)])  # (n, h, w)


@torch.no_grad()
def write_samples(model, data, path, guidance, n=8, keep=4):
    """The best `keep` of n candidates for each of the data's picture prompts, a row each under its prompt, with
    CLIP's score and, where the data has a checker, its verdict under each picture."""
    model.eval()
    prompts = data.picture_prompts
    images, scores, _ = model.generate(prompts, n=n, keep=keep, seed=0, guidance=guidance)  # (P, keep, 3, H, W)
    right = data.judge(prompts, images)  # (P, keep) or None
    verdict = lambda p, k: "" if right is None else " right" if right[p, k] else " wrong"  # noqa: E731
    labelled_rows([(f'"{prompt}"', pictures, [f"{s:.3f}{verdict(p, k)}" for k, s in enumerate(row)])
                   for p, (prompt, pictures, row) in enumerate(zip(prompts, images, scores.tolist()))],
                  scale=3).save(path)
    model.train()


@torch.no_grad()
def write_recon(model, data, device, path, n=8):
    model.eval()
    images = to_float(data.images[:n], device)
    image_grid(torch.stack([images, model.vae.decode(model.image_codes(images))])).save(path)  # renders over recons
    model.train()


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
        images, scores, _ = model.generate(prompts, n=N, keep=N, seed=cfg.seed, guidance=cfg.guidance)  # best 1st
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
        images, _, _ = model.generate(prompts[:cfg.curve_prompts], n=max(ns), keep=max(ns), seed=cfg.seed + 1,
                                   guidance=cfg.guidance)
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


# -----------------------------------------------------------------------------
# Speed: the reference config of issue #2 against DALLE-pytorch (README: Speed)


def benchmark(device):
    """Speed at the reference config of issue #2 (lucidrains/DALLE-pytorch's figures were taken at it):
    64 px, 8x8 codes, K 512, text 32 tokens of a 1024 vocab, n_embd 256, 4 layers, 8 heads, batch 32."""
    c = DALLEConfig(text_seq_len=32, text_vocab_size=1024, n_embd=256, n_head=8, n_layer=4)
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



def time_lines(cfg, state, report_s, total_s, device):
    """Where the run's time went: each stage's wall time and its updates per second (stages of this process and of
    the runs it resumed), the report's, and the whole run's."""
    steps = {"dvae": cfg.dvae_steps, "decoder": cfg.decoder_steps, "prior": cfg.prior_steps, "clip": cfg.clip_steps}
    parts = []
    for stage, seconds in (state.get("seconds") or {}).items():
        rate = f", {steps[stage]} updates, {steps[stage] / seconds:.1f}/s" if steps.get(stage) and seconds else ""
        parts.append(f"{stage} {fmt_time(seconds)}{rate}")
    return [f"time on {device} ({torch.get_num_threads()} threads): " + " | ".join(parts) + f" | report "
            f"{fmt_time(report_s)}", f"total time {fmt_time(total_s)}"]


def write_report(model, cfg, data, codes, device, state, out, t_start):
    """The report (report.txt) and its pictures, all into the output folder."""
    t_report = time.time()
    write_samples(model, data, out("final.png"), cfg.guidance)
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
    lines += time_lines(cfg, state, time.time() - t_report, time.time() - t_start, device)
    labelled_rows(recon_rows).save(out("recon_by_group.png"))
    labelled_rows(sample_rows).save(out("samples_by_group.png"))
    draw_losses(state["history"], out("loss_curves.png"))
    draw_masks().save(out("masks.png"))  # Fig. 11's three masks on a 4x4 grid, the kernel 3x3
    with open(out("report.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("report\n  " + "\n  ".join(lines))


if __name__ == "__main__":
    main()
