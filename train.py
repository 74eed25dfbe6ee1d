"""
Train DALL-E's three stages on the Shapes world (shapes.py), in paper order, on a laptop CPU:
  1. the dVAE on pixels (Sec 2.1), and then its decoder alone on the argmax codes the prior will hand it,
  2. the transformer prior on the frozen dVAE's codes (Sec 2.2),
  3. CLIP, for reranking the prior's samples (Sec 2.6),
then the report: how often the samples show what their captions say (shapes.report).

    python train.py                          # the default run: out/dalle.pt and out/report.txt
    python train.py --resume                 # continue a stopped run (Ctrl-C saves one): the same run
    python train.py --dvae-from out/dalle.pt --out-dir out/ex   # keep that dVAE, train the prior and CLIP again
    python train.py --data DIR               # your own pictures and captions instead of the Shapes world

Read it top-down: the settings (TrainConfig, every one a flag), the recipe's parts, the stages, main; below the
double ruler, your own pictures and the benchmark. Importing this file has no side effects.
"""
import argparse
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace

import torch
import torch.nn.functional as F
from torch.utils.benchmark import Timer

import shapes
from dalle import (DALLE, ArgumentParser, BPETokenizer, CheckpointError, DALLEConfig, blank_cells, brief, cosine,
                   gumbel_temperature, kl_weight, labelled_rows, logit_laplace_nll, map_pixels, n_params,
                   pick_device, read_image, to_float, unmap_pixels)

# -----------------------------------------------------------------------------
# The settings, each with its paper value and, where ours differs, why (README: Deviations, Levers).
# DEVIATION: a toy run has thousands of updates, not millions: batches are small and learning rates high.


def setting(default, why, choices=None):
    return field(default=default, metadata={"help": why, "choices": choices})


@dataclass
class TrainConfig:
    seed: int = setting(0, "same seed, same run")
    pool: int = setting(8000, "scenes rendered once for training; their captions are drawn afresh at each use")
    log_every: int = setting(500, "updates between progress lines")
    # stage 1, the dVAE (Sec 2.1, App. A.2)
    dvae_steps: int = setting(2500, "relaxed updates (paper: 3M)")
    dvae_batch: int = setting(16, "images per update (paper: 512): with 8, big squares mix colours (README: Levers)")
    dvae_lr: float = setting(1e-3, "peak lr (paper: 1e-4)")
    dvae_lr_end: float = setting(1 / 80, "the cosine ends at this share of the peak lr (paper: 1e-4 -> 1.25e-6)")
    dvae_recon: str = setting("mse", "reconstruction term: the paper's logit-laplace (App. A.3) collapsed every "
                              "short run to a few codes; mse: (sigmoid(mu) - x)^2", choices=("mse", "logit-laplace"))
    # DEVIATION: no EMA of the dVAE's weights (paper: decay 0.999): a run of thousands has no plateau to smooth
    beta: float = setting(1.0, "KL weight once ramped up (paper: 6.6)")
    beta_ramp: float = setting(0.25, "share of the relaxed updates over which beta ramps up (paper: 5k of 3M)")
    # DEVIATION: tau anneals over all the relaxed updates, not only the paper's first 150k of 3M (README: Deviations)
    tau_anneal: float = setting(1.0, "share of the relaxed updates over which tau anneals 1 -> 1/16 (paper: 150k/3M)")
    dvae_crop: int = setting(32, "updates see a random crop this wide, in whole cells (0: whole images, the paper's)")
    logit_scale: float = setting(3.0, "the encoder's output conv starts at this many times openai's init")
    codebook_scale: float = setting(5.0, "the decoder's codebook conv likewise")
    # stage 1b, the decoder on the codes the prior will hand it (not in the paper)
    decoder_steps: int = setting(1500, "updates of the decoder alone on the frozen encoder's argmax codes")
    decoder_batch: int = setting(16, "images per decoder update")
    decoder_lr: float = setting(1e-3, "lr of the decoder updates, held")
    # stage 2, the transformer prior (Sec 2.2, App. B.2)
    prior_steps: int = setting(3300, "updates (paper: about 430k)")
    prior_batch: int = setting(32, "captions per update (paper: 1024)")
    prior_lr: float = setting(6e-3, "peak lr (paper: 4.5e-4)")
    prior_warmup: float = setting(0.05, "share of the updates that warm the lr up (paper: 5k updates)")
    prior_lr_end: float = setting(0.05, "the cosine ends at this share of the peak lr (paper: decay on plateaus)")
    weight_decay: float = setting(4.5e-2, "the prior's AdamW weight decay (paper: 4.5e-2)")
    grad_clip: float = setting(4.0, "gradient norm clip (paper: 4)")
    bpe_dropout: float = setting(0.1, "BPE dropout of training captions (paper: 0.1, Sec 2.2 fn. 5)")
    place_phrase: float = setting(0.9, "share of one-object training captions that name the place (the report's: half)")
    # stage 3, CLIP (Sec 2.6)
    clip_steps: int = setting(900, "updates")
    clip_batch: int = setting(56, "(caption, image) pairs per update, each scene with its twin, if it has one")
    clip_lr: float = setting(4e-3, "peak lr")
    clip_lr_end: float = setting(0.05, "the cosine ends at this share of the peak lr")
    clip_weight_decay: float = setting(0.1, "CLIP's AdamW weight decay")
    clip_warmup: float = setting(0.1, "share of the updates that warm the lr up: without it CLIP can sit at chance")
    clip_swaps: bool = setting(True, "each two-object scene brings its swapped twin as a hard negative (NegCLIP's)")
    clip_moves: bool = setting(True, "a caption naming a place brings its object moved off it as a hard negative")
    # the report (shapes.report)
    eval_prompts: int = setting(96, "report prompts per group: one prompt moves a figure by about a point")
    candidates: int = setting(8, "candidates per report prompt, reranked by CLIP (paper: 512)")
    curve_prompts: int = setting(16, "prompts per group for the reranking curve, 32 candidates each (Fig. 9c)")

# -----------------------------------------------------------------------------
# The recipe's parts: the optimiser and schedule, each update's random stream, crops, the dVAE's terms


def adamw(module, lr, betas, weight_decay, device, state):
    """AdamW that decays the weight matrices only, not biases, gains or CLIP's temperature (nanoGPT's rule); fused
    where torch has the kernel; with the moments it had where the stage was stopped (state["opt"]), if it was."""
    params = [p for p in module.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-8, fused=device.type in ("cpu", "cuda"))
    if state.get("opt"):
        opt.load_state_dict(state["opt"])
    return opt


def update(opt, loss, state, stage, step, logged, clip=None):
    """One optimiser step on loss, its gradient norm clipped to clip[1] over the parameters clip[0] if given; then
    state moves on (the step, the optimiser, the losses logged for the curves), so a Ctrl-C saves where it stood. A
    loss that is not finite stops the run before the step, so the last checkpoint is kept."""
    if not torch.isfinite(loss):
        raise FloatingPointError(f"{stage} loss became {loss.item()} at step {step}; the last checkpoint is kept. "
                                 f"Try a lower learning rate or another --seed.")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip:
        torch.nn.utils.clip_grad_norm_(*clip)
    opt.step()
    state["history"][stage].append([step] + logged)
    state.update(step=step + 1, opt=opt.state_dict())


def learning_rate(step, steps, peak, end=1.0, warmup=0.0):
    """Every stage's schedule: a linear warm-up over the first `warmup` share of the updates, then a cosine from
    peak down to end * peak (end = 1: held)."""
    warm = max(1, round(steps * warmup))
    return peak * min(1.0, (step + 1) / warm) * cosine(step, steps, 1.0, end)


def set_lr(opt, lr):
    for group in opt.param_groups:
        group["lr"] = lr


def step_rng(seed, stage, step):
    """The random stream of one update (its scenes, crops, captions, noise): the same again on --resume."""
    return random.Random(f"{stage} {seed} {step}")


def random_crop(rng, images, codes, crop, cell):
    """One random crop of whole cells, crop pixels wide, for a batch of images (B, 3, H, W) and, if given, their
    codes (B, h, w)."""
    r, c, n = *(rng.randrange((images.shape[2] - crop) // cell + 1) for _ in range(2)), crop // cell
    images = images[:, :, r * cell:r * cell + crop, c * cell:c * cell + crop]  # (B, 3, crop, crop)
    return images, None if codes is None else codes[:, r:r + n, c:c + n]  # (B, n, n)


def squared_error(x, mu, ln_b):
    """The recipe's reconstruction term: (sigmoid(mu) - x)^2 per subpixel of the mapped pixels x; ln_b unused."""
    return (torch.sigmoid(mu) - x) ** 2


def recon_term(cfg):
    """The reconstruction term DiscreteVAE.forward uses: App. A.3's logit-Laplace NLL, or the squared error."""
    # DEVIATION: with the NLL every short run collapsed to a few codes (README: Deviations, the dVAE loss)
    return logit_laplace_nll if cfg.dvae_recon == "logit-laplace" else squared_error


def pixel_mse(images, mu):
    """The progress lines' mse: the reconstruction unmap(sigmoid(mu)) against the pixels in [0, 1], as the report's."""
    return ((unmap_pixels(torch.sigmoid(mu.detach())) - images) ** 2).mean().item()


def choose_blank_code(vae, images):
    """The code the encoder gives most often to the blank cells of images, or -1 if they have none."""
    # DEVIATION: a blank cell carries nothing, so its argmax is arbitrary; one code for all of them (README)
    blank = blank_cells(images, vae.config.cell_size)  # (B, h, w)
    return int(vae.encode(images)[blank].mode().values) if blank.any() else -1


def fmt_time(s):
    return f"{int(s // 60)}m{int(s % 60):02d}s"


def log(stage, step, steps, t0, start, batch, unit, *parts):
    """A progress line: the update, its parts (losses, knobs), the speed since the stage (re)started, the time left."""
    rate = (step + 1 - start) * batch / (time.time() - t0)  # units (images, tokens) a second
    print(f"{stage:<7} {step + 1:5d}/{steps} | " + " | ".join(parts) + f" | {rate:6.0f} {unit}/s | eta "
          f"{fmt_time((steps - step - 1) * batch / rate)}", flush=True)

# -----------------------------------------------------------------------------
# The stages, each a loop of updates from state["step"] on, so that a stopped run goes on where it stood.


def train_dvae(model, data, cfg, device, state):
    """Stage 1 (Sec 2.1, App. A.2): the gumbel-softmax relaxation, tau 1 -> 1/16, the KL weight ramped up to beta."""
    vae, steps, K = model.vae, cfg.dvae_steps, model.config.image_vocab_size
    opt = adamw(vae, cfg.dvae_lr, (0.9, 0.999), 1e-4, device, state)  # App. A.2
    gen = torch.Generator(device=device)  # the gumbel noise, seeded from each update's stream: the same on --resume
    fixed = to_float(data.images[:64], device)  # (64, 3, H, W): codes in use are counted here, a batch is too small
    t0, start = time.time(), state.get("step", 0)
    for step in range(start, steps):
        rng = step_rng(cfg.seed, "dvae", step)
        gen.manual_seed(rng.randrange(2 ** 62))
        images = to_float(data.images[rng.sample(range(len(data.images)), cfg.dvae_batch)], device)  # (B, 3, H, W)
        # DEVIATION: a random crop of whole cells: the nets are convolutional (README)
        if cfg.dvae_crop:
            images, _ = random_crop(rng, images, None, cfg.dvae_crop, model.config.cell_size)
        set_lr(opt, learning_rate(step, steps, cfg.dvae_lr, cfg.dvae_lr_end))
        tau, beta = gumbel_temperature(step, steps * cfg.tau_anneal), kl_weight(step, steps * cfg.beta_ramp, cfg.beta)
        loss, parts = vae(images.contiguous(memory_format=torch.channels_last), tau, beta, gen, recon_term(cfg))
        mse = pixel_mse(images, parts["mu"])
        update(opt, loss, state, "dvae", step, [loss.item(), mse])
        if step % cfg.log_every == 0 or step == steps - 1:
            with torch.no_grad():
                used = vae.encode(fixed).unique().numel()
            log("dvae", step, steps, t0, start, cfg.dvae_batch, "img", f"loss {loss.item():7.4f} mse {mse:.4f} kl "
                f"{parts['kl'].item():5.2f}", f"tau {tau:.3f} beta {beta:.2f}", f"codes {used:3d}/{K}")
    # the encoder is frozen from here on: the codes of blank cells are one code from now on (README: Deviations)
    state.update(stage="decoder", step=0, opt=None, blank_code=choose_blank_code(vae, fixed))


def train_decoder(model, data, codes, cfg, device, state):
    """Stage 1b (not in the paper): the decoder alone learns to draw the frozen encoder's argmax codes of the pool,
    the prior's tokens, on random crops: it learnt from gumbel samples of a q that the KL term keeps spread, and draws
    argmax codes badly until it has seen them."""
    # DEVIATION: the decoder phase (README: Deviations)
    vae, steps, cell = model.vae, cfg.decoder_steps, model.config.cell_size
    opt = adamw(vae.decoder, cfg.decoder_lr, (0.9, 0.999), 1e-4, device, state)
    t0, start = time.time(), state.get("step", 0)
    for step in range(start, steps):
        rng = step_rng(cfg.seed, "decoder", step)
        idx = rng.sample(range(len(codes)), cfg.decoder_batch)
        images, batch = to_float(data.images[idx], device), codes[idx].to(device)  # (B, 3, H, W), (B, h, w)
        if cfg.dvae_crop:
            images, batch = random_crop(rng, images, batch, cfg.dvae_crop, cell)
        one_hot = F.one_hot(batch, vae.config.image_vocab_size).permute(0, 3, 1, 2).float()  # (B, K, h', w')
        stats = vae.decoder(one_hot.contiguous(memory_format=torch.channels_last))  # (B, 6, H', W')
        mu, ln_b = stats[:, :3], stats[:, 3:]  # (B, 3, H', W') each, as vae.decode_soft
        loss = recon_term(cfg)(map_pixels(images), mu, ln_b).mean()
        mse = pixel_mse(images, mu)
        update(opt, loss, state, "decoder", step, [loss.item(), mse])
        if step % cfg.log_every == 0 or step == steps - 1:
            log("decoder", step, steps, t0, start, cfg.decoder_batch, "img", f"loss {loss.item():7.4f} mse {mse:.4f}",
                f"lr {cfg.decoder_lr:.2e}")
    state.update(stage="prior", step=0, opt=None)


def train_prior(model, data, codes, cfg, device, state):
    """Stage 2 (Sec 2.2, App. B.2): cross-entropy, 1/8 text + 7/8 image, BPE dropout, AdamW (0.9, 0.96)."""
    prior, steps = model.transformer, cfg.prior_steps
    opt = adamw(prior, cfg.prior_lr, (0.9, 0.96), cfg.weight_decay, device, state)  # App. B.2
    codes = codes.flatten(1)  # (n, T_img)
    t0, start = time.time(), state.get("step", 0)
    for step in range(start, steps):
        # DEVIATION: warm-up, then a cosine (paper: 5,000 updates of warm-up, then decay on plateaus)
        set_lr(opt, learning_rate(step, steps, cfg.prior_lr, cfg.prior_lr_end, cfg.prior_warmup))
        rng = step_rng(cfg.seed, "prior", step)
        idx = rng.sample(range(len(codes)), cfg.prior_batch)
        # DEVIATION: most one-object captions name the place (paper: captions as they come; README: Deviations)
        captions = [data.caption(data.items[i], rng, cfg.place_phrase) for i in idx]
        text = model.tokenize(captions, dropout=cfg.bpe_dropout, rng=rng)  # (B, T_txt); Sec 2.2 fn. 5
        _, losses = prior(text, codes[idx].to(device))
        update(opt, losses["loss"], state, "prior", step, [losses["text"].item(), losses["image"].item()],
               clip=(prior.parameters(), cfg.grad_clip))  # App. B.2
        if step % cfg.log_every == 0 or step == steps - 1:
            log("prior", step, steps, t0, start, cfg.prior_batch * prior.config.block_size, "tok", f"loss "
                f"{losses['loss'].item():6.3f} text {losses['text'].item():6.3f} image {losses['image'].item():6.3f}",
                f"lr {opt.param_groups[0]['lr']:.2e}")
    state.update(stage="clip", step=0, opt=None)


def train_clip(model, data, cfg, device, state):
    """Stage 3 (Sec 2.6): CLIP's symmetric contrastive loss over (caption, image) pairs, for reranking."""
    clip, steps = model.clip, cfg.clip_steps
    opt = adamw(clip, cfg.clip_lr, (0.9, 0.999), cfg.clip_weight_decay, device, state)
    clip.visual.to(memory_format=torch.channels_last)  # faster convolutions on CPUs
    t0, start = time.time(), state.get("step", 0)
    for step in range(start, steps):
        set_lr(opt, learning_rate(step, steps, cfg.clip_lr, cfg.clip_lr_end, cfg.clip_warmup))
        rng = step_rng(cfg.seed, "clip", step)
        captions, images = data.clip_batch(cfg, rng)  # the Shapes world's bring hard negatives
        text = model.tokenize(captions)  # (B', T_txt)
        loss = clip(text, to_float(images, device).contiguous(memory_format=torch.channels_last))
        update(opt, loss, state, "clip", step, [loss.item()])
        if step % cfg.log_every == 0 or step == steps - 1:
            log("clip", step, steps, t0, start, cfg.clip_batch, "img", f"loss {loss.item():6.3f}",
                f"temp {1 / clip.logit_scale.exp().item():.4f}")
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
    p.add_argument("--dvae-from", metavar="CKPT", help="keep this checkpoint's dVAE and tokenizer; train the rest")
    p.add_argument("--data", metavar="DIR", help="a folder of pictures and captions instead of the Shapes world")
    p.add_argument("--holdout", type=int, default=16, help="with --data: pictures kept out for the report (16)")
    p.add_argument("--benchmark", action="store_true", help="time a training step and generation, then exit")
    p.add_argument("--config", default="", help="DALLEConfig fields, e.g. n_layer=2,n_embd=64 (default: its own)")
    for f in fields(TrainConfig):
        flag, default, meta = "--" + f.name.replace("_", "-"), f.default, f.metadata
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=meta["help"])
        else:
            shown = f"{default:g}" if isinstance(default, float) else default
            p.add_argument(flag, type=type(default), default=default, choices=meta["choices"],
                           help=f"{meta['help']} (default {shown})")
    args = p.parse_args(argv)
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    for name, value in asdict(cfg).items():
        least = 1 if name in ("pool", "log_every", "eval_prompts", "candidates") or \
            name.endswith("batch") else 0  # counts of things that must exist; every other number may be 0
        if not isinstance(value, (str, bool)) and value < least:
            p.error(f"--{name.replace('_', '-')} must be {'positive' if least else 'at least 0'}, got {value}")
    if cfg.pool < 4 * max(cfg.dvae_batch, cfg.decoder_batch, cfg.prior_batch, cfg.clip_batch):
        p.error("--pool must hold at least 4 batches of scenes")
    try:  # DALLEConfig fields, each an integer: a typo is one line, not a traceback
        args.config = {k.strip(): int(v) for k, v in (kv.split("=") for kv in args.config.split(",") if kv)}
        config = DALLEConfig(**args.config)
    except (ValueError, TypeError) as e:
        p.error(f"--config takes DALLEConfig fields as name=integer, comma-separated: {brief(e)}")
    if config.image_size != shapes.SIZE and not args.data:
        p.error(f"the Shapes world is drawn at {shapes.SIZE} px: --config image_size must be {shapes.SIZE} (or "
                f"train on --data)")
    if cfg.dvae_crop % config.cell_size or cfg.dvae_crop > config.image_size:
        p.error(f"--dvae-crop must be whole {config.cell_size}-pixel cells within the {config.image_size}-pixel "
                f"image (0: no crop), got {cfg.dvae_crop}")
    if args.holdout < 0:
        p.error(f"--holdout must not be negative, got {args.holdout}")
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
        print(f"resuming {path} at stage {ckpt['stage']}, step {ckpt['step']}")
        return model, {"stage": ckpt["stage"], "step": ckpt["step"], "opt": ckpt.get("opt"),
                       "blank_code": model.blank_code, "history": ckpt.get("history") or history,
                       "seconds": ckpt.get("seconds") or {}}
    if args.dvae_from:
        old, ckpt = load_or_exit(args.dvae_from, device, "cannot take the dVAE")
        if ckpt.get("stage") in ("dvae", "decoder"):
            sys.exit(f"error: the dVAE of {args.dvae_from} is not trained yet: finish it with --resume")
        torch.manual_seed(cfg.seed)  # loading drew from the generator: the prior and CLIP start as a whole run's do
        try:
            model = DALLE(replace(old.config, **args.config), old.tokenizer).to(device)
        except ValueError as e:
            sys.exit(f"error: --config does not fit the tokenizer of {args.dvae_from}: {brief(e)}")
        model.vae, model.blank_code = old.vae, old.blank_code
        history.update({k: (ckpt.get("history") or history)[k] for k in ("dvae", "decoder")})
        print(f"the dVAE and tokenizer of {args.dvae_from}; the prior and CLIP start afresh")
        return model, {"stage": "prior", "step": 0, "blank_code": old.blank_code, "history": history, "seconds": {}}
    return build_model(cfg, data, args.config).to(device), {"stage": "dvae", "step": 0, "blank_code": -1,
                                                            "history": history, "seconds": {}}


@torch.no_grad()
def encode_pool(model, images_u8, device, batch=16):  # on 2 CPU threads, 16 at a time runs fastest
    """uint8 images (n, 3, H, W) -> the codes the prior learns (n, h, w), on the CPU."""
    return torch.cat([model.image_codes(to_float(images_u8[i:i + batch], device).contiguous(
        memory_format=torch.channels_last)).cpu() for i in range(0, len(images_u8), batch)])  # (n, h, w)


def main(argv=None):
    cfg, args = parse_args(argv)
    try:
        device = pick_device(args.device)
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
        data, held_out = shapes.make_pool(cfg.pool, cfg.seed), None
    model, state = start(cfg, args, data, device)
    model.train()
    model.vae.to(memory_format=torch.channels_last)  # faster convolutions on CPUs
    c = model.config
    print(f"device {device}, {torch.get_num_threads()} threads | dVAE {n_params(model.vae) / 1e6:.2f}M, transformer "
          f"{n_params(model.transformer) / 1e6:.2f}M, CLIP {n_params(model.clip) / 1e6:.2f}M params | {c.image_size}px "
          f"-> {c.grid_size}x{c.grid_size} codes of K={c.image_vocab_size}, text {c.text_seq_len} tokens (BPE vocab "
          f"{len(model.tokenizer.vocab)})")

    def save():  # the recipe travels with the weights as plain data: the settings, the losses, the stage times
        model.blank_code = state["blank_code"]
        model.save(out("dalle.pt"), step=state["step"], stage=state["stage"], opt=state.get("opt"),
                   train=asdict(cfg), history=state["history"], seconds=state["seconds"])

    def timed(stage, fn):  # fn's wall time goes to state["seconds"][stage], the report's stage times
        t0 = time.time()
        result = fn()
        state["seconds"][stage] = state["seconds"].get(stage, 0.0) + time.time() - t0
        return result
    try:
        if state["stage"] == "dvae":  # 1. the dVAE on pixels
            timed("dvae", lambda: train_dvae(model, data, cfg, device, state))
            save()
        model.blank_code = state["blank_code"]
        codes = timed("encode", lambda: encode_pool(model, data.images, device))  # (n, h, w): the prior's tokens
        if state["stage"] == "decoder":  # 1b. its decoder on the frozen encoder's codes
            timed("decoder", lambda: train_decoder(model, data, codes, cfg, device, state))
            save()
            shapes.write_recon(model, data, device, out("dvae_recon.png"))
        if state["stage"] == "prior":  # 2. the prior on [caption | codes]
            timed("prior", lambda: train_prior(model, data, codes, cfg, device, state))
            save()
        if state["stage"] == "clip":  # 3. CLIP on (caption, image) pairs
            timed("clip", lambda: train_clip(model, data, cfg, device, state))
            save()
    except KeyboardInterrupt:
        save()
        print(f"\ninterrupted: saved {out('dalle.pt')} at stage {state['stage']}, step {state['step']}; "
              f"continue with the same command and --resume")
        sys.exit(130)
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"training done in {fmt_time(time.time() - t_start)}; checkpoint {out('dalle.pt')}")
    t_report = time.time()
    if held_out is None:  # the Shapes world's report: what the samples show, read back by its checker
        shapes.write_samples(model, out("final.png"))
        lines = shapes.report(model, cfg, data, codes, device, out)
    else:
        lines = folder_report(model, cfg, data, held_out, codes, device, out)
    shapes.draw_losses(state["history"], out("loss_curves.png"))
    n = {"dvae": cfg.dvae_steps, "decoder": cfg.decoder_steps, "prior": cfg.prior_steps, "clip": cfg.clip_steps}
    parts = [f"{stage} {fmt_time(s)}" + (f", {n[stage]} updates, {n[stage] / s:.1f}/s" if n.get(stage) and s else "")
             for stage, s in state["seconds"].items()]  # each stage's time, this run's and those of runs it resumed
    lines += [f"time on {device} ({torch.get_num_threads()} threads): " + " | ".join(parts)
              + f" | report {fmt_time(time.time() - t_report)}", f"total time {fmt_time(time.time() - t_start)}"]
    with open(out("report.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("report\n  " + "\n  ".join(lines))


# =============================================================================
# Your own pictures (README: Your own pictures): a folder of images and their captions, served as the Shapes world's
# pool is (shapes.ShapesData), with no checker; then the benchmark.


class Data:
    """A folder's pictures: uint8 images (n, 3, H, W), read once, and an item per image, the list of its captions, of
    which one is drawn at each use (the paper's images have several). shapes.ShapesData is the same for the Shapes
    world."""

    def __init__(self, items, images):
        self.items, self.images = items, images

    def caption(self, item, rng, say_place=0.5):  # say_place: the Shapes world's share of captions naming a place
        return rng.choice(item)

    def clip_batch(self, cfg, rng):  # CLIP's (captions, uint8 images (B, 3, H, W)): distinct pictures of the folder
        idx = rng.sample(range(len(self.items)), min(cfg.clip_batch, len(self.items)))
        return [self.caption(self.items[i], rng) for i in idx], self.images[idx]

    def corpus(self, rng):  # the text the BPE is trained on
        return "\n".join(c for item in self.items for c in item)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


class FolderError(Exception):
    pass


def read_captions(folder, names):
    """-> {image file name: [captions]}, from each image's x.txt beside it, one caption a line (DALLE-pytorch's
    layout). A caption file without its image is an error."""
    captions = {}
    for txt in sorted(f for f in os.listdir(folder) if f.endswith(".txt")):
        image = next((txt[:-4] + ext for ext in IMAGE_EXTENSIONS if txt[:-4] + ext in names), None)
        if image is None:
            raise FolderError(f"{os.path.join(folder, txt)} has no image beside it ({txt[:-4]}.png or .jpg)")
        with open(os.path.join(folder, txt), encoding="utf-8") as f:
            lines = [line.strip() for line in f if line.strip()]
        if lines:
            captions[image] = lines
    return captions


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
        raise FolderError(f"{folder} has {len(names)} images but no captions: put each image's in x.txt beside x.png")
    read = {name: read_image(os.path.join(folder, name), size) for name in sorted(captions)}  # None: unreadable
    skipped = [name for name, image in read.items() if image is None]
    if skipped:
        print(f"warning: skipped {len(skipped)} unreadable image{'s' * (len(skipped) > 1)} of {len(captions)}: "
              f"{', '.join(skipped[:5])}{' ...' * (len(skipped) > 5)}", file=sys.stderr)
    items = [captions[name] for name, image in read.items() if image is not None]
    images = [image for image in read.values() if image is not None]
    if len(names) > len(captions):
        print(f"note: {len(names) - len(captions)} images of {folder} have no caption and are not used",
              file=sys.stderr)
    order = list(range(len(items)))
    random.Random(cfg.seed).shuffle(order)  # the held-out pictures
    keep, held = order[holdout:], order[:holdout]
    need = max(cfg.dvae_batch, cfg.decoder_batch, cfg.prior_batch)
    if len(keep) < need:
        raise FolderError(f"{folder} has {len(keep)} pictures to train on ({holdout} held out), fewer than a batch "
                          f"({need}): add pictures, or lower --holdout and the --*-batch settings")
    data = Data([items[i] for i in keep], torch.stack([images[i] for i in keep]))
    held_out = Data([items[i] for i in held], torch.stack([images[i] for i in held]) if held else None)
    return data, held_out


@torch.no_grad()
def folder_report(model, cfg, data, held_out, codes, device, out):
    """What needs no checker -> the report's lines: the dVAE's reconstruction error and codebook usage, the prior's
    losses on the held-out pictures, and their captions drawn beside the real pictures (holdout.png)."""
    model.eval()
    test = held_out if held_out.items else Data(data.items[:16], data.images[:16])
    which, K = "held-out" if held_out.items else "training", model.config.image_vocab_size
    images = to_float(test.images, device)  # (n, 3, H, W)
    test_codes = model.image_codes(images)  # (n, h, w)
    recon = model.vae.decode(test_codes)  # (n, 3, H, W)
    _, losses = model.transformer(model.tokenize([item[0] for item in test.items]), test_codes.flatten(1))
    rows = []
    for i, item in enumerate(test.items[:8]):
        samples, scores, _ = model.generate([item[0]], n=cfg.candidates, keep=min(4, cfg.candidates), seed=cfg.seed)
        pictures = torch.cat([images[i:i + 1], recon[i:i + 1], samples[0]])  # (2 + keep, 3, H, W)
        rows.append((f'"{item[0]}"', pictures, ["real", "dVAE"] + [f"{s:.3f}" for s in scores[0].tolist()]))
    labelled_rows(rows).save(out("holdout.png"))
    return [f"dVAE: reconstruction MSE {((recon - images) ** 2).mean().item():.5f} on {len(images)} {which} pictures "
            f"(pixels in [0, 1]); codebook usage {codes.unique().numel()}/{K} codes on the training pictures",
            f"transformer loss on the {which} pictures' first captions: {losses['text'].item():.3f} nats per text "
            f"token, {losses['image'].item():.3f} nats per image token (ln K = {math.log(K):.2f})",
            f"holdout.png: {len(rows)} {which} captions, each: the real picture, its dVAE reconstruction, then CLIP's "
            f"best of {cfg.candidates} samples"]


def benchmark(device):
    """Speed at DALLE-pytorch's reference config (README: Speed): 64 px, 8x8 codes, K 512, text 32 tokens of a 1024
    vocab, n_embd 256, 4 layers, 8 heads; an AdamW step of the prior at batch 32, and 16 images generated."""
    sizes = dict(text_seq_len=32, text_vocab_size=1024, n_embd=256, n_head=8, n_layer=4)
    model, c = build_model(TrainConfig(), shapes.make_pool(500, 0), sizes).to(device), DALLEConfig(**sizes)
    text = torch.randint(0, c.text_vocab_size, (32, c.text_seq_len), device=device)  # (32, T_txt)
    codes = torch.randint(0, c.image_vocab_size, (32, c.image_seq_len), device=device)  # (32, T_img)
    opt = torch.optim.AdamW(model.transformer.parameters(), lr=1e-4)

    def seconds(fn):  # the mean of 10 calls after two to warm up; torch's Timer waits for a GPU to finish
        return Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).timeit(10).mean
    state = {"history": {"benchmark": []}}  # update's bookkeeping, unused here
    step = seconds(lambda: update(opt, model.transformer(text, codes)[1]["loss"], state, "benchmark", 0, []))
    model.eval()
    gen = seconds(lambda: model.generate(["a red circle above a blue square"], n=16, keep=16))
    print(f"benchmark on {device} ({torch.get_num_threads()} threads): training step at batch 32 {step:.3f} s = "
          f"{32 * c.block_size / step:,.0f} tokens/s; 16 images generated, decoded and scored {gen:.3f} s")


if __name__ == "__main__":
    main()
