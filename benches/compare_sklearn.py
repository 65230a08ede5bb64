#!/usr/bin/env python3
"""Side by side: cifar-df's `logreg` and scikit-learn's SGDClassifier(log_loss), trained the
same way on the same stream (run by hand, not in CI; needs numpy and scikit-learn).

Both see the training split in file order, in batches of 128 (remainders carried across
files, as the stream server batches), for 5 epochs, preprocessed as sql/train.sql does:
horizontal flip with p = 0.345, then Normalize with the CIFAR-10 channel means and stds.
scikit-learn learns with partial_fit on every batch; cifar-df with `cifar-df train`.

usage: python3 benches/compare_sklearn.py [DATA_DIR] [path/to/cifar-df]
"""
import os, subprocess, sys, tempfile, time
import numpy as np
from sklearn.linear_model import SGDClassifier

data = sys.argv[1] if len(sys.argv) > 1 else "../shared/data/cifar10-mini"
exe = sys.argv[2] if len(sys.argv) > 2 else "target/release/cifar-df"
EPOCHS, BATCH = 5, 128
MEAN = np.array([0.4914, 0.4822, 0.4465], dtype=np.float32).reshape(1, 3, 1, 1)
STD = np.array([0.2470, 0.2435, 0.2616], dtype=np.float32).reshape(1, 3, 1, 1)

def load(names):
    raw = b"".join(open(os.path.join(data, "cifar-10-batches-bin", n), "rb").read() for n in names)
    rec = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3073)
    return rec[:, 1:].reshape(-1, 3, 32, 32), rec[:, 0].astype(np.int64)

def normalize(x):
    return ((x.astype(np.float32) / 255.0 - MEAN) / STD).reshape(len(x), -1)

xtr, ytr = load([f"data_batch_{i}.bin" for i in range(1, 6)])
xte, yte = load(["test_batch.bin"])
rng = np.random.default_rng(0)
clf = SGDClassifier(loss="log_loss", alpha=1e-4, random_state=0)
t = time.perf_counter()
fit_time = 0.0
for epoch in range(EPOCHS):
    for s in range(0, len(xtr), BATCH):
        xb = xtr[s:s + BATCH].copy()
        flip = rng.random(len(xb)) < 0.345
        xb[flip] = xb[flip][:, :, :, ::-1]
        xb = normalize(xb)
        f = time.perf_counter()
        clf.partial_fit(xb, ytr[s:s + BATCH], classes=np.arange(10))
        fit_time += time.perf_counter() - f
total = time.perf_counter() - t
sk_acc = (clf.predict(normalize(xte)) == yte).mean()
n = EPOCHS * len(xtr)
print(f"scikit-learn SGDClassifier(log_loss): test accuracy {sk_acc:.4f}; "
      f"fit {n / fit_time:,.0f} images/s; pipeline (numpy preprocessing + fit) {n / total:,.0f} images/s")

with tempfile.TemporaryDirectory() as runs:
    t = time.perf_counter()
    out = subprocess.run([exe, "-q", "train", "--model", "logreg", "--data", data, "--epochs", str(EPOCHS),
                          "--batch-size", str(BATCH), "--run", "cmp", "--runs", runs],
                         check=True, capture_output=True, text=True).stdout
    train_s = time.perf_counter() - t
    pred = subprocess.run([exe, "-q", "predict", "--run", "cmp", "--runs", runs, "--data", data],
                          check=True, capture_output=True, text=True).stdout
    acc = float(pred.split("accuracy ")[1].split()[0])
    print(f"cifar-df logreg: test accuracy {acc:.4f}; whole train command (load, SQL preprocessing, "
          f"fit, metrics, Parquet) {n / train_s:,.0f} images/s")
