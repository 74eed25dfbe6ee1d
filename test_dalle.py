"""Tests for dalle.py, shapes.py, train.py and sample.py: pytest, CPU, offline, a minute or two on 2 cores."""
import math
import os
import random
import subprocess
import sys
from collections import Counter
from dataclasses import fields, replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import dalle
from dalle import (DALLE, BPETokenizer, CheckpointError, DALLEConfig, DiscreteVAE, Transformer,
                   attention_mask, gumbel_temperature, image_mask, kl_weight, layer_mask_kind, load_openai_dvae,
                   logit_laplace_nll, rerank)

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = DALLEConfig(image_size=32, n_hid=8, n_init=16, image_vocab_size=64, text_seq_len=8, text_vocab_size=300,
                   n_layer=4, n_head=2, n_embd=32, conv_kernel=3, clip_embd=16, clip_layer=1, clip_head=2)
CORPUS = "a red circle above a blue square. a large green triangle on the left. there is a small white diamond. " * 5


def tiny_model(seed=0):
    torch.manual_seed(seed)
    tok = BPETokenizer()
    tok.train(CORPUS, 300)
    return DALLE(TINY, tok).eval()

# -----------------------------------------------------------------------------
# BPE tokenizer


def test_bpe_worked_example():  # minbpe's example: https://en.wikipedia.org/wiki/Byte_pair_encoding
    tok = BPETokenizer()
    tok.train("aaabdaaabac", 256 + 3)
    assert tok.merges == {(97, 97): 256, (256, 97): 257, (257, 98): 258}
    assert tok.encode("aaabdaaabac") == [258, 100, 258, 97, 99]
    assert tok.decode([258, 100, 258, 97, 99]) == "aaabdaaabac"


def test_bpe_splits_with_the_gpt2_pattern_before_merging():
    tok = BPETokenizer()
    tok.train("ab ab ab ab", 256 + 10)
    assert all(b" " not in tok.vocab[i][1:] for i in tok.merges.values())  # no merge crosses a word boundary
    assert tok.merges == {(97, 98): 256, (32, 256): 257}  # then nothing is left to merge: training stops
    assert tok.encode("ab ab") == [256, 257]


@pytest.mark.parametrize("text", ["", "a red circle", "🙂 an emoji and 🎨", "中文字符 テスト 한국어", "x" * 3000,
                                  "Mixed CASE, digits 12345 and\nnew lines\t tabs!"])
def test_bpe_round_trip(text):
    tok = BPETokenizer()
    tok.train(CORPUS + " 🙂 中文 xxxx", 400)
    assert tok.decode(tok.encode(text)) == text


def test_bpe_dropout_changes_segmentation_yet_decodes_to_the_same_text():
    tok = BPETokenizer()
    tok.train(CORPUS, 400)
    text = "a large green triangle above a blue square"
    rng = random.Random(0)
    plain = tok.encode(text)
    dropped = [tok.encode(text, dropout=0.1, rng=rng) for _ in range(20)]
    assert any(d != plain for d in dropped)
    assert all(tok.decode(d) == text for d in dropped)
    assert tok.encode(text) == plain  # off at inference: the same every time


def test_bpe_dropout_draws_as_the_paper_says():
    """BPE-dropout [5]: at each merge step each candidate merge is dropped with probability p and the lowest-ranked
    kept one is made; when every candidate is dropped, the chunk stays as it is. The tokenizer draws segmentations
    from the same distribution as that rule written out apart (total variation under 0.08 over 4,000 draws each;
    0.03 between two samples of the rule itself). Fails on: stopping the whole chunk with probability p at each step
    instead (0.50), making a random kept candidate instead of the lowest-ranked (0.15), dropping a candidate for the
    rest of the chunk (0.41)."""
    tok = BPETokenizer()
    tok.train(CORPUS, 400)

    def rule(ids, p, rng):
        while len(ids) >= 2:
            kept = [pair for pair in sorted(set(zip(ids, ids[1:]))) if pair in tok.merges and rng.random() >= p]
            if not kept:
                break
            pair = min(kept, key=tok.merges.get)
            ids = dalle.merge(ids, pair, tok.merges[pair])
        return tuple(ids)
    n, rng = 4000, random.Random(0)
    ours = Counter(tuple(tok.encode(" triangle", dropout=0.3, rng=rng)) for _ in range(n))
    slow = Counter(rule(list(b" triangle"), 0.3, rng) for _ in range(n))
    assert len(ours) > 5  # dropout makes many segmentations
    assert sum(abs(ours[s] - slow[s]) for s in set(ours) | set(slow)) / (2 * n) < 0.08


def test_bpe_dropout_without_an_rng_is_an_error():
    """Dropout draws from the rng it is given, never from the global `random`, so a run is its seed's alone.
    Tried against: falling back to `random` without a word: fails here."""
    tok = BPETokenizer()
    tok.train(CORPUS, 300)
    with pytest.raises(ValueError, match="rng"):
        tok.encode("a red circle", dropout=0.1)


def test_bpe_save_load_identity():
    tok = BPETokenizer()
    tok.train(CORPUS, 350)
    tok2 = BPETokenizer.from_dict(tok.to_dict())
    assert tok2.merges == tok.merges and tok2.pattern == tok.pattern and tok2.vocab == tok.vocab
    assert tok2.encode("a blue diamond at the top") == tok.encode("a blue diamond at the top")


def test_bpe_merges_apply_lowest_rank_first():
    # with merges (b, c) ranked before (a, b), "abc" must become [a, bc], not [ab, c]
    tok = BPETokenizer({(98, 99): 256, (97, 98): 257})
    assert tok.encode("abc") == [97, 256]


def test_bpe_decode_rejects_unknown_ids():
    with pytest.raises(ValueError, match="not in this tokenizer"):
        BPETokenizer().decode([100000])


def test_tokenize_lower_cases_and_gives_each_empty_slot_its_own_pad():
    model = tiny_model()
    text = model.tokenize(["A RED Circle", "a red circle"])
    assert torch.equal(text[0], text[1])
    n = len(model.tokenizer.encode("a red circle"))
    V = TINY.text_vocab_size
    assert text[0, n:].tolist() == [V + i for i in range(n, TINY.text_seq_len)]
    long = model.tokenize(["a red circle " * 20])
    assert long.shape == (1, TINY.text_seq_len) and (long < V).all()  # truncated, no pads

# -----------------------------------------------------------------------------
# dVAE


def test_dvae_shapes_toy():
    c = DALLEConfig()
    vae = DiscreteVAE(c)
    images = torch.rand(2, 3, 64, 64)
    assert vae.logits(images).shape == (2, 512, 8, 8)
    codes = vae.encode(images)
    assert codes.shape == (2, 8, 8) and codes.dtype == torch.long
    out = vae.decode(codes)
    assert out.shape == (2, 3, 64, 64) and out.min() >= 0 and out.max() <= 1


def test_dvae_shapes_paper_on_meta_device():
    with torch.device("meta"):
        vae = DiscreteVAE(DALLEConfig.paper())
        logits = vae.logits(torch.zeros(1, 3, 256, 256))
        mu, ln_b = vae.decode_soft(torch.zeros(1, 8192, 32, 32))
    assert logits.shape == (1, 8192, 32, 32) and mu.shape == ln_b.shape == (1, 3, 256, 256)
    assert abs(dalle.n_params(vae.encoder) - 53.8e6) < 0.1e6 and abs(dalle.n_params(vae.decoder) - 43.8e6) < 0.1e6


def test_dvae_rejects_wrong_image_shapes():
    vae = DiscreteVAE(TINY)
    for shape in ((1, 3, 30, 30), (1, 1, 32, 32), (3, 32, 32)):
        with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
            vae.encode(torch.rand(*shape))
    assert vae.encode(torch.rand(2, 3, 16, 24)).shape == (2, 2, 3)  # convolutional: any whole number of cells
    with pytest.raises(ValueError, match=r"prompt's codes must be \(B, 4, 4\)"):
        tiny_model().prompt_codes(vae.encode(torch.rand(1, 3, 16, 16)))  # a prompt's rows are rows of the grid


def test_image_codes_give_every_blank_cell_the_blank_code():
    model = tiny_model()  # 32 px, a 4x4 grid of 8x8 cells
    images = torch.zeros(2, 3, 32, 32)
    images[0, :, 3:12, 3:12] = torch.rand(3, 9, 9) + 0.1  # touches cells (0, 0), (0, 1), (1, 0), (1, 1) of image 0
    images[1, :, 20:23, 20:23] = 0.05  # faint, as a resized prompt's ringing: still blank
    argmax = model.vae.encode(images)
    assert torch.equal(model.image_codes(images), argmax)  # blank_code -1: plain argmax, as in the paper
    model.blank_code = 5
    codes = model.image_codes(images)
    drawn = torch.zeros(2, 4, 4, dtype=torch.bool)
    drawn[0, :2, :2] = True
    assert torch.equal(codes[drawn], argmax[drawn]) and (codes[~drawn] == 5).all()


def test_prompt_codes_are_the_top_rows_in_raster_order():
    codes = torch.arange(2 * 16).view(2, 4, 4)
    assert torch.equal(tiny_model().prompt_codes(codes), codes[:, :2].reshape(2, 8))  # round(15 / 32 * 4) = 2 rows
    assert torch.equal(tiny_model().prompt_codes(codes, rows=1), codes[:, 0])


def test_embed_image_adds_each_cells_row_and_column_embedding():
    """Fig. 10 / App. B.1: an image token's input is its code's embedding + its row's + its column's. On the 4 x 4
    grid, the cells 6 and 7 (row 1, columns 2 and 3), embedded from start 6: tried against the row and column tables
    swapped, both indexed by the row, both by the column, and start ignored: each fails here."""
    prior = tiny_model().transformer
    codes = torch.tensor([[9, 4]])  # the codes of cells 6 and 7
    with torch.no_grad():
        got = prior.embed_image(codes, start=6)  # (1, 2, C)
        want = [prior.wte_img.weight[9] + prior.wpe_row.weight[1] + prior.wpe_col.weight[2],
                prior.wte_img.weight[4] + prior.wpe_row.weight[1] + prior.wpe_col.weight[3]]
    assert torch.allclose(got[0], torch.stack(want))


def test_logit_laplace_is_a_density_on_the_unit_interval():
    x = torch.linspace(1e-6, 1 - 1e-6, 200001, dtype=torch.float64)
    for mu, ln_b in ((0.0, 0.0), (1.5, -1.0), (-2.0, 0.5)):
        f = torch.exp(-logit_laplace_nll(x, torch.tensor(mu), torch.tensor(ln_b)))
        assert abs(torch.trapezoid(f, x).item() - 1) < 1e-3


def test_map_pixels_is_the_papers_affine_map_and_unmap_pixels_inverts_it():
    """App. A.3: x' = (1 - 2 eps) x + eps, eps = 0.1, so that 0 and 1 land inside (0, 1) where the logit-Laplace
    density is finite; unmap_pixels inverts it and clamps to [0, 1]. Tried against: a clamp to [eps, 1 - eps]
    instead of the map, eps 0.05, and an unmap that does not invert the map (x - eps, or the division left out):
    each fails here."""
    x = torch.linspace(0, 1, 11)
    assert torch.allclose(dalle.map_pixels(x), 0.8 * x + 0.1)
    assert torch.allclose(dalle.unmap_pixels(dalle.map_pixels(x)), x, atol=1e-6)
    assert torch.equal(dalle.unmap_pixels(torch.tensor([0.0, 0.05, 0.95, 1.0])), torch.tensor([0.0, 0.0, 1.0, 1.0]))


def _relaxed(vae, logits, tau, seed, monkeypatch):
    """The relaxed one-hot (B, K, h, w) that DiscreteVAE.forward hands its decoder, for given logits, and its KL."""
    seen = {}

    def decode_soft(one_hot):  # stands in for the decoder: keeps what it is given
        seen["z"] = one_hot
        return torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8)
    monkeypatch.setattr(vae, "logits", lambda images: logits)
    monkeypatch.setattr(vae, "decode_soft", decode_soft)
    _, parts = vae(torch.rand(1, 3, 8, 8), tau, 1.0, torch.Generator().manual_seed(seed))
    return seen["z"], parts["kl"]


def test_dvae_relaxation_is_gumbel_softmax_and_the_kl_reads_q_itself(monkeypatch):
    """App. A.2: the decoder reads softmax((logits + g) / tau), g gumbel noise drawn from the update's generator.
    Tested by what that must do, whatever way g is drawn: over 20,000 cells, argmax(logits + g) picks each code as
    often as softmax(logits) says (the gumbel-max trick), at any tau; for the same draw g, tau * log z differs
    between two taus by one constant per cell; the same generator seed gives the same z, another seed another; and
    the KL term is KL(q || uniform) of q = softmax(logits), whatever the noise. Tried against: no noise
    (softmax(logits / tau)), the noise added after the division by tau, noise without the temperature, uniform
    noise instead of gumbel, the global generator instead of the update's, and the KL of the relaxed sample: each
    fails here; -log(-log(torch.rand(..., generator=g))) and -log(exponential_(generator=g)) both pass."""
    vae = DiscreteVAE(TINY)
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = (p.log() + 2.0).view(1, 4, 1, 1).expand(1, 4, 100, 200).contiguous()  # 20,000 cells, one q
    z, kl = _relaxed(vae, logits, 0.5, 0, monkeypatch)
    freq = torch.bincount(z.argmax(1).flatten(), minlength=4).float() / 20000
    assert (freq - p).abs().max() < 0.015, freq  # the sampling error of a share is at most 0.0035
    assert math.isclose(kl.item(), (p * (p.log() + math.log(4))).sum().item(), rel_tol=1e-5)
    cells = torch.randn(1, 4, 4, 4)  # different logits in every cell
    z_warm, kl_warm = _relaxed(vae, cells, 1.0, 1, monkeypatch)
    z_cold, kl_cold = _relaxed(vae, cells, 0.5, 1, monkeypatch)
    z_again, _ = _relaxed(vae, cells, 1.0, 1, monkeypatch)
    z_other, _ = _relaxed(vae, cells, 1.0, 2, monkeypatch)
    assert torch.equal(z_warm, z_again) and not torch.allclose(z_warm, z_other)
    gap = 1.0 * z_warm.double().log() - 0.5 * z_cold.double().log()  # (1, K, h, w): log-normalisers only
    assert (gap - gap.mean(1, keepdim=True)).abs().max() < 1e-4
    assert z_cold.amax(1).mean() > z_warm.amax(1).mean()  # colder: nearer one-hot
    q = cells.softmax(1)
    assert torch.allclose(kl_warm, (q * (q.log() + math.log(4))).sum(1).mean()) and torch.equal(kl_warm, kl_cold)


def test_dvae_loss_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    vae = DiscreteVAE(TINY)
    images = torch.zeros(4, 3, 32, 32)
    images[:, 0, 8:20, 8:20] = 1.0  # a red square
    opt = torch.optim.Adam(vae.parameters(), lr=1e-3)
    losses = []
    for step in range(40):
        loss, parts = vae(images, tau=1.0, beta=1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
    assert parts["kl"] >= 0


def test_dvae_loss_is_normalised_per_subpixel():
    torch.manual_seed(0)
    vae = DiscreteVAE(TINY)
    images = torch.rand(2, 3, 32, 32)
    gen = torch.Generator().manual_seed(0)
    loss0, s = vae(images, tau=1.0, beta=0.0, generator=gen)
    loss1, _ = vae(images, tau=1.0, beta=2.0, generator=torch.Generator().manual_seed(0))
    assert math.isclose(loss0.item(), s["recon"].item(), rel_tol=1e-5)
    # the KL term counts h*w / (H*W*3) = 16 / 3072 per position (1/192)
    assert math.isclose((loss1 - loss0).item(), 2.0 * s["kl"].item() / 192, rel_tol=1e-4)
    assert math.isclose(s["kl_term"].item(), s["kl"].item() / 192, rel_tol=1e-6)


def test_schedules_are_cosines_between_the_papers_endpoints():
    """tau 1 -> 1/16 and beta 0 -> 6.6, each on a cosine (App. A.2), checked a quarter of the way, where a line
    and a cosine part. Tried against: tau on a line, beta ramped on a line, beta not held after its ramp: each
    fails here."""
    assert gumbel_temperature(0, 100) == 1.0
    assert math.isclose(gumbel_temperature(100, 100), 1 / 16) and math.isclose(gumbel_temperature(500, 100), 1 / 16)
    assert math.isclose(gumbel_temperature(50, 100), (1 + 1 / 16) / 2)  # half way at the midpoint, as a line is too
    cosine = 1 / 16 + (1 - 1 / 16) * (1 + math.cos(math.pi / 4)) / 2  # a line would be at 1 - 15 / 64 a quarter in
    assert math.isclose(gumbel_temperature(25, 100), cosine)
    assert kl_weight(0, 5000) == 0.0
    assert math.isclose(kl_weight(5000, 5000), 6.6) and math.isclose(kl_weight(10 ** 6, 5000), 6.6)
    assert math.isclose(kl_weight(2500, 5000), 3.3)  # a line agrees here, not a quarter of the way:
    assert math.isclose(kl_weight(1250, 5000), 6.6 * (1 - math.cos(math.pi / 4)) / 2)  # a line: 1.65


def _openai_keys(vae):
    """Our state_dict keys in openai/DALL-E's naming, by the table in load_openai_dvae's docstring."""
    enc, dec = {}, {}
    for k, v in vae.state_dict().items():
        part, rest = k.split(".", 1)
        stem, leaf = rest.rsplit(".", 1)
        (enc if part == "encoder" else dec)["blocks." + stem + {"weight": ".w", "bias": ".b"}[leaf]] = v
    return enc, dec


def test_openai_key_table():
    vae = DiscreteVAE(replace(DALLEConfig.paper(), image_size=64, n_hid=64, n_blk_per_group=2))
    enc, dec = _openai_keys(vae)
    for key in ("blocks.input.w", "blocks.group_1.block_1.res_path.conv_1.w", "blocks.group_2.block_1.id_path.w",
                "blocks.group_4.block_2.res_path.conv_4.b", "blocks.output.conv.w"):
        assert key in enc
    assert "blocks.group_1.block_1.id_path.w" not in enc  # same width: the identity path has no conv
    assert dec["blocks.input.w"].shape == (128, 8192, 1, 1)  # the codebook conv
    assert dec["blocks.output.conv.w"].shape == (6, 64, 1, 1)
    loaded = load_openai_dvae(enc, dec, image_size=64)
    images = torch.rand(2, 3, 64, 64)
    assert torch.equal(loaded.encode(images), vae.encode(images))


def test_openai_loader_matches_the_official_modules():
    dall_e = pytest.importorskip("dall_e", reason="the dall-e package is not installed")
    torch.manual_seed(0)
    enc = dall_e.Encoder(n_hid=64, n_blk_per_group=1, vocab_size=512)
    dec = dall_e.Decoder(n_init=32, n_hid=64, n_blk_per_group=1, vocab_size=512)
    for p in list(enc.parameters()) + list(dec.parameters()):  # their biases start at zero: make them count
        p.data.add_(torch.randn_like(p) * 0.02)
    vae = load_openai_dvae(enc.state_dict(), dec.state_dict(), image_size=64)
    images = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        theirs = enc(dall_e.map_pixels(images)).argmax(1)
        one_hot = torch.nn.functional.one_hot(theirs, 512).permute(0, 3, 1, 2).float()
        recon = dall_e.unmap_pixels(torch.sigmoid(dec(one_hot)[:, :3]))
    assert torch.equal(vae.encode(images), theirs)
    assert (vae.decode(theirs) - recon).abs().max() < 1e-4

# -----------------------------------------------------------------------------
# Transformer prior


def test_paper_preset_size_and_logits_on_meta_device():
    c = DALLEConfig.paper()
    with torch.device("meta"):
        prior = Transformer(c)
        (logits_txt, logits_img), _ = prior(torch.zeros(1, 256, dtype=torch.long),
                                            torch.zeros(1, 1024, dtype=torch.long))
    assert 11.5e9 < dalle.n_params(prior) < 12.5e9  # about 12B (Table 1)
    assert logits_txt.shape == (1, 256, 16384 + 256) and logits_img.shape == (1, 1024, 8192)
    assert c.n_embd // c.n_head == 64


def test_paper_preset_holds_the_papers_sizes():
    """PAPER.md's table: 256 px in 32 x 32 codes of K 8,192; 256 text tokens of a 16,384 vocabulary; 64 layers of
    62 heads of 64; the dVAE at n_hid 256 with 2 blocks a group. Tried against: each size changed: each fails."""
    c = DALLEConfig.paper()
    assert (c.image_size, c.grid_size, c.image_vocab_size, c.text_seq_len, c.text_vocab_size) == (256, 32, 8192,
                                                                                                   256, 16384)
    assert (c.n_layer, c.n_head, c.n_embd, c.n_hid, c.n_blk_per_group) == (64, 62, 3968, 256, 2)


def test_layer_schedule_of_64_layers():
    kinds = [layer_mask_kind(i, 64) for i in range(1, 65)]
    assert kinds.count("row") == 47 and kinds.count("column") == 16 and kinds.count("conv") == 1
    assert kinds[-1] == "conv" and kinds[1] == "column" and kinds[0] == "row" and kinds[5] == "column"


def _reads(kind, q, kernel=3):
    return set(torch.nonzero(image_mask(kind, 4, 4, kernel)[q]).flatten().tolist())


def test_row_mask_on_4x4_grid():
    assert _reads("row", 5) == {1, 2, 3, 4}  # back to the same column of the previous row
    assert _reads("row", 0) == set() and _reads("row", 2) == {0, 1}


def test_column_mask_on_4x4_grid():
    assert _reads("column", 13) == {1, 5, 9}  # the earlier cells of its own column
    assert _reads("column", 3) == set()


def test_conv_mask_on_4x4_grid():
    assert _reads("conv", 10) == {5, 6, 7, 9}  # causal 3x3 neighbourhood
    assert _reads("conv", 4) == {0, 1}
    assert _reads("conv", 15, kernel=11) == set(range(15))  # 11x11 covers all of a 4x4 grid


def test_conv_mask_at_the_papers_size_reads_a_causal_11x11_window():
    """App. B.1: the convolutional layer reads a causal 11 x 11 neighbourhood (Fig. 11 draws it 3 x 3), in the
    default and in paper(); on the paper's 32 x 32 grid the cell (16, 16) reads the 5 rows above it, 11 cells each,
    and the 5 cells to its left: 60 cells, and every text position. Tried against: conv_kernel = 3 in the
    default or in paper() (4 cells), a window one cell too wide (84), and one without its column bound: each fails
    here."""
    c = DALLEConfig.paper()
    assert c.conv_kernel == DALLEConfig().conv_kernel == 11
    q = 16 * 32 + 16
    reads = set(torch.nonzero(image_mask("conv", 32, 32, c.conv_kernel)[q]).flatten().tolist())
    assert reads == {r * 32 + col for r in range(11, 16) for col in range(11, 22)} | set(range(q - 5, q))
    full = attention_mask("conv", c.text_seq_len, 32, 32, c.conv_kernel)  # (1280, 1280): input 257 + k holds cell k
    assert full[256 + q, :257].all() and full[256 + q, 257:].sum() == 60  # the start token, 256 text tokens, 60 cells


@pytest.mark.parametrize("kind", ["row", "column", "conv"])
def test_masks_never_read_the_present_or_future(kind):
    assert not (image_mask(kind, 4, 4) & ~torch.ones(16, 16).tril(-1).bool()).any()


@pytest.mark.parametrize("kind", ["row", "column", "conv"])
def test_image_positions_read_all_text_and_text_is_causal(kind):
    T_txt = 5
    mask = attention_mask(kind, T_txt, 4, 4, 3)  # (21, 21)
    assert mask[T_txt:, :T_txt + 1].all()  # every image output reads the start token and all text
    assert torch.equal(mask[:T_txt + 1, :T_txt + 1], torch.ones(T_txt + 1, T_txt + 1).tril().bool())
    assert not mask[:T_txt, T_txt + 1:].any()  # text never reads image tokens
    assert not (mask & ~torch.ones(21, 21).tril().bool()).any()
    # output T_txt + q may read input T_txt + 1 + k exactly when the image mask allows q -> k
    assert torch.equal(mask[T_txt:, T_txt + 1:], image_mask(kind, 4, 4, 3)[:, :-1])


def _random_batch(c, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, c.text_vocab_size, (B, c.text_seq_len), generator=g)
    codes = torch.randint(0, c.image_vocab_size, (B, c.image_seq_len), generator=g)
    return text, codes


def _outputs(prior, text, codes):
    """Every output position's logits in one (B, T, V + T_txt + K) tensor, position t in row t: the text
    positions' over the text ids, the image positions' over the codes, each padded with zeros to the rest."""
    logits_txt, logits_img = prior(text, codes)[0]
    pad = torch.nn.functional.pad
    return torch.cat([pad(logits_txt, (0, logits_img.shape[2])), pad(logits_img, (logits_txt.shape[2], 0))], dim=1)


def test_prior_is_causal():
    torch.manual_seed(0)
    prior = Transformer(TINY).eval()
    text, codes = _random_batch(TINY)
    logits = _outputs(prior, text, codes)
    j = 6  # change image cell j: it is the input at position T_txt + 1 + j
    codes2 = codes.clone()
    codes2[:, j] = (codes2[:, j] + 1) % TINY.image_vocab_size
    logits2 = _outputs(prior, text, codes2)
    p = TINY.text_seq_len + 1 + j
    assert torch.allclose(logits[:, :p], logits2[:, :p], atol=1e-5)
    assert not torch.allclose(logits[:, p:], logits2[:, p:], atol=1e-5)
    text2 = text.clone()
    text2[:, 3] = (text2[:, 3] + 1) % TINY.text_vocab_size  # text token 3 is the input at position 4
    logits3 = _outputs(prior, text2, codes)
    assert torch.allclose(logits[:, :4], logits3[:, :4], atol=1e-5)
    assert not torch.allclose(logits[:, 4:], logits3[:, 4:], atol=1e-5)


def test_text_positions_never_predict_image_ids_and_vice_versa():
    """Text outputs score the V + T_txt text ids only, image outputs the K codes only, each through its own token
    embeddings (tied): moving the embedding of a code that is not in the input moves that code's column of the image
    logits and nothing else (fails if text outputs read the image rows, or if an untied head scores the codes)."""
    torch.manual_seed(0)
    prior = Transformer(TINY).eval()
    text, codes = _random_batch(TINY)
    K = TINY.image_vocab_size
    codes = codes % (K - 1)  # code K - 1 is never an input
    (logits_txt, logits_img), _ = prior(text, codes)
    assert logits_txt.shape == (2, TINY.text_seq_len, prior.config.n_text_ids)
    assert logits_img.shape == (2, TINY.image_seq_len, K)
    with torch.no_grad():
        prior.wte_img.weight[K - 1] += 1.0
    (again_txt, again_img), _ = prior(text, codes)
    assert torch.equal(again_txt, logits_txt) and torch.equal(again_img[..., :-1], logits_img[..., :-1])
    assert not torch.allclose(again_img[..., -1], logits_img[..., -1])


def test_loss_is_one_eighth_text_seven_eighths_image():
    """Sec 2.2: each cross-entropy averaged over its own tokens, then 1/8 text + 7/8 image, with gradient through both.
    Tried against: 1/2 + 1/2, 7/8 text + 1/8 image, both averaged over all T positions together, summed instead of
    averaged, and loss_txt.detach() / 8 + loss_img * 7 / 8 (no gradient reaches the text): each fails here."""
    torch.manual_seed(0)
    prior = Transformer(TINY)
    text, codes = _random_batch(TINY)
    (logits_txt, logits_img), losses = prior(text, codes)
    F = torch.nn.functional
    loss_txt = F.cross_entropy(logits_txt.flatten(0, 1), text.flatten())  # the mean over the T_txt text positions
    loss_img = F.cross_entropy(logits_img.flatten(0, 1), codes.flatten())  # the mean over the T_img image positions
    assert torch.allclose(losses["text"], loss_txt) and torch.allclose(losses["image"], loss_img)
    assert torch.allclose(losses["loss"], loss_txt / 8 + 7 * loss_img / 8)
    assert not torch.isclose(loss_txt, loss_img)  # else a wrong weighting could not show
    # the gradient of the loss is 1/8 the text loss's plus 7/8 the image loss's (a detached term breaks this)
    params = [prior.sos, prior.h[0].attn.c_attn.weight]
    g_all = torch.autograd.grad(losses["loss"], params, retain_graph=True)
    g_txt = torch.autograd.grad(losses["text"], params, retain_graph=True)
    g_img = torch.autograd.grad(losses["image"], params)
    for a, t, i in zip(g_all, g_txt, g_img):
        assert t.abs().sum() > 0 and torch.allclose(a, t / 8 + 7 * i / 8, atol=1e-7)


def test_kv_cache_features_equal_the_full_forward():
    """The cached path, fed one token at a time, gives every position the same features as the whole sequence run at
    once (an oracle on features, not on samples of an untrained model, which hide most wrong caches). Tried against:
    attending only to the new token, writing at pos + 1, writing the keys into the value cache, and no cache at all
    past the first step: each fails here."""
    torch.manual_seed(0)
    prior = Transformer(TINY).eval()
    text, codes = _random_batch(TINY, B=3)
    c = TINY
    x = torch.cat([prior.embed_text(text), prior.embed_image(codes[:, :-1])], dim=1)  # (B, T, C)
    with torch.no_grad():
        full = prior.run(x)  # (B, T, C)
        caches = [torch.zeros(2, 3, c.n_head, c.block_size, c.n_embd // c.n_head) for _ in prior.h]
        first = c.text_seq_len + 1 + 2  # the start token, the caption and two cells at once, then one at a time
        steps = [prior.run(x[:, :first], 0, caches)]
        steps += [prior.run(x[:, t:t + 1], t, caches) for t in range(first, c.block_size)]
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)


def test_kv_cache_generation_equals_uncached_generation():
    torch.manual_seed(0)
    prior = Transformer(TINY).eval()
    text, codes = _random_batch(TINY, B=3)
    for prompt in (None, codes[:, :5]):
        for top_k in (None, 10):
            fast = prior.generate(text, prompt, top_k=top_k, generator=torch.Generator().manual_seed(1))
            slow = prior.generate(text, prompt, top_k=top_k, generator=torch.Generator().manual_seed(1),
                                  use_cache=False)
            assert torch.equal(fast, slow)
    assert torch.equal(fast[:, :5], codes[:, :5])  # the image prompt is kept


def test_generation_is_reproducible_with_a_seed_and_top_k_restricts_it():
    torch.manual_seed(0)
    prior = Transformer(TINY).eval()
    text, _ = _random_batch(TINY)
    a = prior.generate(text, generator=torch.Generator().manual_seed(3))
    b = prior.generate(text, generator=torch.Generator().manual_seed(3))
    c = prior.generate(text, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    g1 = prior.generate(text, top_k=1, generator=torch.Generator().manual_seed(5))
    g2 = prior.generate(text, top_k=1, generator=torch.Generator().manual_seed(6))
    assert torch.equal(g1, g2)  # top-1 is greedy, whatever the seed


def test_generation_draws_each_code_as_often_as_its_probability():
    """The sampler (inverse CDF) against fixed logits: each code's share of 12,800 draws is its softmax probability,
    top_k's masked codes are never drawn. Tried against wrong answers, each fails: the cdf shifted by one code, the
    probabilities searched instead of the cdf, the argmax instead of a draw, top_k ignored."""
    torch.manual_seed(0)
    prior = Transformer(TINY).eval()
    K = TINY.image_vocab_size
    logits = torch.full((K,), -30.0)
    logits[[3, 7, 8, K - 1]] = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    prior.image_logits = lambda feats: logits.expand(len(feats), K).clone()  # (B, K), whatever the context
    text, _ = _random_batch(TINY, B=800)
    codes = prior.generate(text, generator=torch.Generator().manual_seed(0)).flatten()  # 800 * T_img draws
    share = torch.bincount(codes, minlength=K).float() / len(codes)
    assert torch.allclose(share[[3, 7, 8, K - 1]], torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.015)
    assert share[[3, 7, 8, K - 1]].sum() == 1  # no draw of a code of probability e^-30
    top2 = prior.generate(text, top_k=2, generator=torch.Generator().manual_seed(0))
    assert set(top2.unique().tolist()) == {3, 7}


def test_tiny_prior_overfits_one_batch():
    torch.manual_seed(0)
    prior = Transformer(TINY)
    text, codes = _random_batch(TINY, B=4)
    opt = torch.optim.AdamW(prior.parameters(), lr=3e-3)
    for _ in range(150):
        _, losses = prior(text, codes)
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
    assert losses["image"].item() < 0.3 and losses["text"].item() < 0.3

# -----------------------------------------------------------------------------
# CLIP and reranking


def test_clip_loss_falls_on_a_tiny_batch():
    torch.manual_seed(0)
    model = tiny_model()
    captions = ["a red circle", "a blue square", "a green triangle", "a white diamond"]
    text = model.tokenize(captions)
    images = torch.rand(4, 3, 32, 32)
    opt = torch.optim.Adam(model.clip.parameters(), lr=1e-3)
    losses = []
    for _ in range(60):
        loss = model.clip(text, images)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    scores = model.clip.score(text.repeat_interleave(4, 0), images.repeat(4, 1, 1, 1)).view(4, 4)
    assert torch.equal(scores.argmax(1), torch.arange(4))  # each caption prefers its own image


def test_clip_loss_is_symmetric_over_images_and_captions():
    """CLIP's loss [3] is the mean of two cross-entropies over the (B, B) similarity matrix: each image picks its
    caption among the batch's, and each caption its image. Tried against: the image-to-caption term alone, the
    caption-to-image term alone, and a loss without the learned temperature: each fails here."""
    torch.manual_seed(0)
    model = tiny_model()
    text = model.tokenize(["a red circle", "a blue square", "a green triangle", "a white diamond", "a red square"])
    images = torch.rand(5, 3, 32, 32)
    with torch.no_grad():
        model.clip.logit_scale.fill_(math.log(20.0))
        t, i = model.clip.encode_text(text), model.clip.encode_image(images)  # (B, C) each, unit length
        logits = 20.0 * i @ t.t()  # (B, B): image x caption
        labels = torch.arange(5)
        F = torch.nn.functional
        image_to_text, text_to_image = F.cross_entropy(logits, labels), F.cross_entropy(logits.t(), labels)
        assert not torch.isclose(image_to_text, text_to_image)  # else a one-way loss could not show
        assert torch.isclose(model.clip(text, images), (image_to_text + text_to_image) / 2)


def test_clip_text_embedding_does_not_depend_on_the_rest_of_the_batch():
    model = tiny_model()  # encode_text skips the pads after the batch's longest caption: that must change nothing
    clip, short, long = model.clip, model.tokenize(["red"]), model.tokenize(["a small red circle on the left"])
    alone = clip.encode_text(short)
    assert torch.allclose(clip.encode_text(torch.cat([short, long]))[:1], alone, atol=1e-6)
    x = clip.wte(short) + clip.wpe(torch.arange(short.shape[1]))  # no skipping: every slot, the full causal mask
    for block in clip.h:
        x = block(x, clip.causal)
    n = int((short < TINY.text_vocab_size).sum())  # the caption's tokens are averaged, pads left out
    full = torch.nn.functional.normalize(clip.text_proj(clip.ln_f(x[:, :n].mean(1))), dim=-1)
    assert n < short.shape[1] and torch.allclose(full, alone, atol=1e-6)


def test_rerank_returns_the_best_in_score_order():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.7], [0.3, 0.2, 0.8, 0.0]])
    assert rerank(scores, 2).tolist() == [[1, 3], [2, 0]]


def test_generate_keeps_candidates_in_clip_order_and_is_reproducible():
    model = tiny_model()
    images, scores, codes = model.generate(["a red circle", "a blue square"], n=6, keep=3, seed=1)
    assert images.shape == (2, 3, 3, 32, 32) and scores.shape == (2, 3) and codes.shape == (2, 3, 4, 4)
    assert (scores[:, :-1] >= scores[:, 1:]).all()
    assert torch.equal(model.vae.decode(codes.flatten(0, 1)), images.flatten(0, 1))  # the kept pictures' own codes
    text = model.tokenize(["a red circle"] * 3)
    assert torch.allclose(model.clip.score(text, images[0]), scores[0], atol=1e-5)
    again, _, _ = model.generate(["a red circle", "a blue square"], n=6, keep=3, seed=1)
    assert torch.equal(images, again)

# -----------------------------------------------------------------------------
# Checkpoints


def test_checkpoint_round_trip(tmp_path, capsys):
    """Weights, config, tokenizer and the recipe's blank code come back. Tried against: a load that drops the blank
    code (back to -1), and one that drops an unknown config key without a word: each fails here."""
    model = tiny_model()
    model.blank_code = 5
    path = str(tmp_path / "m.pt")
    model.save(path, step=7)
    loaded, ckpt = DALLE.load(path)
    assert ckpt["step"] == 7 and loaded.config == model.config and loaded.blank_code == 5
    assert loaded.tokenizer.merges == model.tokenizer.merges
    assert capsys.readouterr().err == ""
    ckpt["config"]["wider"] = 2  # a setting of another dalle.py: loaded without it, and said
    torch.save(ckpt, path)
    DALLE.load(path)
    assert "wider" in capsys.readouterr().err
    a, _, _ = model.generate(["a red circle"], n=4, keep=2, seed=0)
    b, _, _ = loaded.generate(["a red circle"], n=4, keep=2, seed=0)
    assert torch.equal(a, b)
    assert not os.path.exists(path + ".tmp")


def test_checkpoint_errors_are_clear(tmp_path):
    path = tmp_path / "m.pt"
    with pytest.raises(CheckpointError, match="no checkpoint"):
        DALLE.load(str(path))
    tiny_model().save(str(path))
    data = path.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.pt").write_bytes(os.urandom(1000))
    for name in ("trunc.pt", "junk.pt"):
        with pytest.raises(CheckpointError, match="not a readable checkpoint"):
            DALLE.load(str(tmp_path / name))
    ckpt = torch.load(str(path), weights_only=True)
    ckpt["config"]["n_embd"] = 64
    torch.save(ckpt, str(tmp_path / "other.pt"))
    with pytest.raises(CheckpointError, match="incompatible"):
        DALLE.load(str(tmp_path / "other.pt"))
    for old in ("dalle.py/1", "dalle.py/3"):  # /3: CLIP's first convolutions wider, which no longer load
        ckpt["format"] = old
        torch.save(ckpt, str(tmp_path / "old.pt"))
        with pytest.raises(CheckpointError, match="older dalle.py .* train it again"):
            DALLE.load(str(tmp_path / "old.pt"))
    torch.save({"weights": torch.zeros(1)}, str(tmp_path / "foreign.pt"))
    with pytest.raises(CheckpointError, match="not a dalle.py checkpoint"):
        DALLE.load(str(tmp_path / "foreign.pt"))


def test_checkpoint_never_unpickles_code(tmp_path):
    """A checkpoint whose pickle would run code is refused before it runs: the payload writes a file, and the
    refusal is the unreadable-file error. Tried against torch.load(..., weights_only=False): the file appears (and
    the error is another), so this fails."""
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))
    torch.save({"format": dalle.FORMAT, "x": Evil()}, str(tmp_path / "evil.pt"))
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        DALLE.load(str(tmp_path / "evil.pt"))
    assert not marker.exists()


def test_a_failed_save_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    model = tiny_model()
    path = str(tmp_path / "m.pt")
    model.save(path, step=1)
    before = open(path, "rb").read()

    def broken_save(obj, f):
        open(f, "wb").write(b"half a file")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        model.save(path, step=2)
    assert open(path, "rb").read() == before


def test_readme_reading_table_links_land_on_what_they_name():
    import re
    links = re.findall(r"\[`([\w.]+)`\]\((\w+\.py)#L(\d+)\)", open(os.path.join(HERE, "README.md")).read())
    assert len(links) >= 20
    for name, path, line in links:
        lines = open(os.path.join(HERE, path)).read().splitlines()[:int(line)]
        assert re.match(rf"\s*(def|class) {name.split('.')[-1]}\b", lines[-1]), (name, path, line, lines[-1])
        if "." in name:  # a method: the class above it is its owner
            owner = next(t for t in reversed(lines) if t.startswith("class "))
            assert owner.startswith(f"class {name.split('.')[0]}"), (name, path, line, owner)


def test_importing_dalle_has_no_side_effects(tmp_path):
    out = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); import dalle, train",
                          HERE], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout == "" and out.stderr == "" and os.listdir(tmp_path) == []

# -----------------------------------------------------------------------------
# The Shapes world (shapes.py), train.py and sample.py

import shapes  # noqa: E402
import train  # noqa: E402  (an ImportError in train.py fails every test below, loudly, not as skips)


def test_world_never_renders_a_held_out_kind():
    rng, seen_pairs, places = random.Random(0), set(), set()
    for objects, _ in [shapes.random_scene(rng) for _ in range(20000)] + shapes.make_pool(500, 1).items:  # every stage's
        kinds = [(o.colour, o.shape) for o in objects]
        assert not set(kinds) & shapes.HELD_OUT  # 1. colour-shape pairs
        if len(kinds) == 2:  # 2. pairs never together, in either order
            assert tuple(kinds) not in shapes.NEW_PAIRS and tuple(kinds[::-1]) not in shapes.NEW_PAIRS
            seen_pairs.add(frozenset(kinds))
        for kind, o in zip(kinds, objects):  # 3. places never visited, by the object's centre, at any size
            assert shapes.NEW_PLACES.get(kind) not in shapes.true_positions(o)
            places.update((kind, p) for p in shapes.true_positions(o))
    # the kinds are held out, not their parts: each held-out pair's objects and each object's other places occur
    assert all(kind in dict.fromkeys(k for p in seen_pairs for k in p) for pair in shapes.NEW_PAIRS for kind in pair)
    assert all((kind, p) in places for kind, where in shapes.NEW_PLACES.items() for p in shapes.POSITIONS if p != where)


def test_report_groups_test_what_they_say():
    rng = random.Random(1)
    for _ in range(50):
        for group in shapes.REPORT_GROUPS:
            objects, relation, where = shapes.report_scene(rng, group)
            kinds = [(o.colour, o.shape) for o in objects]
            assert shapes.in_training(objects) == group.startswith("seen"), group
            assert (relation is not None) == group.endswith("pairs"), group
            if group == "new places":
                assert where == shapes.NEW_PLACES[kinds[0]] and where in shapes.true_positions(objects[0], margin=2)
                assert where in shapes.parse(shapes.caption(objects, relation, rng, where))["position"]
            if group == "new pairs":
                assert tuple(kinds) in shapes.NEW_PAIRS or tuple(kinds[::-1]) in shapes.NEW_PAIRS
            if group.startswith("held-out"):
                assert len(set(kinds) & shapes.HELD_OUT) == 1


def test_world_renders_exact_colours_on_black():
    objects = [shapes.Obj("orange", "square", 20, 32, 32)]
    img = shapes.render(objects)
    assert tuple(img[32, 32]) == shapes.COLOURS["orange"] and tuple(img[0, 0]) == (0, 0, 0)
    assert set(map(tuple, img.reshape(-1, 3))) == {(0, 0, 0), shapes.COLOURS["orange"]}


def test_two_object_scenes_hold_their_relation_without_overlap():
    rng = random.Random(1)
    for _ in range(300):
        objects, relation = shapes.random_scene(rng)
        if relation:
            a, b = objects
            assert shapes.relation_holds(a, b, relation) and a.size <= 16 and b.size <= 16
            assert len(shapes.read_objects(shapes.render(objects))) == 2


def test_captions_parse_back_to_their_scenes():
    rng = random.Random(2)
    for _ in range(500):
        objects, relation = shapes.random_scene(rng)
        spec = shapes.parse(shapes.caption(objects, relation, rng))
        assert spec["relation"] == relation
        assert [(o["colour"], o["shape"]) for o in spec["objects"]] == [(o.colour, o.shape) for o in objects]
        if "size" in spec["objects"][0]:
            assert spec["objects"][0]["size"] == shapes.size_word(objects[0].size)
        if "position" in spec:
            assert spec["position"] in shapes.true_positions(objects[0])
    assert shapes.parse("an elephant playing chess") is None
    assert shapes.parse("an orange circle")["objects"] == [{"colour": "orange", "shape": "circle"}]


def test_clip_hard_negatives_are_true_negatives():
    """A pair's twin swaps colours, shapes or places; a single object's twin is the same object moved, and both
    captions name the place. Neither caption describes the other scene, by the checker (fails when moved keeps a
    phrase of the original's or ignores the held-out places, or when clip_batch lets a moved scene's caption leave
    its place out: all three tried)."""
    rng, kinds = random.Random(4), set()
    for _ in range(600):
        objects, relation = shapes.random_scene(rng)
        twin = shapes.swapped(objects, relation, rng) if relation else shapes.moved(objects[0], rng)
        if twin is None:
            continue
        assert shapes.in_training(twin[0])
        kinds.add("moved" if not relation else "places" if twin[1] != relation else
                  "colours" if twin[0][0].colour != objects[0].colour else "shapes")
        if not relation:
            assert replace(twin[0][0], cx=0, cy=0) == replace(objects[0], cx=0, cy=0)
        # the checker: neither scene's caption describes the other scene, each describes its own
        for (a, ra), (b, rb) in ((twin, (objects, relation)), ((objects, relation), twin)):
            text = shapes.caption(a, ra, rng, say_place=1.0)
            assert not shapes.judge(shapes.parse(text), shapes.render(b))["all"]
            assert shapes.judge(shapes.parse(text), shapes.render(a))["all"]
    assert kinds == {"places", "colours", "shapes", "moved"}
    assert sum(shapes.moved(shapes.place_one(rng, ("red", "circle")), rng) is not None for _ in range(200)) > 100
    pool, cfg = shapes.make_pool(500, 0), train.TrainConfig(place_phrase=0.5, clip_moves=True)
    captions, images = pool.clip_batch(cfg, random.Random(0))
    moved = [c for c in captions[cfg.clip_batch:] if not shapes.parse(c)["relation"]]  # the twins follow the batch
    assert moved and all("position" in shapes.parse(c) for c in moved)


def test_checker_is_right_on_clean_renders():
    rng = random.Random(3)
    scenes = [shapes.report_scene(rng, group) for group in shapes.REPORT_GROUPS for _ in range(60)]
    for objects, relation, where in scenes:
        assert shapes.judge(shapes.parse(shapes.caption(objects, relation, rng, where)), shapes.render(objects))["all"]


def test_checker_components_are_4_connected():
    mask = np.zeros((64, 64), bool)
    mask[0, 0] = mask[1, 1] = True  # touching at a corner only: two components
    mask[10:15, 10] = mask[14, 10:15] = mask[10:15, 14] = True  # a U: one component, its arms joined at the bottom
    comps = sorted(shapes._components(mask), key=lambda c: len(c[0]))
    assert [len(ys) for ys, _ in comps] == [1, 1, 13]
    assert {(y, x) for y, x in zip(*comps[2])} == {(y, x) for y, x in zip(*np.nonzero(mask)) if y >= 10}


def test_checker_reads_shapes_through_soft_edges():
    from PIL import Image, ImageFilter  # a decoder's edges are soft: a slight blur must not turn a diamond round
    for radius in (0.5, 1.0):
        for colour, shape in shapes.PAIRS:
            for size in shapes.SIZES.values():
                obj = shapes.Obj(colour, shape, size, 24, 40)
                img = np.asarray(Image.fromarray(shapes.render([obj])).filter(ImageFilter.GaussianBlur(radius)))
                assert shapes.judge(shapes.parse(f"a {shapes.size_word(size)} {colour} {shape}"), img)["all"], obj


def test_checker_rejects_what_the_caption_does_not_say():
    img = shapes.render([shapes.Obj("red", "circle", 28, 16, 32)])  # a large red circle on the left
    assert shapes.judge(shapes.parse("a large red circle on the left"), img)["all"]
    for wrong in ("a blue circle", "a red square", "a red triangle", "a red diamond", "a small red circle",
                  "a red circle on the right", "a red circle above a blue square"):
        assert not shapes.judge(shapes.parse(wrong), img)["all"], wrong
    scene = [shapes.Obj("green", "triangle", 14, 20, 32), shapes.Obj("yellow", "diamond", 14, 44, 32)]
    img = shapes.render(scene)
    assert shapes.judge(shapes.parse("a green triangle to the left of a yellow diamond"), img)["all"]
    assert shapes.judge(shapes.parse("a yellow diamond to the right of a green triangle"), img)["all"]
    assert not shapes.judge(shapes.parse("a green triangle to the right of a yellow diamond"), img)["all"]
    assert not shapes.judge(shapes.parse("a green triangle above a yellow diamond"), img)["all"]
    assert not shapes.judge(shapes.parse("a green triangle"), np.zeros((64, 64, 3), np.uint8))["all"]


TINY_STEPS = ["--dvae-steps", "6", "--decoder-steps", "2", "--prior-steps", "3", "--clip-steps", "2", "--pool", "64",
              "--eval-prompts", "2", "--log-every", "1", "--dvae-batch", "4", "--decoder-batch",
              "4", "--prior-batch", "4", "--clip-batch", "4"]
TINY_RUN = TINY_STEPS + ["--config", "n_hid=8,n_init=8,image_vocab_size=64,n_layer=2,n_head=2,n_embd=32,clip_embd=16,"
                                     "clip_head=2"]  # --resume and --dvae-from take the sizes of their checkpoint


def test_every_training_setting_is_a_flag():
    for f in fields(train.TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            argv, want = ["--no-" + flag[2:]] if f.default else [flag], not f.default
        elif f.metadata["choices"]:
            want = next(c for c in f.metadata["choices"] if c != f.default)
            argv = [flag, want]
        else:
            if isinstance(f.default, int):
                want = f.default // 2 if f.default > 1 else f.default + 1
            else:
                want = f.default / 2 if f.default else 0.1
            argv = [flag, str(want)]
        cfg, _ = train.parse_args(argv)
        assert getattr(cfg, f.name) == want, f.name
        assert f.metadata["help"], f"{f.name} says nothing of its paper value or reason"


def test_settings_keep_the_papers_values_or_name_them(tmp_path, monkeypatch):
    """Each setting the paper fixes is either the paper's value or says the paper's in its help (README:
    Deviations, TrainConfig), and each stage's optimiser is the paper's AdamW: the dVAE's (0.9, 0.999) with weight
    decay 1e-4 (App. A.2), the prior's (0.9, 0.96) with 4.5e-2 (App. B.2). Tried against: the gradient clip at 1,
    BPE dropout 0.2, the prior's betas (0.9, 0.999), the dVAE's weight decay 0, and a help that drops the paper's
    batch: each fails here."""
    cfg = train.TrainConfig()
    assert (cfg.weight_decay, cfg.grad_clip, cfg.bpe_dropout) == (4.5e-2, 4.0, 0.1)  # App. B.2, Sec 2.2 fn. 5
    helps = {f.name: f.metadata["help"] for f in fields(train.TrainConfig)}
    for name, paper in [("dvae_steps", "3M"), ("dvae_batch", "512"), ("dvae_lr", "1e-4"), ("beta", "6.6"),
                        ("beta_ramp", "5k of 3M"), ("tau_anneal", "150k/3M"), ("prior_steps", "about 430k"),
                        ("prior_batch", "1024"), ("prior_lr", "4.5e-4"), ("prior_warmup", "5k updates"),
                        ("candidates", "512")]:
        assert f"paper: {paper}" in helps[name], (name, helps[name])
    made, real = [], train.adamw
    monkeypatch.setattr(train, "adamw", lambda module, lr, betas, wd, *rest: made.append((betas, wd))
                        or real(module, lr, betas, wd, *rest))
    train.main(TINY_RUN + ["--dvae-steps", "1", "--decoder-steps", "1", "--prior-steps", "1", "--clip-steps", "1",
                           "--eval-prompts", "1", "--curve-prompts", "0", "--out-dir", str(tmp_path)])
    assert made[0] == ((0.9, 0.999), 1e-4) and made[2] == ((0.9, 0.96), 4.5e-2)  # dVAE, decoder, prior, CLIP


def test_benchmark_trains_a_step_and_generates_at_the_reference_config(monkeypatch, capsys):
    """--benchmark builds DALLE-pytorch's reference config, takes an update of its prior and draws 16 pictures, and
    prints both times (here the timer calls each once: the figures are the benchmark's job, not a test's). Tried
    against an update called with the arguments of another signature: fails here."""
    calls = []

    class Once:  # torch's Timer, calling fn once
        def __init__(self, stmt, globals, num_threads):
            self.fn = globals["fn"]

        def timeit(self, number):
            calls.append(self.fn())
            return SimpleNamespace(mean=0.5)
    monkeypatch.setattr(train, "Timer", Once)
    train.main(["--benchmark"])
    out = capsys.readouterr().out
    assert len(calls) == 2 and calls[1][0].shape == (1, 16, 3, 64, 64)  # (prompts, pictures, 3, H, W)
    assert "training step at batch 32 0.500 s" in out and "16 images generated, decoded and scored 0.500 s" in out


def test_help_prints_every_flag(capsys):
    """`python train.py --help` exits 0 and lists every setting. Tried against a help text with a bare '%' (argparse
    formats help with %, and the whole --help then fails with a traceback)."""
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert all("--" + f.name.replace("_", "-") in out for f in fields(train.TrainConfig))


@pytest.mark.parametrize("argv", [["--dvae-crop", "12"], ["--dvae-recon", "l1"], ["--prior-lr", "-1"],
                                  ["--resume", "--config", "n_layer=2"], ["--pool", "10"],
                                  ["--config", "clip_embd=20,clip_head=4"]])  # CLIP's first layer is clip_embd / 8 wide
def test_bad_training_flags_exit_with_one_line(argv, capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1, err


def test_recipe_swaps_only_the_reconstruction_term_of_the_dvae_loss():
    """train.py's recipe passes its squared error to DiscreteVAE.forward: the loss is that term plus the same KL term
    (fails if the recipe computes a loss of its own beside the paper's, or drops the KL)."""
    torch.manual_seed(0)
    vae, images = DiscreteVAE(TINY), torch.rand(2, 3, 32, 32)
    loss, parts = vae(images, 0.5, 2.0, torch.Generator().manual_seed(0), train.squared_error)
    x = dalle.map_pixels(images)
    assert torch.allclose(parts["recon"], ((torch.sigmoid(parts["mu"]) - x) ** 2).mean())
    assert torch.allclose(loss, parts["recon"] + 2.0 * parts["kl_term"])
    assert train.recon_term(train.TrainConfig(dvae_recon="logit-laplace")) is logit_laplace_nll


def test_best_of_n_is_the_mean_over_every_draw_of_n_candidates():
    from itertools import combinations
    rng = np.random.default_rng(0)
    right = rng.random((5, 7)) < 0.4  # (P, M) in CLIP's order, best first
    for n in range(1, 8):
        draws = list(combinations(range(7), n))  # CLIP's pick of a draw is its best-ranked, the lowest index
        brute = np.mean([[row[min(d)] for d in draws] for row in right])
        assert math.isclose(shapes.best_of(right, n), brute), n
    assert math.isclose(shapes.best_of(right, 1), right.mean()) and shapes.best_of(right, 7) == right[:, 0].mean()


def test_decoder_stage_trains_the_decoder_alone_on_the_pools_codes():
    """Stage 1b: the encoder (and so the prior's codes) stays as it was, the decoder learns (fails if the decoder
    stage's optimiser holds the encoder, or if it trains nothing)."""
    cfg, args = train.parse_args(TINY_RUN + ["--decoder-steps", "3"])
    pool = shapes.make_pool(cfg.pool, cfg.seed)
    model = train.build_model(cfg, pool, args.config)
    state = {"step": 0, "history": {"dvae": [], "decoder": []}}
    train.train_dvae(model, pool, cfg, torch.device("cpu"), state)
    assert state["stage"] == "decoder" and state["blank_code"] >= 0
    encoder = {k: v.clone() for k, v in model.vae.encoder.state_dict().items()}
    decoder = {k: v.clone() for k, v in model.vae.decoder.state_dict().items()}
    model.blank_code = state["blank_code"]
    codes = train.encode_pool(model, pool.images, torch.device("cpu"))
    train.train_decoder(model, pool, codes, cfg, torch.device("cpu"), state)
    assert all(torch.equal(v, model.vae.encoder.state_dict()[k]) for k, v in encoder.items())  # codes unchanged
    assert not all(torch.equal(v, model.vae.decoder.state_dict()[k]) for k, v in decoder.items())
    assert state["stage"] == "prior" and len(state["history"]["decoder"]) == 3


def test_tau_anneals_over_its_share_of_the_relaxed_updates(monkeypatch):
    """--tau-anneal 0.5: tau reaches 1/16 half-way through the relaxed updates and stays there (fails if train_dvae
    anneals over all the updates whatever the flag, or over the share of the decoder's: both tried)."""
    cfg, args = train.parse_args(TINY_RUN + ["--dvae-steps", "8", "--tau-anneal", "0.5"])
    pool = shapes.make_pool(cfg.pool, cfg.seed)
    model = train.build_model(cfg, pool, args.config)
    taus = []
    monkeypatch.setattr(train, "gumbel_temperature", lambda step, steps: taus.append(gumbel_temperature(step, steps))
                        or taus[-1])
    train.train_dvae(model, pool, cfg, torch.device("cpu"), {"step": 0, "history": {"dvae": []}})
    assert len(taus) == 8 and taus[0] == 1.0 and taus[1] > taus[2] > taus[3]
    assert all(math.isclose(t, 1 / 16) for t in taus[4:])


def test_a_crop_lies_on_whole_cells_and_carries_its_own_codes():
    """random_crop: one window of whole cells for the batch, which the images and their codes share, and over many
    batches every window of the grid (fails if the codes come from another window, rows and columns swapped, if the
    window is cut off the cell grid, or if the last row or column of windows is never drawn: all tried)."""
    rng, cell, crop = random.Random(0), 8, 32
    images = torch.rand(4, 3, 64, 64)
    g, n = 64 // cell, crop // cell
    codes = torch.arange(4 * g * g).view(4, g, g)  # each cell its own code, so a window says where it was cut
    seen = set()
    for _ in range(200):
        crops, cut = train.random_crop(rng, images, codes, crop, cell)
        assert crops.shape == (4, 3, crop, crop) and cut.shape == (4, n, n)
        r, c = divmod(int(cut[0, 0, 0]), g)  # the window's top-left cell
        assert torch.equal(cut, codes[:, r:r + n, c:c + n])
        assert torch.equal(crops, images[:, :, r * cell:r * cell + crop, c * cell:c * cell + crop])
        seen.add((r, c))
    assert seen == {(r, c) for r in range(g - n + 1) for c in range(g - n + 1)}


def test_the_prior_and_clip_one_object_captions_name_the_place_at_place_phrase(tmp_path):
    """The prior's and CLIP's one-object captions say where the object is at --place-phrase; caption() says it at
    say_place, half by default, as the report draws them (fails if train_prior or clip_batch leaves the share at its
    default, or if caption ignores say_place: all three tried)."""
    cfg, args = train.parse_args(TINY_RUN + ["--prior-steps", "4", "--place-phrase", "1"])
    pool = shapes.make_pool(cfg.pool, cfg.seed)
    model = train.build_model(cfg, pool, args.config)
    drawn, caption = [], pool.caption
    pool.caption = lambda item, rng, *share: drawn.append((item, caption(item, rng, *share))) or drawn[-1][1]
    g = model.config.grid_size
    codes = torch.randint(model.config.image_vocab_size, (len(pool.items), g, g))  # (n, h, w): any codes will do
    train.train_prior(model, pool, codes, cfg, torch.device("cpu"), {"history": {"prior": []}})
    ones = [text for (objects, relation), text in drawn if relation is None]
    assert ones and all("position" in shapes.parse(text) for text in ones)
    captions, _ = pool.clip_batch(cfg, random.Random(0))
    ones = [c for c in captions if not shapes.parse(c)["relation"]]
    assert ones and all("position" in shapes.parse(text) for text in ones)
    rng = random.Random(0)
    singles = [scene for scene in (shapes.random_scene(rng) for _ in range(3000)) if scene[1] is None]
    for share, kwargs in ((0.0, {"say_place": 0.0}), (0.5, {}), (0.9, {"say_place": 0.9})):
        said = np.mean(["position" in shapes.parse(shapes.caption(o, r, rng, **kwargs)) for o, r in singles])
        assert abs(said - share) < 0.05, (share, said)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    train.main(TINY_RUN + ["--out-dir", str(out)])
    return out


def run_sample(*args, cwd=HERE):
    return subprocess.run([sys.executable, os.path.join(HERE, "sample.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_tiny_end_to_end_run_writes_a_checkpoint_that_sample_turns_into_a_png(trained, tmp_path):
    assert (trained / "dalle.pt").exists() and (trained / "report.txt").exists()
    for picture in ("dvae_recon", "final", "recon_by_group", "samples_by_group", "rerank_curve", "loss_curves",
                    "held_out_patches", "masks"):
        assert (trained / f"{picture}.png").exists(), picture
    _, ckpt = DALLE.load(str(trained / "dalle.pt"))  # the recipe travels with the weights, as plain data
    assert ckpt["train"]["dvae_steps"] == 6 and ckpt["blank_code"] >= 0 and len(ckpt["history"]["prior"]) == 3
    out = tmp_path / "s.png"
    r = run_sample("a red circle", "a blue square above a green circle", "--checkpoint", str(trained / "dalle.pt"),
                   "--out", str(out), "--n", "4", "--keep", "2")
    assert r.returncode == 0, r.stderr
    assert "the checker reads" in r.stdout  # both captions are of the Shapes world
    from PIL import Image
    assert Image.open(out).size == (4 + 2 * (3 * 64 + 4), 4 + 2 * (12 + 3 * 64 + 12 + 4))  # 2 rows of 2, at 3x
    run_sample("a red circle", "a blue square above a green circle", "--checkpoint",
                    str(trained / "dalle.pt"), "--out", str(tmp_path / "s2.png"), "--n", "4", "--keep", "2")
    assert out.read_bytes() == (tmp_path / "s2.png").read_bytes()  # same seed, same images
    r3 = run_sample("🦄 " * 40, "--checkpoint", str(trained / "dalle.pt"), "--out", str(tmp_path / "s3.png"),
                    "--n", "2", "--keep", "1", "--image", str(out))
    assert r3.returncode == 0 and "warning" in r3.stderr and (tmp_path / "s3.png").exists()


def test_sample_animates_the_drawing_one_frame_per_token_and_draws_attention(trained, tmp_path):
    """--animate: a GIF of the best picture drawn in raster order, a frame per image token and more; its first frame
    is all grey (nothing drawn), its last the picture itself. --attention: a picture, one row per mask kind."""
    from PIL import Image
    out = tmp_path / "s.png"
    r = run_sample("a red circle above a blue square", "--checkpoint", str(trained / "dalle.pt"), "--out", str(out),
                   "--n", "4", "--keep", "1", "--animate", "--attention")
    assert r.returncode == 0, r.stderr
    gif = Image.open(tmp_path / "s.gif")
    assert gif.n_frames >= 64 + 1
    gif.seek(0)
    first = np.asarray(gif.convert("RGB"))
    assert (np.abs(first.astype(int) - 128) <= 1).all()  # every cell grey before the first token
    kept = np.asarray(Image.open(out).convert("RGB"))  # the kept picture at 3x, under its title line
    gif.seek(64)
    last = np.asarray(gif.convert("RGB").resize((192, 192), Image.NEAREST))
    assert np.abs(last.astype(int) - kept[4 + 12:4 + 12 + 192, 4:4 + 192].astype(int)).mean() < 2
    assert Image.open(tmp_path / "s_attention.png").size[1] > 3 * 64


def test_sample_stands_on_dalle_py_alone(trained, tmp_path):
    """sample.py, image prompt included, runs with only dalle.py beside it (no shapes.py): it says it has no checker."""
    import shutil
    for name in ("dalle.py", "sample.py"):
        shutil.copy(os.path.join(HERE, name), tmp_path / name)
    from PIL import Image
    Image.fromarray(shapes.render([shapes.Obj("red", "circle", 14, 24, 16)])).save(tmp_path / "top.png")
    r = subprocess.run([sys.executable, str(tmp_path / "sample.py"), "a red circle above a blue square",
                        "--checkpoint", str(trained / "dalle.pt"), "--out", str(tmp_path / "s.png"), "--n", "2",
                        "--keep", "1", "--image", str(tmp_path / "top.png")], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "PYTHONPATH": ""})
    assert r.returncode == 0, r.stderr
    assert "no checker" in r.stdout and (tmp_path / "s.png").exists()


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    train.main(TINY_RUN + ["--out-dir", str(out)])
    return DALLE.load(str(out / "dalle.pt"))[0]


@pytest.mark.parametrize("stage, step, where", [("dvae", 3, "update"), ("dvae", 4, "log"), ("decoder", 1, "update"),
                                                ("prior", 2, "update"), ("prior", 1, "log"), ("clip", 1, "update")])
def test_an_interrupted_run_resumed_is_the_same_run(straight_run, tmp_path, monkeypatch, stage, step, where):
    """Ctrl-C in any stage saves a checkpoint; --resume continues it, and the result equals the run that was never
    interrupted, weight for weight: each update draws from its own stream (the dVAE's gumbel noise too), the
    optimiser's state is saved, and the step counter moves with the update, so a Ctrl-C between the update and the
    progress line (`log`) does not repeat it. Tried against: a resume that restarts the stage at step 0, one that
    drops the optimiser's state, the gumbel generator seeded once at the start of the run (fails in the dVAE), and
    the step counter moved after the progress line (fails at `log`)."""
    real = getattr(train, where)

    def interrupt(*args, **kwargs):  # update(opt, loss, state, stage, step, ...) before, log(stage, step, ...) after
        if tuple(args[3:5] if where == "update" else args[:2]) == (stage, step):
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(train, where, interrupt)
    with pytest.raises(SystemExit) as e:
        train.main(TINY_RUN + ["--out-dir", str(tmp_path)])
    assert e.value.code == 130
    _, ckpt = DALLE.load(str(tmp_path / "dalle.pt"))
    assert ckpt["stage"] == stage and ckpt["step"] == step + (where == "log")
    monkeypatch.setattr(train, where, real)
    train.main(TINY_STEPS + ["--out-dir", str(tmp_path), "--resume"])
    b, ckpt = DALLE.load(str(tmp_path / "dalle.pt"))
    assert ckpt["stage"] == "done"
    for name in ("vae", "transformer", "clip"):
        for k, v in getattr(straight_run, name).state_dict().items():
            assert torch.equal(v, getattr(b, name).state_dict()[k]), (name, k)


def test_a_loss_that_is_not_finite_stops_the_run_and_keeps_the_checkpoint(tmp_path, monkeypatch, capsys):
    """A prior whose learning rate is nan: its weights turn nan after the first update and the second update's loss
    is nan. The run stops there with one line and exit status 1, and the checkpoint on disk is the one saved after the
    decoder stage, with finite weights. Tried against: update without its finiteness check (the run goes on and saves
    nan weights) and a main that saves before it stops on the error: each fails here."""
    real = train.learning_rate
    monkeypatch.setattr(train, "learning_rate", lambda step, steps, peak, *rest: float("nan") if
                        peak == train.TrainConfig.prior_lr else real(step, steps, peak, *rest))
    with pytest.raises(SystemExit) as e:
        train.main(TINY_RUN + ["--out-dir", str(tmp_path)])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: prior loss became nan at step 1;"), err
    model, ckpt = DALLE.load(str(tmp_path / "dalle.pt"))
    assert (ckpt["stage"], ckpt["step"]) == ("prior", 0)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_dvae_from_keeps_the_dvae_and_trains_the_rest_as_the_whole_run_did(trained, tmp_path):
    """--dvae-from keeps a checkpoint's dVAE and tokenizer and trains the prior and CLIP afresh, as the run that wrote
    it did: with that run's settings, to the same weights, so that a lever of the prior or CLIP is measured against the
    whole run. Tried against: the new model built without seeding it again (loading the checkpoint draws from the
    generator), and the dVAE trained again: each fails here."""
    sizes = "n_layer=2,n_head=2,n_embd=32,clip_embd=16,clip_head=2"  # TINY_RUN's, but for the dVAE's
    train.main(TINY_STEPS + ["--out-dir", str(tmp_path), "--dvae-from", str(trained / "dalle.pt"), "--config", sizes])
    before, _ = DALLE.load(str(trained / "dalle.pt"))
    after, ckpt = DALLE.load(str(tmp_path / "dalle.pt"))
    assert ckpt["stage"] == "done" and len(ckpt["history"]["prior"]) == 3
    for name in ("vae", "transformer", "clip"):
        assert all(torch.equal(v, getattr(after, name).state_dict()[k])
                   for k, v in getattr(before, name).state_dict().items()), name


def _one_line_error(r, code=None):
    assert r.returncode != 0 and (code is None or r.returncode == code), (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_image_prompt_keeps_the_blank_code_and_the_centred_square(tmp_path):
    """Sec 3.3 as sample.py reads --image: the codes the prior learnt, the recipe's blank code in every empty cell,
    from the centred square of a picture that is not square (as training crops). Tried against: the prompt encoded
    with model.vae.encode alone (blank cells lose the blank code), and the picture squashed to a square instead of
    cropped: each fails here."""
    from PIL import Image
    import sample
    model = tiny_model()  # 32 px, a 4 x 4 grid: the prompt keeps round(15 / 32 * 4) = 2 rows
    model.blank_code = 63
    square = np.zeros((32, 32, 3), np.uint8)
    square[2:7, 2:7] = (255, 0, 0)  # a red spot in cell (0, 0); every other cell blank
    Image.fromarray(square).save(tmp_path / "square.png")
    wide = np.random.default_rng(0).integers(0, 256, (32, 64, 3), dtype=np.uint8)
    wide[:, 16:48] = square
    Image.fromarray(wide).save(tmp_path / "wide.png")
    codes = sample.image_prompt(model, str(tmp_path / "square.png"))  # (1, 2 * 4)
    assert codes.shape == (1, 8) and (codes[0, 1:] == 63).all()
    assert codes[0, 0] == model.vae.encode(torch.from_numpy(square).permute(2, 0, 1)[None] / 255.0)[0, 0, 0]
    assert torch.equal(sample.image_prompt(model, str(tmp_path / "wide.png")), codes)


def test_sample_bad_inputs_exit_with_one_line(trained, tmp_path):
    ckpt = str(trained / "dalle.pt")
    r = run_sample("a red circle", "--checkpoint", str(tmp_path / "missing.pt"))
    _one_line_error(r, 2)
    assert "python train.py" in r.stderr
    _one_line_error(run_sample("", "--checkpoint", ckpt))
    _one_line_error(run_sample("a red circle", "--checkpoint", ckpt, "--n", "0"))
    _one_line_error(run_sample("a red circle", "--checkpoint", ckpt, "--temperature", "-1"))
    _one_line_error(run_sample("a red circle", "--checkpoint", ckpt, "--nonsense"))
    _one_line_error(run_sample("a red circle", "--checkpoint", ckpt, "--device", "warp-drive"))
    _one_line_error(run_sample("a red circle", "--checkpoint", ckpt, "--out", str(tmp_path / "no" / "dir.png")))
    _one_line_error(run_sample("a red circle", "--checkpoint", ckpt, "--image", str(tmp_path / "none.png")))
    bad = tmp_path / "bad.pt"
    data = open(ckpt, "rb").read()
    bad.write_bytes(data[: len(data) // 3])
    _one_line_error(run_sample("a red circle", "--checkpoint", str(bad)))
    assert open(ckpt, "rb").read() == data


def _folder(path, n=40, seed=0):
    """A folder of n Shapes renders, each with two captions in x.txt beside x.png."""
    from PIL import Image
    path.mkdir()
    rng = random.Random(seed)
    for i in range(n):
        objects, relation = shapes.random_scene(rng)
        Image.fromarray(shapes.render(objects)).save(path / f"s{i:03d}.png")
        (path / f"s{i:03d}.txt").write_text("\n".join(shapes.caption(objects, relation, rng) for _ in range(2)) + "\n")
    return path


FOLDER_RUN = ["--dvae-steps", "4", "--decoder-steps", "2", "--prior-steps", "3", "--clip-steps", "2", "--holdout", "4",
              "--log-every", "1", "--dvae-batch", "4", "--decoder-batch", "4", "--prior-batch",
              "4", "--clip-batch", "8", "--config", "n_hid=8,n_init=8,image_vocab_size=64,n_layer=2,n_head=2,n_embd=32,"
              "clip_embd=16,clip_head=2"]


def test_training_on_a_folder_of_pictures(tmp_path):
    """--data DIR: the three stages on a folder's pictures and captions (x.txt beside x.png, two a picture), the
    BPE trained on its captions, a report with no checker, and a checkpoint that sample.py draws from, at a picture
    size other than the Shapes world's (sample.py's checker, which reads 64 px, stays out of it)."""
    folder = _folder(tmp_path / "pics")
    run = FOLDER_RUN[:-1] + [FOLDER_RUN[-1] + ",image_size=32"]
    train.main(run + ["--data", str(folder), "--out-dir", str(tmp_path / "out")])
    model, ckpt = DALLE.load(str(tmp_path / "out" / "dalle.pt"))
    assert ckpt["stage"] == "done" and (tmp_path / "out" / "holdout.png").exists() and model.config.image_size == 32
    assert "held-out" in (tmp_path / "out" / "report.txt").read_text()
    r = run_sample("a red circle", "--checkpoint", str(tmp_path / "out" / "dalle.pt"), "--out", str(tmp_path / "s.png"),
                   "--n", "2", "--keep", "1")
    assert r.returncode == 0, r.stderr
    data, held_out = train.load_folder(str(folder), 64, 4, train.TrainConfig())
    assert len(data.items) == 36 and len(held_out.items) == 4 and all(len(item) == 2 for item in data.items)
    assert data.images.shape == (36, 3, 64, 64) and data.images.dtype == torch.uint8


def test_bad_folders_are_one_line_errors_and_unreadable_images_are_skipped(tmp_path, capsys):
    """An empty folder, images without captions, a caption file without its image: one line on stderr and a non-zero
    exit. A corrupt image is skipped with a warning that names it, and a count."""
    from PIL import Image
    empty, nocap, orphan = (tmp_path / n for n in ("empty", "nocap", "orphan"))
    for d in (empty, nocap, orphan):
        d.mkdir()
    Image.new("RGB", (64, 64)).save(nocap / "a.png")
    Image.new("RGB", (64, 64)).save(orphan / "a.png")
    (orphan / "a.txt").write_text("a picture\n")
    (orphan / "b.txt").write_text("a caption whose picture is missing\n")
    for folder, words in ((empty, "no images"), (nocap, "no captions"), (orphan, "b.txt"),
                          (tmp_path / "missing", "not a folder")):
        with pytest.raises(SystemExit) as e:
            train.main(FOLDER_RUN + ["--data", str(folder), "--out-dir", str(tmp_path / "out")])
        assert e.value.code != 0 and words in str(e.value) and len(str(e.value).splitlines()) == 1, e.value
    corrupt = _folder(tmp_path / "corrupt")
    (corrupt / "s005.png").write_bytes(b"not a png")
    data, _ = train.load_folder(str(corrupt), 64, 4, train.TrainConfig())
    err = capsys.readouterr().err
    assert len(data.items) == 35 and "skipped 1 unreadable image of 40: s005.png" in err

