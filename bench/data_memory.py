"""Memory of the training data path: streamed DataLoader batches versus RAM-resident preprocessing.

Generates (once, cached) an ImageFolder of ``--n`` JPEG images at ``--size`` px in 10 class folders,
loads it with :func:`grft_train.data.load_splits`, and in one run measures:

- ``stream``: one pass of :class:`grft_train.loader.Batches` (decode + eval transform in loader
  workers) through a small ViT at the full resolution, over a subset of the train split and over
  all of it. Peak RSS of the main process and peak total PSS of the main process plus its loader
  workers (proportional set size: shared copy-on-write pages are counted once) are sampled every
  0.1 s. Flat memory means the peaks do not grow with the number of images.
- ``resident`` (the baseline): the former design, every image of a subset preprocessed once into
  one tensor, on a small subset only; its growth per image, times the full train split, is what
  that design would need.

Each measurement runs in a fresh process (so one phase's heap does not carry into the next).

    python -m bench.data_memory                    # 20,000 images at 224 px (~10 min on 2 cores)
    python -m bench.data_memory --n 2000 --out data_memory.jsonl
"""
from __future__ import annotations

import argparse
import os
import threading
import time
from pathlib import Path

import numpy as np
import torch

from bench.records import Records

__all__ = ["Peak", "main", "make_images", "resident", "stream_pass"]


class Peak:
    """Peak RSS of this process and peak PSS of this process + its children, sampled in a thread."""

    def __init__(self, interval: float = 0.1):
        import psutil

        self.proc, self.interval = psutil.Process(), interval
        self.rss = self.pss = 0
        self.children: set[int] = set()
        self._stop = threading.Event()

    def _pss(self) -> int:
        tot = 0
        for p in [self.proc, *self.proc.children(recursive=True)]:
            try:
                tot += p.memory_full_info().pss
                if p.pid != self.proc.pid:
                    self.children.add(p.pid)
            except Exception:  # noqa: BLE001 - a worker exiting between listing and reading
                pass
        return tot

    def _run(self):
        while not self._stop.is_set():
            self.rss = max(self.rss, self.proc.memory_info().rss)
            self.pss = max(self.pss, self._pss())
            self._stop.wait(self.interval)

    def __enter__(self):
        self.start_rss = self.proc.memory_info().rss
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def make_images(root: Path, n: int, size: int, classes: int = 10) -> Path:
    from PIL import Image

    done = root / f".complete-{n}-{size}"
    if done.is_file():
        return root
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    for i in range(n):
        c = i % classes
        d = root / f"class{c:02d}"
        d.mkdir(parents=True, exist_ok=True)
        phase = rng.uniform(0, 6.28, 3)
        img = np.stack([np.sin(6.28 * (xx * (c + 1) + yy * k) + phase[k]) for k in range(3)], -1)
        Image.fromarray(((img * 0.5 + 0.5) * 255).astype(np.uint8)).save(d / f"{i:06d}.jpg", quality=85)
    done.touch()
    return root


def stream_pass(ds, backbone, batch_size: int, workers: int | None) -> dict:
    from grft_train.loader import Batches, resolve_workers

    n_workers = resolve_workers(workers if workers is not None else ds.workers, len(ds), batch_size)
    t0 = time.time()
    n = 0
    with Peak() as pk, torch.no_grad():
        for x, y in Batches(ds, backbone, workers=workers).batches(batch_size, shuffle=True,
                                                                   rng=np.random.default_rng(0)):
            backbone(x)
            n += len(y)
    secs = time.time() - t0
    return {"images": n, "workers": n_workers, "worker_pids_seen": len(pk.children),
            "rss_start_mb": round(pk.start_rss / 2**20, 1), "rss_peak_mb": round(pk.rss / 2**20, 1),
            "pss_peak_total_mb": round(pk.pss / 2**20, 1), "seconds": round(secs, 1),
            "images_per_s": round(n / secs, 1)}


def resident(ds, backbone, chunk: int = 256) -> dict:
    """The former design: every image preprocessed once into one tensor held for the whole run."""
    with Peak() as pk:
        parts = [backbone.preprocess([ds[i][0] for i in range(s, min(s + chunk, len(ds)))])
                 for s in range(0, len(ds), chunk)]
        x = torch.cat(parts)
        del parts
        held = x.numel() * x.element_size()
    return {"images": len(ds), "tensor_mb": round(held / 2**20, 1), "rss_start_mb": round(pk.start_rss / 2**20, 1),
            "rss_peak_mb": round(pk.rss / 2**20, 1), "mb_per_image": round(held / len(ds) / 2**20, 4)}


def _phase(args) -> dict:
    """One measurement, in this (fresh) process: nothing earlier has touched its heap."""
    from grft_serve.core.backbones import TimmBackbone
    from grft_train.data import load_splits

    splits = load_splits({"format": "imagefolder", "path": args.root, "val_fraction": 0.05, "test_fraction": 0.05})
    torch.manual_seed(0)
    bb = TimmBackbone("vit_tiny_patch16_224", weights="random",
                      model_kwargs={"img_size": args.size, "patch_size": 32, "depth": 1}).eval()
    ds = splits.train.subset(range(min(args.count, len(splits.train))))
    if args.phase == "resident":
        return {"phase": "resident", **resident(ds, bb), "train_images": len(splits.train)}
    return {"phase": f"stream-{len(ds)}", **stream_pass(ds, bb, args.batch_size, args.workers)}


def main() -> None:
    import json
    import subprocess
    import sys

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20000, help="generated images")
    ap.add_argument("--size", type=int, default=224, help="image side (px) = model input side")
    ap.add_argument("--data", default=os.environ.get("GRFT_BENCH_IMAGES", "/tmp/grft-bench-images"),
                    help="where the generated ImageFolder is cached")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=None, help="loader workers (default: the data layer's choice)")
    ap.add_argument("--resident-n", type=int, default=1000, help="images of the RAM-resident baseline")
    ap.add_argument("--out", default=None, help="JSON-lines file (default: stdout)")
    ap.add_argument("--phase", choices=["resident", "stream"], help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    ap.add_argument("--count", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.phase:
        print(json.dumps(_phase(args)), flush=True)
        return

    rec = Records(args.out)
    t0 = time.time()
    root = make_images(Path(args.data) / f"n{args.n}-s{args.size}", args.n, args.size)
    rec.emit({"phase": "generate", "images": args.n, "size": args.size, "seconds": round(time.time() - t0, 1)})

    def run(phase: str, count: int) -> dict:
        cmd = [sys.executable, "-m", "bench.data_memory", "--phase", phase, "--root", str(root), "--count", str(count),
               "--size", str(args.size), "--batch-size", str(args.batch_size)]
        if args.workers is not None:
            cmd += ["--workers", str(args.workers)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        rec.emit(r)
        return r

    base = run("resident", args.resident_n)
    train = base["train_images"]
    small = run("stream", max(args.resident_n, train // 10))
    full = run("stream", train)
    projected = base["mb_per_image"] * train
    rec.emit({"phase": "summary", "train_images": train, "resident_projected_full_train_mb": round(projected, 1),
              "stream_rss_peak_full_over_subset": round(full["rss_peak_mb"] / small["rss_peak_mb"], 3),
              "stream_pss_peak_full_over_subset": round(full["pss_peak_total_mb"] / small["pss_peak_total_mb"], 3),
              "resident_projected_over_stream_pss_peak": round(projected / full["pss_peak_total_mb"], 1)})
    rec.close()


if __name__ == "__main__":
    main()
