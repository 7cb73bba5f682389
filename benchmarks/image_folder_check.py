"""Time of the whole-folder check an image folder gets before training (every file decoded).

Writes N small PNGs (80 % under train/, 20 % under val/, 10 classes) into a temporary folder and
times ``image_folder_info`` (the check runs there, once per folder), one thread.

    python benchmarks/image_folder_check.py                  # 5,000 28x28 greyscale PNGs
    python benchmarks/image_folder_check.py --side 64 --rgb  # 5,000 64x64 colour PNGs
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from s2ap_lightning.data.datasets import image_folder_info


def write_folder(root: Path, n: int, side: int, rgb: bool) -> None:
    rng = np.random.default_rng(0)
    shape = (side, side, 3) if rgb else (side, side)
    for i in range(n):
        split = "train" if i < 0.8 * n else "val"
        folder = root / split / f"class{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(folder / f"{i}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--side", type=int, default=28)
    parser.add_argument("--rgb", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        write_folder(Path(tmp), args.images, args.side, args.rgb)
        started = time.perf_counter()
        info = image_folder_info(tmp, None, None)
        seconds = time.perf_counter() - started
    kind = "RGB" if args.rgb else "greyscale"
    print(f"{args.images} {args.side}x{args.side} {kind} PNGs checked in {seconds:.2f} s ({info})")


if __name__ == "__main__":
    main()
