"""
Text in, pictures out: draw --n candidates per prompt with the transformer prior, decode them with the dVAE,
and keep the --keep that CLIP scores highest (Sec 2.6). One row of samples.png per prompt, best first, each picture
with its CLIP score and, for captions of the Shapes world, the verdict of its checker (shapes.py).

    python sample.py "a red circle to the left of a blue square"
    python sample.py "a red triangle" "a blue circle" --n 64 --keep 8
    python sample.py "a green square" --image scene.png     # keep the image's top rows, complete the rest (Sec 3.3)
    python sample.py "a red circle above a blue square" --animate --attention   # watch it draw; what each cell reads

Sampling needs dalle.py and a checkpoint only; the checker's verdicts need shapes.py beside it.
"""
import argparse
import os
import sys

import torch

from dalle import (DALLE, ArgumentParser, CheckpointError, attention_picture, drawing_frames, labelled_rows,
                   pick_device, read_image, to_float)

try:  # the Shapes world's checker, to say which pictures are right; sampling itself needs only dalle.py
    from shapes import SIZE, judge_all, parse
except ModuleNotFoundError as e:  # shapes.py is not beside sample.py; any other error in it is raised
    if e.name != "shapes":
        raise
    judge_all = parse = None


def die(message, code=1):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompts", nargs="+", help="one or more captions, each in quotes")
    p.add_argument("--checkpoint", default="out/dalle.pt", help="written by train.py (default out/dalle.pt)")
    p.add_argument("--out", default="samples.png", help="the picture to write (default samples.png)")
    p.add_argument("--n", type=int, default=32, help="candidates drawn per prompt (paper: 512; default 32)")
    p.add_argument("--keep", type=int, default=4, help="candidates kept per prompt, ranked by CLIP (default 4)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1, the paper's)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest codes (paper: off)")
    p.add_argument("--seed", type=int, default=0, help="same seed, same pictures")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the first available)")
    p.add_argument("--image", default=None, help="an image prompt: its top rows are kept (Sec 3.3)")
    p.add_argument("--animate", action="store_true",
                   help="also write OUT.gif: the first prompt's best picture drawn token by token, in raster order")
    p.add_argument("--attention", action="store_true",
                   help="also write OUT_attention.png: where the image cells of that picture read each caption token")
    args = p.parse_args(argv)
    if any(not prompt.strip() for prompt in args.prompts):
        p.error("a prompt is empty: say what to draw, e.g. \"a red circle\"")
    if args.n < 1 or not 1 <= args.keep <= args.n:
        p.error(f"need --n >= 1 and 1 <= --keep <= --n, got --n {args.n} --keep {args.keep}")
    if not args.temperature > 0:
        p.error(f"--temperature must be positive, got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        p.error(f"--top-k must be at least 1, got {args.top_k}")
    return args


def image_prompt(model, path):
    """An image file -> the codes of its top rows (1, rows * w), as the prior learnt them (Sec 3.3): its centred square
    at the model's size, as training reads pictures, then the recipe's codes, its blank code included."""
    image = read_image(path, model.config.image_size)  # (3, S, S) uint8
    if image is None:
        die(f"cannot read the image prompt {path}: " + ("not a picture" if os.path.isfile(path) else "no such file"))
    return model.prompt_codes(model.image_codes(to_float(image[None], model.transformer.sos.device)))  # (1, rows * w)


def main(argv=None):
    args = parse_args(argv)
    if not os.path.exists(args.checkpoint):
        die(f"no checkpoint at {args.checkpoint}: train one first with `python train.py`", code=2)
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir) or not os.access(out_dir, os.W_OK):
        die(f"cannot write {args.out}: {out_dir} is not a writable folder")
    try:
        device = pick_device(args.device)
        model, ckpt = DALLE.load(args.checkpoint, device)
    except (CheckpointError, ValueError) as e:
        die(e)
    for convs in (model.vae, model.clip.visual):  # faster convolutions on CPUs, the same pixels (as train.py)
        convs.to(memory_format=torch.channels_last)
    c = model.config
    for prompt in args.prompts:
        n_tokens = len(model.tokenizer.encode(prompt.lower()))
        if n_tokens > c.text_seq_len:
            print(f"warning: {prompt[:40]!r}... is {n_tokens} tokens; only the first {c.text_seq_len} are used",
                  file=sys.stderr)
    prompt = image_prompt(model, args.image) if args.image else None  # (1, rows * w)
    images, scores, codes = model.generate(args.prompts, n=args.n, keep=args.keep, temperature=args.temperature,
                                    top_k=args.top_k, seed=args.seed, image_prompt=prompt)
    verdicts = [None] * len(args.prompts)  # the checker's, for captions of the Shapes world it can read
    if parse is not None:
        verdicts = [judge_all([t], pics[None])["all"][0] if parse(t) and pics.shape[-1] == SIZE else None
                    for t, pics in zip(args.prompts, images)]  # the checker reads the Shapes world's 64 px pictures
    given = "" if prompt is None else f", its top {prompt.shape[1] // c.grid_size} rows of codes from {args.image}"
    rows = []  # eight pictures a line, so that --keep 32 still fits a screen
    for text, pictures, row, v in zip(args.prompts, images, scores.tolist(), verdicts):
        labels = [f"{s:.3f}" + ("" if v is None else " right" if ok else " wrong")
                  for s, ok in zip(row, v if v is not None else [None] * len(row))]
        for i in range(0, len(row), 8):
            part = f" ({i + 1}-{min(i + 8, len(row))} of {len(row)})" if len(row) > 8 else ""
            rows.append((f'"{text}"{part}{given}', pictures[i:i + 8], labels[i:i + 8]))
    try:
        labelled_rows(rows, scale=3).save(args.out)
        stem = os.path.splitext(args.out)[0]
        if args.animate:  # the first prompt's best picture, as the prior drew it
            frames = drawing_frames(model, codes[0, 0])
            frames[0].save(f"{stem}.gif", save_all=True, append_images=frames[1:] + [frames[-1]] * 12, duration=60,
                           loop=0)
        if args.attention:
            attention_picture(model, args.prompts[0], codes[0, 0]).save(f"{stem}_attention.png")
    except (OSError, ValueError) as e:
        die(f"cannot write {args.out}: {e}")
    print(f"wrote {args.out}: best {args.keep} of {args.n} per prompt by CLIP ({args.checkpoint}, "
          f"stage {ckpt.get('stage', '?')})" + (f", {stem}.gif" if args.animate else "")
          + (f", {stem}_attention.png" if args.attention else ""))
    if parse is None:
        print("  (shapes.py is not beside sample.py: no checker to say which pictures are right)")
    for text, row, v in zip(args.prompts, scores.tolist(), verdicts):
        check = "" if v is None else f"; the checker reads {v.sum()} of {len(v)} right"
        print(f"  {text!r}: CLIP scores " + " ".join(f"{s:.3f}" for s in row) + check)


if __name__ == "__main__":
    main()
