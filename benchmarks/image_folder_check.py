"""Time of the whole-folder check an image folder gets before training (every file decoded).

Writes N small PNGs (80 % under train/, 20 % under val/, 10 classes) into a temporary folder and
times ``image_folder_info`` (the check runs there, once per folder), one thread: the first scan
(every file decoded, in ``--workers`` threads from 1,000 files on) and the next one of the
unchanged folder (the kept scan: files listed and stated, none decoded).

    python benchmarks/image_folder_check.py                  # 5,000 28x28 greyscale PNGs
    python benchmarks/image_folder_check.py --side 64 --rgb  # 5,000 64x64 colour PNGs
    python benchmarks/image_folder_check.py --images 20000 --side 256 --rgb --ext jpg --workers 2
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from s2ap_lightning.data import datasets


def write_folder(root: Path, n: int, side: int, rgb: bool, ext: str = "png") -> None:
    rng = np.random.default_rng(0)
    shape = (side, side, 3) if rgb else (side, side)
    for i in range(n):
        split = "train" if i < 0.8 * n else "val"
        folder = root / split / f"class{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(folder / f"{i}.{ext}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--side", type=int, default=28)
    parser.add_argument("--rgb", action="store_true")
    parser.add_argument("--ext", default="png", choices=["png", "jpg"], help="file format (jpg: noise JPEGs)")
    parser.add_argument("--workers", type=int, default=0, help="decoding threads (data.num_workers)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["S2AP_CACHE_DIR"] = str(Path(tmp) / "cache")
        data = Path(tmp) / "data"
        write_folder(data, args.images, args.side, args.rgb, args.ext)
        seconds = []
        for _ in range(2):
            datasets._SCANS.clear()  # the in-process memo; the second scan reads the kept one
            started = time.perf_counter()
            info = datasets.image_folder_info(data, None, None, workers=args.workers)
            seconds.append(time.perf_counter() - started)
    kind = "RGB" if args.rgb else "greyscale"
    print(
        f"{args.images} {args.side}x{args.side} {kind} {args.ext.upper()}s, {args.workers} workers: "
        f"decoded and checked in {seconds[0]:.2f} s, unchanged folder from the kept scan in "
        f"{seconds[1]:.2f} s ({info})"
    )


if __name__ == "__main__":
    main()
