"""
DALL-E in one file: "Zero-Shot Text-to-Image Generation", Ramesh et al. 2021, arXiv 2102.12092.

Reading guide, in paper order (section tags are the paper's):
  1. DALLEConfig            runnable toy defaults; DALLEConfig.paper() is the paper's model
  2. BPETokenizer           byte-level BPE over lower-cased captions (Sec 2.2, App. B.2)
  3. DiscreteVAE            stage 1: 256x256 pixels <-> 32x32 grid of K = 8192 codes (Sec 2.1, App. A)
  4. Transformer            stage 2: the prior over [text | image] tokens, sparse masks (Sec 2.2, App. B.1),
                            and its sampling, KV-cached (Transformer.generate, Sec 2.6)
  5. CLIP                   contrastive reranker: draw N candidates, keep the best k (Sec 2.6)
  6. DALLE                  the whole pipeline: tokenize, image prompts (Sec 3.3), generate(), save() / load()
  7. helpers the drivers share (devices, pictures), then `python dalle.py`: one example's shapes at every stage,
     at toy size and at the paper's.

References
  [1] Ramesh et al. 2021, Zero-Shot Text-to-Image Generation (the paper)
  [2] openai/DALL-E, dall_e/encoder.py and decoder.py (the released dVAE; we match its weights exactly)
  [3] Radford et al. 2021, Learning Transferable Visual Models From Natural Language Supervision (CLIP)
  [4] Child et al. 2019, Generating Long Sequences with Sparse Transformers (row / column masks)
  [5] Jang et al. 2016, Categorical Reparameterization with Gumbel-Softmax; Provilkov et al. 2019, BPE-Dropout

Shape legend
  B batch, T = T_txt + T_img sequence, C channels (n_embd), nh heads, hs head size,
  H, W pixels, h, w token grid (T_img = h*w), K image vocab, V text vocab, N candidates per prompt.
"""
import argparse
import math
import os
import sys
from collections import Counter, OrderedDict
from dataclasses import asdict, dataclass, fields, replace

import regex
import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# 1. Config


@dataclass
class DALLEConfig:
    # DEVIATION: the defaults are a toy that trains on a laptop CPU in minutes (64 px, 8x8 codes, K 512, 4 layers of
    # 64); every field notes its paper value and DALLEConfig.paper() builds the paper's model.
    # images and the dVAE (Sec 2.1, App. A.1)
    image_size: int = 64            # paper: 256
    n_hid: int = 32                 # paper: 256, dVAE widths n_hid x 1/2/4/8
    n_blk_per_group: int = 1        # paper: 2
    n_init: int = 64                # paper: 128, decoder width after the codebook conv
    image_vocab_size: int = 512     # K; paper: 8192
    # text (Sec 2.2)
    text_seq_len: int = 16          # paper: 256 (the Shapes world's captions are at most 13)
    text_vocab_size: int = 384      # V; paper: 16384 (the Shapes world's captions need 373)
    # the transformer prior (App. B.1)
    n_layer: int = 4                # paper: 64
    n_head: int = 4                 # paper: 62
    n_embd: int = 64                # paper: 3968 = 62 heads x 64
    conv_kernel: int = 11           # paper: 11 (App. B.1); 3 in Fig. 11's drawing
    # the contrastive reranker (Sec 2.6; sizes are ours, CLIP [3] is far larger)
    clip_embd: int = 128
    clip_layer: int = 2
    clip_head: int = 4

    @property
    def grid_size(self):            # h = w: the encoder max-pools 3 times (App. A.1)
        return self.image_size // 8

    @property
    def cell_size(self):            # pixels per code along each side: 8 (App. A.1)
        return self.image_size // self.grid_size

    @property
    def image_seq_len(self):        # T_img: 1024 in the paper
        return self.grid_size ** 2

    @property
    def block_size(self):           # T: 256 + 1024 = 1280 in the paper
        return self.text_seq_len + self.image_seq_len

    @property
    def n_text_ids(self):           # V + T_txt: the BPE ids, then one pad per text position (Sec 2.2)
        return self.text_vocab_size + self.text_seq_len

    @classmethod
    def paper(cls):
        return cls(image_size=256, n_hid=256, n_blk_per_group=2, n_init=128, image_vocab_size=8192,
                   text_seq_len=256, text_vocab_size=16384, n_layer=64, n_head=62, n_embd=3968)

    def __post_init__(self):
        if (self.image_size % 8 or self.n_hid % 4 or self.n_embd % self.n_head or self.clip_embd % 8
                or self.clip_embd % self.clip_head):
            raise ValueError(f"inconsistent config: image_size must divide by 8, n_hid by 4, n_embd by n_head, "
                             f"clip_embd by 8 and by clip_head: {self}")

# -----------------------------------------------------------------------------
# 2. BPE tokenizer (Sec 2.2): byte-level, minbpe's algorithm; ids 0..255 are bytes, 256 + i is the i-th merge

GPT2_SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def get_stats(ids, counts=None, weight=1):
    """Count each adjacent pair in ids, e.g. [1, 2, 3, 1, 2] -> {(1, 2): 2, (2, 3): 1, (3, 1): 1}."""
    counts = {} if counts is None else counts
    for pair in zip(ids, ids[1:]):
        counts[pair] = counts.get(pair, 0) + weight
    return counts


def merge(ids, pair, idx):
    """Replace every occurrence of pair in ids by idx, e.g. ([1, 2, 3, 1, 2], (1, 2), 4) -> [4, 3, 4]."""
    newids, i = [], 0
    while i < len(ids):
        if i < len(ids) - 1 and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            newids.append(idx)
            i += 2
        else:
            newids.append(ids[i])
            i += 1
    return newids


class BPETokenizer:
    """Byte-pair encoding (Sec 2.2, App. B.2). The paper: 16,384 tokens, BPE dropout 0.1 in training (fn. 5)."""

    def __init__(self, merges=None, pattern=GPT2_SPLIT_PATTERN):
        self.pattern = pattern
        self.compiled_pattern = regex.compile(pattern)
        self.merges = dict(merges or {})  # (id_a, id_b) -> new id, in the order they were learned
        self.vocab = self._build_vocab()
        self.cache = {}

    def _build_vocab(self):
        vocab = {idx: bytes([idx]) for idx in range(256)}
        for (a, b), idx in sorted(self.merges.items(), key=lambda kv: kv[1]):
            vocab[idx] = vocab[a] + vocab[b]
        return vocab

    def train(self, text, vocab_size, verbose=False):
        if vocab_size < 256:
            raise ValueError(f"vocab_size must be at least 256 (the bytes), got {vocab_size}")
        # the same chunk recurs all over a caption corpus: merge each unique chunk once, weighted by its count
        chunk_counts = Counter(self.compiled_pattern.findall(text))
        chunks = [list(ch.encode("utf-8")) for ch in chunk_counts]
        weights = list(chunk_counts.values())
        self.merges, self.vocab = {}, self._build_vocab()  # the 256 bytes; each merge adds its token below
        for idx in range(256, vocab_size):
            stats = {}
            for ids, weight in zip(chunks, weights):
                get_stats(ids, stats, weight)
            if not stats:
                break  # every chunk is a single token: nothing left to merge
            pair = max(stats, key=stats.get)
            chunks = [merge(ids, pair, idx) for ids in chunks]
            self.merges[pair] = idx
            self.vocab[idx] = self.vocab[pair[0]] + self.vocab[pair[1]]
            if verbose:
                piece = self.vocab[idx].decode("utf-8", errors="replace")
                print(f"merge {idx - 255}/{vocab_size - 256}: {pair} -> {idx} {piece!r} had {stats[pair]} occurrences")
        self.cache = {}

    def _encode_chunk(self, ids, dropout, rng):
        while len(ids) >= 2:
            pairs = set(zip(ids, ids[1:]))
            if dropout > 0:  # BPE-dropout [5]: each candidate merge is skipped with probability p at each step
                pairs = {p for p in sorted(pairs) if rng.random() >= dropout}
            pair = min(pairs, key=lambda p: self.merges.get(p, float("inf")), default=None)
            if pair not in self.merges:
                break  # nothing left to merge (or every candidate was dropped)
            ids = merge(ids, pair, self.merges[pair])  # lowest rank first, as tiktoken does
        return ids

    def encode(self, text, dropout=0.0, rng=None):
        """text -> ids; dropout > 0 (training only, Sec 2.2 fn. 5) draws from rng, a random.Random."""
        if dropout > 0 and rng is None:  # the global `random` would make a run depend on whatever else drew from it
            raise ValueError("BPE dropout draws from rng: pass a random.Random, as train.py does")
        ids = []
        for chunk in self.compiled_pattern.findall(text):
            if dropout > 0:
                ids.extend(self._encode_chunk(list(chunk.encode("utf-8")), dropout, rng))
            else:
                if chunk not in self.cache:
                    self.cache[chunk] = self._encode_chunk(list(chunk.encode("utf-8")), 0.0, None)
                ids.extend(self.cache[chunk])
        return ids

    def decode(self, ids):
        try:
            return b"".join(self.vocab[idx] for idx in ids).decode("utf-8", errors="replace")
        except KeyError as e:
            raise ValueError(f"token id {e.args[0]} is not in this tokenizer's vocabulary of {len(self.vocab)}")

    def to_dict(self):  # plain data for the checkpoint
        return {"pattern": self.pattern, "merges": [[a, b, idx] for (a, b), idx in self.merges.items()]}

    @classmethod
    def from_dict(cls, d):
        return cls({(a, b): idx for a, b, idx in d["merges"]}, d["pattern"])

# -----------------------------------------------------------------------------
# 3. The discrete VAE (Sec 2.1, App. A): the exact architecture of openai/DALL-E [2]

LOGIT_LAPLACE_EPS = 0.1  # App. A.3


def map_pixels(x):  # [0, 1] -> [eps, 1 - eps], so the logit-Laplace density is finite everywhere (App. A.3)
    return (1 - 2 * LOGIT_LAPLACE_EPS) * x + LOGIT_LAPLACE_EPS


def unmap_pixels(x):
    return torch.clamp((x - LOGIT_LAPLACE_EPS) / (1 - 2 * LOGIT_LAPLACE_EPS), 0, 1)


def logit_laplace_nll(x, mu, ln_b):
    """-ln f(x | mu, b) for x in (0, 1), f = exp(-|logit(x) - mu| / b) / (2 b x (1 - x))  (App. A.3)."""
    return math.log(2) + ln_b + torch.log(x * (1 - x)) + (torch.logit(x) - mu).abs() * torch.exp(-ln_b)


class EncoderBlock(nn.Module):
    """App. A.1: relu, 3x3, relu, 3x3, relu, 3x3, relu, 1x1 at a quarter width; output = id + post_gain * res."""

    def __init__(self, n_in, n_out, n_layers):
        super().__init__()
        n_hid = n_out // 4
        self.post_gain = 1 / n_layers ** 2  # 1/64 in the paper: 4 groups x 2 blocks
        self.id_path = nn.Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential(OrderedDict([
            ("relu_1", nn.ReLU()), ("conv_1", nn.Conv2d(n_in, n_hid, 3, padding=1)),
            ("relu_2", nn.ReLU()), ("conv_2", nn.Conv2d(n_hid, n_hid, 3, padding=1)),
            ("relu_3", nn.ReLU()), ("conv_3", nn.Conv2d(n_hid, n_hid, 3, padding=1)),
            ("relu_4", nn.ReLU()), ("conv_4", nn.Conv2d(n_hid, n_out, 1))]))

    def forward(self, x):
        return self.id_path(x) + self.post_gain * self.res_path(x)


class DecoderBlock(nn.Module):
    """App. A.1: relu, 1x1, relu, 3x3, relu, 3x3, relu, 3x3 at a quarter width; output = id + post_gain * res."""

    def __init__(self, n_in, n_out, n_layers):
        super().__init__()
        n_hid = n_out // 4
        self.post_gain = 1 / n_layers ** 2
        self.id_path = nn.Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential(OrderedDict([
            ("relu_1", nn.ReLU()), ("conv_1", nn.Conv2d(n_in, n_hid, 1)),
            ("relu_2", nn.ReLU()), ("conv_2", nn.Conv2d(n_hid, n_hid, 3, padding=1)),
            ("relu_3", nn.ReLU()), ("conv_3", nn.Conv2d(n_hid, n_hid, 3, padding=1)),
            ("relu_4", nn.ReLU()), ("conv_4", nn.Conv2d(n_hid, n_out, 3, padding=1))]))

    def forward(self, x):
        return self.id_path(x) + self.post_gain * self.res_path(x)


def _group(block, n_in, n_out, n_blk, resize):
    """One of the 4 groups: n_blk blocks (the first changes the width), then a resize (App. A.1)."""
    blocks = [(f"block_{i + 1}", block(n_in if i == 0 else n_out, n_out, 4 * n_blk)) for i in range(n_blk)]
    return nn.Sequential(OrderedDict(blocks + [resize]))


def cosine(step, steps, start, end):
    """Half a cosine from start (step 0) to end (step `steps`), then held at end: every schedule in this project."""
    frac = min(step / max(steps, 1), 1.0)
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * frac))


def gumbel_temperature(step, total_steps, start=1.0, end=1 / 16):
    """tau annealed 1 -> 1/16 on a cosine schedule; a linear one "typically led to divergence" (App. A.2)."""
    return cosine(step, total_steps, start, end)


def kl_weight(step, warmup_steps, beta_max=6.6):
    """beta ramped 0 -> 6.6 on a cosine over the first 5,000 updates, then held (Sec 2.1, App. A.2)."""
    return cosine(step, warmup_steps, 0.0, beta_max)


class DiscreteVAE(nn.Module):
    """Stage 1 (Sec 2.1, App. A): compress each image to an h x w grid of K codes, and back."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        n_hid, vocab, n_blk = config.n_hid, config.image_vocab_size, config.n_blk_per_group
        pool, up = ("pool", nn.MaxPool2d(2)), ("upsample", nn.Upsample(scale_factor=2, mode="nearest"))
        keep = ("keep", nn.Identity())  # the last group keeps its resolution
        self.encoder = nn.Sequential(OrderedDict([
            ("input", nn.Conv2d(3, n_hid, 7, padding=3)),
            ("group_1", _group(EncoderBlock, n_hid, n_hid, n_blk, pool)),
            ("group_2", _group(EncoderBlock, n_hid, 2 * n_hid, n_blk, pool)),
            ("group_3", _group(EncoderBlock, 2 * n_hid, 4 * n_hid, n_blk, pool)),
            ("group_4", _group(EncoderBlock, 4 * n_hid, 8 * n_hid, n_blk, keep)),
            ("output", nn.Sequential(OrderedDict([("relu", nn.ReLU()), ("conv", nn.Conv2d(8 * n_hid, vocab, 1))])))]))
        self.decoder = nn.Sequential(OrderedDict([
            # the codebook: a 1x1 conv applied to the K-channel one-hot, no embedding table (App. A.1)
            ("input", nn.Conv2d(vocab, config.n_init, 1)),
            ("group_1", _group(DecoderBlock, config.n_init, 8 * n_hid, n_blk, up)),
            ("group_2", _group(DecoderBlock, 8 * n_hid, 4 * n_hid, n_blk, up)),
            ("group_3", _group(DecoderBlock, 4 * n_hid, 2 * n_hid, n_blk, up)),
            ("group_4", _group(DecoderBlock, 2 * n_hid, n_hid, n_blk, keep)),
            # 6 channels: mu and ln b of a logit-Laplace per subpixel (App. A.3)
            ("output", nn.Sequential(OrderedDict([("relu", nn.ReLU()), ("conv", nn.Conv2d(n_hid, 6, 1))])))]))
        for m in self.modules():  # openai/DALL-E's init: normal with std 1/sqrt(fan_in), zero bias [2]
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=1 / math.sqrt(m.weight[0].numel()))
                nn.init.zeros_(m.bias)

    def _check_images(self, images):
        S = self.config.image_size
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[2] % 8 or images.shape[3] % 8:
            raise ValueError(f"expected images of shape (B, 3, H, W) in [0, 1], H and W multiples of 8 (the encoder "
                             f"pools 3 times; {S} x {S} in this config), got {tuple(images.shape)}")

    def logits(self, images):
        self._check_images(images)
        return self.encoder(map_pixels(images))  # (B, K, h, w): (B, 8192, 32, 32) in the paper

    @torch.no_grad()
    def encode(self, images):
        """images (B, 3, H, W) in [0, 1] -> codes (B, h, w): the argmax, no gumbel noise (Sec 2.2)."""
        return self.logits(images).argmax(dim=1)  # (B, h, w)

    def decode_soft(self, one_hot):
        stats = self.decoder(one_hot)  # (B, 6, H, W)
        return stats[:, :3], stats[:, 3:]  # mu, ln b: (B, 3, H, W) each

    @torch.no_grad()
    def decode(self, codes, batch=16):
        """codes (B, h, w) long -> images (B, 3, H, W) in [0, 1], `batch` at a time: the one-hot input is
        K floats per cell, and on a CPU big batches run slower (their activations leave the caches)."""
        K, images = self.config.image_vocab_size, []
        for c in codes.split(batch):  # (b, h, w)
            one_hot = F.one_hot(c, K).permute(0, 3, 1, 2).float()  # (b, K, h, w)
            mu, _ = self.decode_soft(one_hot)
            images.append(unmap_pixels(torch.sigmoid(mu)))  # (b, 3, H, W)
        return torch.cat(images)  # (B, 3, H, W)

    def forward(self, images, tau, beta, generator=None, recon=logit_laplace_nll):
        """The negative ELB of App. A, divided by H*W*3 -> (loss, parts): the terms as tensors, recon (per subpixel),
        kl (nats per position), kl_term (the KL as the loss counts it), and the decoder's mu (B, 3, H, W).
        recon(x, mu, ln_b) -> (B, 3, H, W) is the reconstruction term of the mapped pixels x: App. A.3's logit-Laplace
        NLL, or a trainer's own (train.py's recipe passes the squared error)."""
        logits = self.logits(images)  # (B, K, h, w)
        B, K, h, w = logits.shape
        # gumbel-softmax relaxation [5], soft in forward and backward (App. A.2)
        gumbels = -torch.empty_like(logits).exponential_(generator=generator).log()  # (B, K, h, w)
        one_hot = F.softmax((logits + gumbels) / tau, dim=1)  # (B, K, h, w)
        mu, ln_b = self.decode_soft(one_hot)  # (B, 3, H, W) each
        rec = recon(map_pixels(images), mu, ln_b).mean()  # = sum / (B*H*W*3)
        # KL(q(z|x) || uniform prior over K codes), per position, even while tau > 0 (Sec 2.1)
        log_q = F.log_softmax(logits, dim=1)  # (B, K, h, w)
        kl = (log_q.exp() * (log_q + math.log(K))).sum(dim=1).mean()  # mean per-position KL
        # the loss is divided by H*W*3, so the KL counts h*w / (H*W*3) = 1/192 of a subpixel per position
        kl_term = kl * h * w / (images.shape[2] * images.shape[3] * 3)
        return rec + beta * kl_term, {"recon": rec, "kl": kl, "kl_term": kl_term, "mu": mu}


def blank_cells(images, cell=8):
    """images (B, 3, H, W) -> (B, h, w) bool: the cell x cell cells whose pixels are all black (below 0.1, so that
    the faint ringing of a resized image prompt still counts as black)."""
    B, _, H, W = images.shape
    return images.reshape(B, 3, H // cell, cell, W // cell, cell).amax(dim=(1, 3, 5)) < 0.1  # (B, h, w)


def load_openai_dvae(encoder_state_dict, decoder_state_dict, image_size=256):
    """Build a DiscreteVAE from the state_dicts of openai/DALL-E's Encoder and Decoder [2].

    Their convs keep weights as `.w` / `.b`; ours are nn.Conv2d's `.weight` / `.bias` under the same names,
    so the key table is: encoder.<name>.weight <- <name>.w (likewise bias, and for the decoder)."""
    enc_sd, dec_sd = dict(encoder_state_dict), dict(decoder_state_dict)
    try:
        n_hid = enc_sd["blocks.input.w"].shape[0]
        vocab = enc_sd["blocks.output.conv.w"].shape[0]
        n_init = dec_sd["blocks.input.w"].shape[0]
    except KeyError as e:
        raise ValueError(f"not an openai/DALL-E state_dict: missing {e.args[0]}")
    n_blk = len({k.split(".")[2] for k in enc_sd if k.startswith("blocks.group_1.block_")})
    config = replace(DALLEConfig.paper(), image_size=image_size, n_hid=n_hid, n_blk_per_group=n_blk,
                     n_init=n_init, image_vocab_size=vocab)
    vae = DiscreteVAE(config)
    ours = {}
    for prefix, sd in (("encoder.", enc_sd), ("decoder.", dec_sd)):
        for k, v in sd.items():
            stem, leaf = k.rsplit(".", 1)
            ours[prefix + stem.removeprefix("blocks.") + {"w": ".weight", "b": ".bias"}[leaf]] = v
    vae.load_state_dict(ours)
    return vae

# -----------------------------------------------------------------------------
# 4. The transformer prior (Sec 2.2, App. B)
#
# One stream of T = T_txt + T_img positions. Position 0 holds a learned start token, positions 1..T_txt the
# caption's BPE ids (each empty slot gets its own pad token, Sec 2.2), then image cells 0 .. T_img-2. Output at
# position t predicts token t: the first T_txt outputs predict text, the last T_img predict image cells.
#
# The image->image masks (App. B.1, Fig. 11), written for the output at the position that predicts image cell
# q = (r, c) on an h x w grid; it may read the input holding cell k = (r', c') when k < q in raster order and
#   row (Fig. 11a): q - w <= k          the last w cells: a raster window back to the same column one row up
#   column (11b):   c' == c             the earlier cells of its own column (11c: the same, on transposed states)
#   convolutional (11d): |r'-r|, |c'-c| <= kernel // 2, a causal kernel x kernel neighbourhood (11x11; 3x3 drawn)
# Text is causal, and every image position reads every text position in every layer.
# Layer i of n (1-based): i == n -> convolutional; (i - 2) % 4 == 0 -> column; else row (App. B.1).
# DEVIATION: the paper runs these patterns as custom sparse kernels; we hand the same patterns as dense boolean
# masks to F.scaled_dot_product_attention: identical attention, none of the compute saving, far easier to read.
# DEVIATION: the learned start token at position 0 is ours (the paper does not say how the first text token is
# predicted); it shifts the stream by one so that T outputs predict exactly the T_txt + T_img tokens.

MASK_KINDS = ("row", "column", "conv")


def layer_mask_kind(i, n_layer):
    """The mask of layer i (1-based) of n_layer: 47 row, 16 column and 1 conv layer at 64 (App. B.1)."""
    if i == n_layer:
        return "conv"
    return "column" if (i - 2) % 4 == 0 else "row"


def image_mask(kind, h, w, kernel=11):
    """(T_img, T_img) bool: entry [q, k] says whether the output predicting cell q may read cell k."""
    q = torch.arange(h * w)
    rq, cq, rk, ck = (q // w)[:, None], (q % w)[:, None], (q // w)[None, :], (q % w)[None, :]
    earlier = q[None, :] < q[:, None]  # (T_img, T_img): k < q
    if kind == "row":
        return earlier & (q[None, :] >= q[:, None] - w)
    if kind == "column":
        return earlier & (ck == cq)
    if kind == "conv":
        r = kernel // 2
        return earlier & ((rk - rq).abs() <= r) & ((ck - cq).abs() <= r)
    raise ValueError(f"unknown mask kind {kind!r}, expected one of {MASK_KINDS}")


def attention_mask(kind, text_len, h, w, kernel=11):
    """(T, T) bool over the whole stream (True = may attend), for F.scaled_dot_product_attention."""
    T = text_len + h * w
    mask = torch.ones(T, T).tril().bool()  # text->text causal; image->text all (every text key is earlier)
    # input position text_len + 1 + k holds cell k; output position text_len + q predicts cell q
    mask[text_len:, text_len + 1:] = image_mask(kind, h, w, kernel)[:, :-1]  # the last cell is never an input
    return mask


class CausalSelfAttention(nn.Module):
    """Multi-head attention (nanoGPT's), masked by one of the row / column / conv masks, with a KV cache."""

    def __init__(self, n_embd, n_head):
        super().__init__()
        self.n_head, self.n_embd = n_head, n_embd
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)

    def forward(self, x, mask, cache=None, pos=0):
        B, T, C = x.size()
        nh, hs = self.n_head, C // self.n_head
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # (B, T, C) each
        q = q.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        if cache is not None:  # write this step's keys and values, attend over all so far
            cache[0][:, :, pos:pos + T] = k
            cache[1][:, :, pos:pos + T] = v
            k, v = cache[0][:, :, :pos + T], cache[1][:, :, :pos + T]  # (B, nh, pos + T, hs)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, n_embd):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    # DEVIATION: pre-LN residual blocks (nanoGPT's); the paper's own resblock (App. B.1, Fig. 10) adds gains and
    # fp16 details that matter for 12B parameters at 16-bit, not for this file's purpose.
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = MLP(n_embd)

    def forward(self, x, mask, cache=None, pos=0):
        x = x + self.attn(self.ln_1(x), mask, cache, pos)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """Stage 2 (Sec 2.2, App. B.1): a decoder-only prior over [text | image] tokens, one stream.

    Token ids: text 0..V-1 are BPE ids and V + i is the pad of text slot i; in the joint vocabulary image code j is
    id V + T_txt + j. Text outputs never give image ids probability, nor image outputs text ids."""

    def __init__(self, config):
        super().__init__()
        self.config = c = config
        self.sos = nn.Parameter(torch.zeros(c.n_embd))  # the learned start token at position 0
        self.wte_txt = nn.Embedding(c.n_text_ids, c.n_embd)  # BPE ids and pads
        self.wpe_txt = nn.Embedding(c.text_seq_len + 1, c.n_embd)
        self.wte_img = nn.Embedding(c.image_vocab_size, c.n_embd)
        self.wpe_row = nn.Embedding(c.grid_size, c.n_embd)  # image tokens: token + row + column (Fig. 10)
        self.wpe_col = nn.Embedding(c.grid_size, c.n_embd)
        self.h = nn.ModuleList([Block(c.n_embd, c.n_head) for _ in range(c.n_layer)])
        self.kinds = [MASK_KINDS.index(layer_mask_kind(i + 1, c.n_layer)) for i in range(c.n_layer)]
        self.ln_f = nn.LayerNorm(c.n_embd)
        # DEVIATION: no lm_head: the output vocabulary is the input's, read through the token embeddings (weight
        # tying, as GPT-2 and nanoGPT do; the paper does not say). README: Deviations
        masks = [attention_mask(k, c.text_seq_len, c.grid_size, c.grid_size, c.conv_kernel) for k in MASK_KINDS]
        self.register_buffer("masks", torch.stack(masks), persistent=False)  # (3, T, T)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * c.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def embed_text(self, text):
        """text (B, T_txt) -> (B, T_txt + 1, C): the start token, then the caption's tokens and pads."""
        B, T_txt = text.shape
        sos = self.sos.expand(B, 1, -1)  # (B, 1, C)
        x = torch.cat([sos, self.wte_txt(text)], dim=1)  # (B, T_txt + 1, C)
        return x + self.wpe_txt(torch.arange(T_txt + 1, device=text.device))  # (B, T_txt + 1, C)

    def embed_image(self, codes, start=0):
        """codes (B, n) of cells start .. start+n-1 -> (B, n, C)."""
        cell = torch.arange(start, start + codes.shape[1], device=codes.device)  # (n,)
        w = self.config.grid_size
        return self.wte_img(codes) + self.wpe_row(cell // w) + self.wpe_col(cell % w)  # (B, n, C)

    def run(self, x, pos=0, caches=None):
        """The blocks over x (B, L, C) at positions pos..pos+L-1 -> final features (B, L, C)."""
        L = x.shape[1]
        for block, kind, cache in zip(self.h, self.kinds, caches or [None] * len(self.h)):
            mask = self.masks[kind, pos:pos + L, :pos + L]  # (L, pos + L)
            x = block(x, mask, cache, pos)
        return self.ln_f(x)

    @torch.no_grad()
    def attention(self, text, codes):
        """text (B, T_txt), codes (B, T_img) -> (n_layer, B, T, T): each layer's attention weights, its heads
        averaged; row t is the output at position t (the one predicting token t), column s the input it reads."""
        x = torch.cat([self.embed_text(text), self.embed_image(codes[:, :-1])], dim=1)  # (B, T, C)
        B, T, C = x.shape
        maps = []
        for block, kind in zip(self.h, self.kinds):
            nh = block.attn.n_head
            q, k, _ = block.attn.c_attn(block.ln_1(x)).split(C, dim=2)  # (B, T, C) each
            q, k = (t.view(B, T, nh, C // nh).transpose(1, 2) for t in (q, k))  # (B, nh, T, hs) each
            att = q @ k.transpose(-2, -1) / math.sqrt(C // nh)  # (B, nh, T, T), as scaled_dot_product_attention
            maps.append(att.masked_fill(~self.masks[kind], float("-inf")).softmax(-1).mean(1))  # (B, T, T)
            x = block(x, self.masks[kind])
        return torch.stack(maps)  # (n_layer, B, T, T)

    def check_inputs(self, text, codes):
        c = self.config
        if text.dim() != 2 or text.shape[1] != c.text_seq_len:
            raise ValueError(f"text must be (B, {c.text_seq_len}) ids, got {tuple(text.shape)}")
        if codes is not None and (codes.dim() != 2 or codes.shape[0] != text.shape[0]
                                  or codes.shape[1] > c.image_seq_len):
            raise ValueError(f"codes must be (B, <= {c.image_seq_len}) for text (B, ...), got {tuple(codes.shape)}")

    def forward(self, text, codes):
        """text (B, T_txt) long, codes (B, T_img) long -> (text logits (B, T_txt, V + T_txt), image logits
        (B, T_img, K)), losses (1/8, 7/8). The paper's vocabulary is one, V + T_txt + K ids (16384 + 256 + 8192);
        each position scores only its own modality's part of it, so the other part never gets probability."""
        self.check_inputs(text, codes)
        if codes.shape[1] != self.config.image_seq_len:
            raise ValueError(f"codes must be (B, {self.config.image_seq_len}), got {tuple(codes.shape)}")
        T_txt, n_text = self.config.text_seq_len, self.config.n_text_ids  # n_text = V + T_txt: BPE ids and pads
        x = torch.cat([self.embed_text(text), self.embed_image(codes[:, :-1])], dim=1)  # (B, T, C)
        x = self.run(x)  # (B, T, C)
        logits_txt = F.linear(x[:, :T_txt], self.wte_txt.weight)  # (B, T_txt, V + T_txt): text positions, text ids
        logits_img = self.image_logits(x[:, T_txt:])  # (B, T_img, K): image positions predict image codes only
        loss_txt = F.cross_entropy(logits_txt.reshape(-1, n_text), text.reshape(-1))
        loss_img = F.cross_entropy(logits_img.reshape(-1, logits_img.shape[-1]), codes.reshape(-1))
        loss = loss_txt / 8 + loss_img * 7 / 8  # each averaged over its own count (Sec 2.2)
        return (logits_txt, logits_img), {"loss": loss, "text": loss_txt, "image": loss_img}

    # Sampling (Sec 2.6, Sec 3.3): temperature 1 and no top-k in the paper

    def image_logits(self, x):
        """final features (B, L, C) -> image-code logits (B, L, K), through the image token embeddings."""
        return F.linear(x, self.wte_img.weight)

    @torch.no_grad()
    def generate(self, text, prompt=None, temperature=1.0, top_k=None, generator=None, use_cache=True):
        """text (B, T_txt), prompt (B, m) codes of the first m cells or None -> codes (B, T_img).
        use_cache=False recomputes the whole prefix at every step: the slow path the cache must equal."""
        self.check_inputs(text, prompt)
        B, T_img = text.shape[0], self.config.image_seq_len
        codes = text.new_zeros(B, 0) if prompt is None else prompt  # (B, m)
        caches = None
        if use_cache:
            C, nh, T = self.config.n_embd, self.config.n_head, self.config.block_size
            caches = [torch.empty(2, B, nh, T, C // nh, device=text.device, dtype=self.sos.dtype)
                      for _ in self.h]  # keys and values: (2, B, nh, T, hs) per layer
        x = torch.cat([self.embed_text(text), self.embed_image(codes)], 1)  # (B, L, C)
        pos = 0
        while codes.shape[1] < T_img:
            feats = self.run(x, pos, caches)  # (B, L, C)
            logits = self.image_logits(feats[:, -1]) / temperature  # (B, K)
            if top_k is not None:  # top_k counts codes, e.g. 64 of K (not a fraction)
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]  # (B, 1)
                logits = logits.masked_fill(logits < kth, float("-inf"))
            # inverse-CDF sampling: one uniform a row, where torch.multinomial draws K (slow on a CPU); right=True
            # never lands on a code of probability 0, the clamp on a rounding past the last
            cdf = F.softmax(logits, dim=-1).cumsum(dim=-1)  # (B, K)
            u = torch.rand(B, 1, generator=generator, device=cdf.device) * cdf[:, -1:]  # (B, 1)
            nxt = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[-1] - 1)  # (B, 1)
            codes = torch.cat([codes, nxt], dim=1)  # (B, m + 1)
            if use_cache:
                pos += x.shape[1]
                x = self.embed_image(codes[:, -1:], codes.shape[1] - 1)  # (B, 1, C): the new token
            else:
                x = torch.cat([self.embed_text(text), self.embed_image(codes)], dim=1)  # (B, L + 1, C)
        return codes  # (B, T_img)

# -----------------------------------------------------------------------------
# 5. CLIP (Sec 2.6, [3]): a contrastive model that scores how well an image matches its caption


class CLIP(nn.Module):
    """A small CLIP [3]: a causal text transformer over the same BPE ids, a conv image encoder, one embedding space.

    Reranking (Sec 2.6): draw N candidates per caption, keep the k that CLIP scores highest."""

    def __init__(self, config):
        super().__init__()
        self.config = c = config
        C = c.clip_embd
        self.wte = nn.Embedding(c.n_text_ids, C)  # the prior's text ids: BPE ids and pads
        self.wpe = nn.Embedding(c.text_seq_len, C)
        self.h = nn.ModuleList([Block(C, c.clip_head) for _ in range(c.clip_layer)])
        self.ln_f = nn.LayerNorm(C)
        self.register_buffer("causal", torch.ones(c.text_seq_len, c.text_seq_len).tril().bool(), persistent=False)
        # DEVIATION: a 4-layer strided conv net instead of CLIP's ResNet / ViT: it keeps positions (flattened 4x4
        # map), which the toy captions ask about, and trains in seconds. Its first two layers, at 32 and 16 pixels,
        # are narrow (C/8, C/4): they cost most of a step, and more updates teach more than width (README: Levers)
        self.visual = nn.Sequential(
            nn.Conv2d(3, C // 8, 3, stride=2, padding=1), nn.ReLU(),  # (B, C/8, H/2, W/2)
            nn.Conv2d(C // 8, C // 4, 3, stride=2, padding=1), nn.ReLU(),  # (B, C/4, H/4, W/4)
            nn.Conv2d(C // 4, C, 3, stride=2, padding=1), nn.ReLU(),  # (B, C, H/8, W/8)
            nn.Conv2d(C, C, 3, stride=2, padding=1), nn.ReLU(),  # (B, C, H/16, W/16)
            nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(16 * C, C))  # (B, C, 4, 4) -> (B, 16 C) -> (B, C)
        self.text_proj = nn.Linear(C, C, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # learned temperature [3]

    def encode_text(self, text):
        """text (B, T_txt) -> unit embeddings (B, C): the mean of the caption's token states (pads left out)."""
        n = (text < self.config.text_vocab_size).sum(1).clamp(min=1)  # (B,): caption lengths, pads follow
        text = text[:, :int(n.max())]  # the mask is causal: pads after the longest caption change nothing
        B, T = text.shape
        x = self.wte(text) + self.wpe(torch.arange(T, device=text.device))  # (B, T, C)
        for block in self.h:
            x = block(x, self.causal[:T, :T])
        # DEVIATION: CLIP [3] reads the state at [EOS]; we average the caption's tokens, so a new colour-shape
        # pair is not read as its last word (README: Deviations, CLIP.encode_text)
        keep = (torch.arange(T, device=text.device)[None] < n[:, None]).unsqueeze(-1)  # (B, T, 1)
        x = self.ln_f((x * keep).sum(1) / n[:, None])  # (B, C)
        return F.normalize(self.text_proj(x), dim=-1)

    def encode_image(self, images):
        """images (B, 3, H, W) in [0, 1] -> unit embeddings (B, C)."""
        return F.normalize(self.visual(images * 2 - 1), dim=-1)

    def forward(self, text, images):
        """The symmetric contrastive loss [3]: text (B, T_txt), images (B, 3, H, W), image b matching caption b."""
        t, i = self.encode_text(text), self.encode_image(images)  # (B, C), (B, C)
        logits = self.logit_scale.clamp(max=math.log(100)).exp() * i @ t.t()  # (B, B): image x caption
        labels = torch.arange(len(t), device=logits.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2

    @torch.no_grad()
    def score(self, text, images):
        """The cosine similarity of each (caption, image) pair: text (B, T_txt), images (B, 3, H, W) -> (B,)."""
        return (self.encode_text(text) * self.encode_image(images)).sum(-1)  # (B,)


def rerank(scores, keep):
    """scores (P, N) -> indices (P, keep) of the best `keep` candidates per prompt, best first (Sec 2.6)."""
    return scores.topk(min(keep, scores.shape[1]), dim=1).indices

# -----------------------------------------------------------------------------
# 6. The whole pipeline: tokenizer + dVAE + transformer + CLIP, and checkpoints


# /1 kept the blank code in the dVAE's state_dict, /2 had an lm_head apart from the embeddings, /3 CLIP's first two
# convolutions twice as wide: each loads as "train it again"
FORMAT = "dalle.py/4"


class CheckpointError(Exception):
    pass


def brief(e):  # an exception as one short line, for one-line error messages
    text = " ".join(str(e).split())  # one line, whatever the exception's layout
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__


class DALLE(nn.Module):
    def __init__(self, config, tokenizer=None):
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer or BPETokenizer()
        if len(self.tokenizer.vocab) > config.text_vocab_size:
            raise ValueError(f"tokenizer has {len(self.tokenizer.vocab)} ids, text_vocab_size is only "
                             f"{config.text_vocab_size}")
        self.vae = DiscreteVAE(config)
        self.transformer = Transformer(config)
        self.clip = CLIP(config)
        # a trainer's recipe, as plain data that travels in the checkpoint (README: Deviations): the one code of
        # every all-black cell (-1: none, the paper's argmax)
        self.blank_code = -1

    def tokenize(self, captions, dropout=0.0, rng=None):
        """captions (list of str) -> text (B, T_txt): lower-cased BPE ids, then the pad of each empty slot."""
        T_txt, V = self.config.text_seq_len, self.config.text_vocab_size
        rows = []
        for caption in captions:
            ids = self.tokenizer.encode(caption.lower(), dropout, rng)  # lower-cased (Sec 2.2)
            if dropout and len(ids) > T_txt:
                # DEVIATION: BPE dropout lengthens a caption (it skips merges); one that no longer fits its slots
                # keeps its plain encoding instead of losing its last words (README: Deviations)
                ids = self.tokenizer.encode(caption.lower())
            ids = ids[:T_txt]
            rows.append(ids + [V + i for i in range(len(ids), T_txt)])  # a pad token per position (Sec 2.2)
        return torch.tensor(rows, dtype=torch.long, device=self.transformer.sos.device)  # (B, T_txt)

    @torch.no_grad()
    def image_codes(self, images):
        """images (B, 3, H, W) in [0, 1] -> the codes the prior learns (B, h, w): the dVAE's argmax (Sec 2.2), every
        all-black cell given the blank code when the recipe chose one."""
        codes = self.vae.encode(images)  # (B, h, w)
        if self.blank_code >= 0:
            # DEVIATION: a blank cell carries nothing, so its argmax is arbitrary, and guessing among dozens of codes
            # for empty cells took most of the prior's image loss (README: Deviations, the blank code)
            codes[blank_cells(images, self.config.cell_size)] = self.blank_code
        return codes

    def prompt_codes(self, codes, rows=None):
        """An image's codes (B, h, w), image_codes' -> the codes of its top rows (B, rows * w): 15 of 32 rows in the
        paper (Sec 3.3), the prompt every candidate of DALLE.generate keeps."""
        h = w = self.config.grid_size
        if codes.dim() != 3 or codes.shape[1:] != (h, w):
            raise ValueError(f"an image prompt's codes must be (B, {h}, {w}), got {tuple(codes.shape)}")
        rows = round(15 / 32 * h) if rows is None else rows
        return codes[:, :rows].reshape(codes.shape[0], rows * w)  # (B, rows * w)

    @torch.no_grad()
    def generate(self, prompts, n=32, keep=4, temperature=1.0, top_k=None, seed=0, image_prompt=None):
        """Draw n candidates per prompt in one batch, keep the best `keep` by CLIP (Sec 2.6).
        image_prompt: (P or 1, m) codes of the first m cells, which every candidate keeps (Sec 3.3): prompt_codes'.
        Returns images (P, keep, 3, H, W) in [0, 1], their CLIP scores (P, keep) and codes (P, keep, h, w), best
        first."""
        if not prompts or keep < 1 or n < keep:
            raise ValueError(f"need at least one prompt and 1 <= keep <= n, got {len(prompts)} prompts, "
                             f"n={n}, keep={keep}")
        P, S, h = len(prompts), self.config.image_size, self.config.grid_size
        device = self.transformer.sos.device
        text = self.tokenize(prompts).repeat_interleave(n, dim=0)  # (P*N, T_txt)
        prompt = None
        if image_prompt is not None:
            prompt = image_prompt.to(device).expand(P, -1).repeat_interleave(n, dim=0)  # (P*N, m)
        generator = torch.Generator(device=device).manual_seed(seed)
        codes = self.transformer.generate(text, prompt, temperature, top_k, generator)  # (P*N, T_img)
        images = self.vae.decode(codes.view(-1, h, h))  # (P*N, 3, H, W)
        scores = self.clip.score(text, images).view(P, n)  # (P, N)
        best = rerank(scores, keep)  # (P, keep)
        pick = torch.arange(P, device=device)[:, None], best  # (P, 1), (P, keep)
        images = images.view(P, n, 3, S, S)[pick]  # (P, keep, 3, H, W)
        return images, scores.gather(1, best), codes.view(P, n, h, h)[pick]  # ..., (P, keep), (P, keep, h, w)

    def save(self, path, step=0, **extra):
        """One dict of plain data, written atomically: a crash mid-write never clobbers the last checkpoint."""
        ckpt = {"format": FORMAT, "config": asdict(self.config), "tokenizer": self.tokenizer.to_dict(),
                "vae": self.vae.state_dict(), "transformer": self.transformer.state_dict(),
                "clip": self.clip.state_dict(), "blank_code": self.blank_code, "step": step, **extra}
        tmp = f"{path}.tmp"
        torch.save(ckpt, tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path, device="cpu"):
        """-> (model, checkpoint dict). Never unpickles code (weights_only); any bad file is one CheckpointError."""
        if not os.path.isfile(path):
            raise CheckpointError(f"no checkpoint at {path}")
        try:
            ckpt = torch.load(path, map_location=device, weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{path} is not a readable checkpoint (corrupt or truncated?): {brief(e)}")
        if isinstance(ckpt, dict) and ckpt.get("format") in ("dalle.py/1", "dalle.py/2", "dalle.py/3"):
            raise CheckpointError(f"{path} was written by an older dalle.py (format {ckpt['format']}): train it again")
        if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
            raise CheckpointError(f"{path} is not a dalle.py checkpoint")
        try:
            known = {f.name for f in fields(DALLEConfig)}
            unknown = sorted(set(ckpt["config"]) - known)
            if unknown:  # a setting this dalle.py does not have: say so, then build the model without it
                print(f"warning: {path} sets {', '.join(unknown)}, which this dalle.py does not know: ignored",
                      file=sys.stderr)
            config = DALLEConfig(**{k: v for k, v in ckpt["config"].items() if k in known})
            model = cls(config, BPETokenizer.from_dict(ckpt["tokenizer"]))
            for name in ("vae", "transformer", "clip"):
                getattr(model, name).load_state_dict(ckpt[name])
            model.blank_code = int(ckpt["blank_code"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path} is incompatible with this dalle.py: {brief(e)}")
        return model.to(device).eval(), ckpt

# -----------------------------------------------------------------------------
# 7. Helpers the drivers share: the device, the error-line parser, pictures


def pick_device(name=None):
    """cuda, then mps, then cpu, unless a name is given; an unknown or absent device is a ValueError."""
    has_mps = torch.backends.mps.is_available()
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}: expected cuda, mps or cpu")
    if (device.type == "cuda" and not torch.cuda.is_available()) or (device.type == "mps" and not has_mps):
        raise ValueError(f"device {name} is not available on this machine")
    return device


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr and exit status 2, not the usage text."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def to_float(images_u8, device):
    return images_u8.to(device).float() / 255  # uint8 (B, 3, H, W) -> the models' pixels in [0, 1], on device


def to_u8(images):
    return (images * 255).round().byte().cpu()  # pixels in [0, 1] -> uint8 on the CPU, same shape, as stored


def image_grid(images, gap=2):
    """images (R, N, 3, H, W) in [0, 1] -> one PIL image, R rows of N pictures."""
    from PIL import Image
    R, N, _, H, W = images.shape
    grid = torch.ones(3, R * (H + gap) + gap, N * (W + gap) + gap) * 0.25  # grey lines between pictures
    for r in range(R):
        for n in range(N):
            grid[:, gap + r * (H + gap):(r + 1) * (H + gap), gap + n * (W + gap):(n + 1) * (W + gap)] = images[r, n]
    return Image.fromarray((grid.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().cpu().numpy())


def read_image(path, size):
    """An image file -> uint8 (3, size, size): its centred square, resized (a folder's pictures in train.py, an image
    prompt in sample.py); None if it cannot be read."""
    from PIL import Image
    try:
        with Image.open(path) as img:
            img, side = img.convert("RGB"), min(img.size)
            left, top = (img.width - side) // 2, (img.height - side) // 2
            img = img.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
            pixels = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)  # (size * size * 3,): RGB rows
            return pixels.view(size, size, 3).permute(2, 0, 1)  # (3, size, size)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def labelled_rows(rows, scale=2, gap=4, line=12):
    """rows: [(title, images (N, 3, H, W) in [0, 1], a label per image)] -> one PIL image, each row's title above
    its pictures (scale times their size) and each label below its picture (green when it says right)."""
    from PIL import Image, ImageDraw
    H, W = rows[0][1].shape[2] * scale, rows[0][1].shape[3] * scale
    width = gap + max(max(len(images) * (W + gap) for _, images, _ in rows), 6 * max(len(t) for t, _, _ in rows))
    img = Image.new("RGB", (width, len(rows) * (line + H + line + gap) + gap), (40, 40, 40))
    draw, y = ImageDraw.Draw(img), gap
    for title, images, labels in rows:
        draw.text((gap, y), title, fill=(255, 255, 255))
        for i, (picture, label) in enumerate(zip(images, labels)):
            x = gap + i * (W + gap)
            pixels = (picture.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().cpu().numpy()  # (H, W, 3)
            img.paste(Image.fromarray(pixels).resize((W, H), Image.NEAREST), (x, y + line))
            right = "right" in label and "wrong" not in label
            draw.text((x, y + line + H + 1), label, fill=(120, 230, 120) if right else (230, 230, 230))
        y += line + H + line + gap
    return img


def drawing_frames(model, codes, scale=4):
    """codes (h, w) of one image -> PIL frames of its drawing, one per token in the order the prior samples them
    (raster order, Sec 2): frame t decodes the first t cells; the cells not drawn yet are grey."""
    from PIL import Image
    h, w, cell = *codes.shape, model.config.cell_size
    T = h * w
    drawn = torch.arange(T, device=codes.device)[None] < torch.arange(T + 1, device=codes.device)[:, None]  # (T+1, T)
    fill = max(model.blank_code, 0)  # the decoder needs a code everywhere: the blank one, then painted over
    grids = torch.where(drawn, codes.flatten()[None], fill).view(T + 1, h, w)  # (T + 1, h, w)
    images = model.vae.decode(grids)  # (T + 1, 3, H, W)
    grey = (~drawn).view(T + 1, 1, h, 1, w, 1).expand(-1, 3, -1, cell, -1, cell).reshape(images.shape)
    images = torch.where(grey, torch.full_like(images, 0.5), images)  # (T + 1, 3, H, W)
    pixels = (images.permute(0, 2, 3, 1) * 255).round().byte().cpu().numpy()  # (T + 1, H, W, 3)
    return [Image.fromarray(p).resize((w * cell * scale, h * cell * scale), Image.NEAREST) for p in pixels]


def attention_picture(model, caption, codes, scale=6):
    """The image a caption drew (codes (h, w)) beside, for each caption token, where the outputs of the image cells
    read it: one row per mask kind (its layers and heads averaged), brighter = more attention (README: Exercises)."""
    from PIL import Image, ImageDraw
    c = model.config
    text = model.tokenize([caption])  # (1, T_txt)
    n = int((text < c.text_vocab_size).sum())  # the caption's tokens; pads follow
    maps = model.transformer.attention(text, codes.flatten()[None])[:, 0]  # (n_layer, T, T)
    # the output predicting cell q sits at T_txt + q; caption token j is the input at 1 + j (0 is the start token)
    to_text = maps[:, c.text_seq_len:, 1:1 + n]  # (n_layer, T_img, n)
    kinds = [layer_mask_kind(i + 1, c.n_layer) for i in range(c.n_layer)]
    side, pad, top = c.image_size * scale // 2, 6, 14
    words = [model.tokenizer.decode([i]) for i in text[0, :n].tolist()]
    img = Image.new("RGB", (pad + (n + 1) * (side + pad), top + len(MASK_KINDS) * (side + pad + top)), (40, 40, 40))
    draw = ImageDraw.Draw(img)
    picture = model.vae.decode(codes[None])[0]  # (3, H, W)
    pixels = Image.fromarray((picture.permute(1, 2, 0) * 255).round().byte().cpu().numpy()).resize((side, side))
    for r, kind in enumerate(MASK_KINDS):
        y = top + r * (side + pad + top)
        layers = [i for i, k in enumerate(kinds) if k == kind]
        draw.text((pad, y - top + 2), f"{kind} layers {[i + 1 for i in layers]}", fill=(255, 255, 255))
        img.paste(pixels, (pad, y))
        if not layers:
            continue
        att = to_text[layers].mean(0).view(c.grid_size, c.grid_size, n)  # (h, w, n)
        att = att / att.amax(dim=(0, 1), keepdim=True).clamp(min=1e-9)  # each token's map from 0 to its maximum
        for j in range(n):
            x = pad + (j + 1) * (side + pad)
            heat = (att[:, :, j] * 255).round().byte().cpu().numpy()
            img.paste(Image.fromarray(heat).resize((side, side), Image.NEAREST).convert("RGB"), (x, y))
            draw.text((x + 2, y + 2), repr(words[j]), fill=(255, 80, 80))
    return img


def draw_masks(grid=4, kernel=3, cell=16):
    """A PIL image of the row / column / conv image->image masks on a grid x grid image (Fig. 11):
    in each panel, row q is the output predicting cell q, column k the cell it may read (white)."""
    from PIL import Image, ImageDraw
    n, pad, top = grid * grid, 12, 20
    img = Image.new("RGB", (3 * (n * cell + pad) + pad, n * cell + top + pad), (40, 40, 40))
    draw = ImageDraw.Draw(img)
    for p, kind in enumerate(MASK_KINDS):
        x0 = pad + p * (n * cell + pad)
        draw.text((x0, 4), f"{kind} ({kernel}x{kernel})" if kind == "conv" else kind, fill=(255, 255, 255))
        mask = image_mask(kind, grid, grid, kernel)
        for q in range(n):
            for k in range(n):
                colour = (240, 240, 240) if mask[q, k] else (90, 30, 30) if k >= q else (0, 0, 0)
                box = [x0 + k * cell, top + q * cell, x0 + (k + 1) * cell - 2, top + (q + 1) * cell - 2]
                draw.rectangle(box, fill=colour)
    return img


def mask_ascii(kind, grid=4, kernel=3, query=None):
    """The cells the output predicting `query` may read: '#' read, 'q' the predicted cell, '.' not read."""
    query = grid * grid - grid // 2 - 1 if query is None else query
    mask = image_mask(kind, grid, grid, kernel)[query]
    marks = ["q" if k == query else "#" if mask[k] else "." for k in range(grid * grid)]
    return [" ".join(marks[r * grid:(r + 1) * grid]) for r in range(grid)]

# -----------------------------------------------------------------------------
# python dalle.py: one example's shapes at every stage, at toy size and at the paper's


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def _stages(model, captions, images):
    """One batch through every stage -> [(stage, step, shape)]: what `python dalle.py` prints."""
    c, vae = model.config, model.vae
    text = model.tokenize(captions)  # (B, T_txt)
    logits = vae.logits(images)  # (B, K, h, w)
    codes = logits.argmax(1)  # (B, h, w): vae.encode, the prior's image tokens (Sec 2.2)
    mu, ln_b = vae.decode_soft(F.one_hot(codes, c.image_vocab_size).permute(0, 3, 1, 2).float())  # (B, 3, H, W)
    (logits_txt, logits_img), _ = model.transformer(text, codes.flatten(1))  # (B, T_txt, V + T_txt), (B, T_img, K)
    shape = lambda t: str(tuple(t.shape))  # noqa: E731
    # CLIP's text side reads each caption's length, which a meta tensor does not hold; its size is ours anyway
    scores = "(our CLIP is toy-sized)" if images.is_meta else shape(model.clip.score(text, images))  # (B,)
    return [("1. BPE", "captions -> text ids, a pad per empty slot", shape(text)),
            ("2. dVAE", "images", shape(images)),
            ("", "encoder: logits over K codes per cell", shape(logits)),
            ("", "codes: the argmax per cell", shape(codes)),
            ("", "decoder: mu and ln b per subpixel", f"{shape(mu)} x 2"),
            ("3. prior", "text logits: T_txt positions x (V + T_txt)", shape(logits_txt)),
            ("", "image logits: T_img positions x K", shape(logits_img)),
            ("5. CLIP", "a score per (caption, image)", scores)]


def _walkthrough():
    torch.manual_seed(0)
    captions = ["a red circle above a blue square", "a large green triangle on the left"]
    tok = BPETokenizer()
    tok.train(" ".join(captions * 20), 300)
    print(f"BPE: {captions[0]!r} -> {tok.encode(captions[0])}\n")
    toy, paper = DALLEConfig(), DALLEConfig.paper()
    model = DALLE(toy, tok)
    rows = _stages(model, captions, torch.rand(2, 3, toy.image_size, toy.image_size))
    with torch.device("meta"):  # the paper's model, shapes and sizes only: no memory is allocated
        big = DALLE(paper, tok)
        big_rows = _stages(big, captions, torch.zeros(2, 3, paper.image_size, paper.image_size))
    print(f"{'stage':<9}{'step':<44}{'toy: DALLEConfig()':<22}paper: DALLEConfig.paper()")
    out, scores, _ = model.generate(["a red circle"], n=4, keep=2)  # (1, 2, 3, H, W), (1, 2)
    rows.insert(-1, ("4. draw", "4 candidates, CLIP keeps the best 2", f"{tuple(out.shape)}"))
    big_rows.insert(-1, ("", "", "(not run: 12B parameters)"))
    for (stage, step, small), (_, _, large) in zip(rows, big_rows):
        print(f"{stage:<9}{step:<44}{small:<22}{large}")
    print()
    for name, c in (("toy", toy), ("paper", paper)):
        kinds = [layer_mask_kind(i + 1, c.n_layer) for i in range(c.n_layer)]
        print(f"layer masks, {name} ({c.n_layer} layers, App. B.1): {kinds.count('row')} row, "
              f"{kinds.count('column')} column, {kinds.count('conv')} conv" + (f": {kinds}" if c.n_layer < 8 else ""))
    print("what the output predicting cell q reads on a 4x4 grid (#), 3x3 conv kernel (Fig. 11):")
    for line in zip(*[[f"{k}:"] + mask_ascii(k) for k in MASK_KINDS]):
        print("   " + "   ".join(f"{s:<12}" for s in line))
    print()
    for name, small, large in (("dVAE", model.vae, big.vae), ("transformer", model.transformer, big.transformer),
                               ("CLIP (ours)", model.clip, big.clip)):
        print(f"{name:<12} parameters: toy {n_params(small) / 1e6:6.2f}M   paper {n_params(large) / 1e6:9.1f}M")


if __name__ == "__main__":
    _walkthrough()
