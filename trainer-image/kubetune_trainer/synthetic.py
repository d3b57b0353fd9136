"""A tiny, synthetic but learnable text-to-image dataset: coloured shapes with exact captions.

    python -m kubetune_trainer.synthetic OUT_DIR --n 256 [--eval-n 64] [--size 64] [--seed 0]

writes ``OUT_DIR/images/*.png``, ``OUT_DIR/train.csv`` and ``OUT_DIR/eval.csv`` (columns ``text,image``,
image paths relative to the CSV). Captions look like "a red circle on a white background": colour × shape ×
background = 48 distinct captions, each shape drawn at a random position and size, so a model must learn
colour, shape and background to retrieve the right images. Pure Pillow (no torch), deterministic per seed.
"""

from __future__ import annotations

import argparse
import csv
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (235, 210, 20),
}
SHAPES = ("circle", "square", "triangle", "cross")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"white": (255, 255, 255), "black": (0, 0, 0),
                                                "grey": (128, 128, 128)}


def caption(colour: str, shape: str, background: str) -> str:
    return f"a {colour} {shape} on a {background} background"


def draw(colour: str, shape: str, background: str, size: int, rng: random.Random) -> Image.Image:
    image = Image.new("RGB", (size, size), BACKGROUNDS[background])
    pen = ImageDraw.Draw(image)
    extent = rng.randint(size // 3, (size * 2) // 3)
    x0 = rng.randint(0, size - extent)
    y0 = rng.randint(0, size - extent)
    x1, y1 = x0 + extent, y0 + extent
    fill = COLOURS[colour]
    if shape == "circle":
        pen.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape == "square":
        pen.rectangle((x0, y0, x1, y1), fill=fill)
    elif shape == "triangle":
        pen.polygon([(x0, y1), ((x0 + x1) // 2, y0), (x1, y1)], fill=fill)
    else:
        bar = max(2, extent // 4)
        mid_x, mid_y = (x0 + x1) // 2, (y0 + y1) // 2
        pen.rectangle((mid_x - bar // 2, y0, mid_x + bar // 2, y1), fill=fill)
        pen.rectangle((x0, mid_y - bar // 2, x1, mid_y + bar // 2), fill=fill)
    return image


def write_split(out_dir: Path, split: str, n: int, size: int, rng: random.Random) -> Path:
    images = out_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    combos = [(c, s, b) for c in COLOURS for s in SHAPES for b in BACKGROUNDS]
    csv_path = out_dir / f"{split}.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "image"])
        for i in range(n):
            # cycle through every combination so that each caption appears about equally often
            colour, shape, background = combos[i % len(combos)] if i < len(combos) else rng.choice(combos)
            name = f"{split}-{i:05d}.png"
            draw(colour, shape, background, size, rng).save(images / name)
            writer.writerow([caption(colour, shape, background), f"images/{name}"])
    return csv_path


def generate(out_dir: str | Path, n: int = 256, eval_n: int = 64, size: int = 64, seed: int = 0) -> dict[str, Path]:
    """Write the dataset; returns {"train": path, "eval": path} to the CSVs."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return {"train": write_split(out, "train", n, size, random.Random(seed)),
            "eval": write_split(out, "eval", eval_n, size, random.Random(seed + 1_000_003))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubetune_trainer.synthetic", description=__doc__.split("\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--n", type=int, default=256, help="training pairs")
    parser.add_argument("--eval-n", type=int, default=64, help="evaluation pairs")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    paths = generate(args.out_dir, args.n, args.eval_n, args.size, args.seed)
    print(f"wrote {paths['train']} ({args.n} pairs) and {paths['eval']} ({args.eval_n} pairs)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
