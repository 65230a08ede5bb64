#!/usr/bin/env python3
"""Image folders: cifar-df's decoded pixels against Pillow's, and Pillow's decoding speed
(issue 22). Benchmark/measurement only, not a test.

    tar xf ../shared/data/cifar10-jpeg/train.tar.gz -C IMG          # IMG/train/CLASS/*.jpg
    /usr/bin/time -v cifar-df -q export --source IMG --out IMG.parquet --batch-size 1000
    python3 benches/folder_vs_pillow.py IMG IMG.parquet

cifar-df serves an image folder's training split in a shuffled order: the files sorted
(class folder, then name), then a Fisher-Yates shuffle driven by SplitMix64 seeded with
0x5eedf01d (src/dataset/folder.rs). This script rebuilds that order independently, decodes
each file with Pillow (what ../shared/tools/cifar10_jpeg.py uses to make the binary files),
and reports how many images are identical and how far the others are, then Pillow's
decoding rate on one core. Needs numpy, pillow and pyarrow.
"""
import os, sys, time
import numpy as np
import pyarrow.parquet as pq
from PIL import Image

M64 = (1 << 64) - 1

class SplitMix:
    def __init__(self, s): self.s = s
    def next(self):
        self.s = (self.s + 0x9E3779B97F4A7C15) & M64
        z = self.s
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        return z ^ (z >> 31)
    def below(self, n): return (self.next() * n) >> 64

root, parquet = sys.argv[1], sys.argv[2]
train = os.path.join(root, "train")
classes = sorted(d for d in os.listdir(train) if os.path.isdir(os.path.join(train, d)))
work = []
for k, c in enumerate(classes):
    d = os.path.join(train, c)
    for name in sorted(os.listdir(d)):
        if name.lower().endswith((".jpg", ".jpeg", ".png")):
            work.append((k, os.path.join(d, name)))
rng = SplitMix(0x5EEDF01D)
for i in range(len(work) - 1, 0, -1):
    j = rng.below(i + 1)
    work[i], work[j] = work[j], work[i]

t = pq.read_table(parquet)
labels = t["label"].to_numpy()
ours = np.asarray(t["image"].combine_chunks().values.to_numpy()).reshape(len(labels), 3072)
assert len(labels) == len(work), (len(labels), len(work))
assert (labels == np.array([k for k, _ in work])).all(), "labels differ: the order is not the documented one"

start = time.time()
pil = np.empty_like(ours)
for i, (_, path) in enumerate(work):
    img = np.asarray(Image.open(path).convert("RGB").resize((32, 32), Image.BILINEAR)
                     if Image.open(path).size != (32, 32) else Image.open(path).convert("RGB"))
    pil[i] = img.transpose(2, 0, 1).reshape(-1)
secs = time.time() - start
diff = np.abs(ours.astype(np.int16) - pil.astype(np.int16))
same = (diff.max(axis=1) == 0).mean()
print(f"{len(work)} images in the documented order (labels match)")
print(f"identical images: {same:.4f}; per value: mean |diff| {diff.mean():.4f}, "
      f"values that differ {(diff > 0).mean():.4f}, max |diff| {diff.max()}")
print(f"Pillow: {len(work) / secs:.0f} images/s on one core ({secs:.1f} s, decode + convert)")
