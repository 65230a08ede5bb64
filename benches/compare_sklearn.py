#!/usr/bin/env python3
"""Side by side: every cifar-df model and its scikit-learn counterpart, trained the same way
on the same stream (run by hand, not in CI; needs numpy and scikit-learn).

Both see the training split in file order, in batches of 128 (remainders carried across
files, as the stream server batches), for 5 epochs, preprocessed as sql/train.sql does:
horizontal flip with p = 0.345, then Normalize with the CIFAR-10 channel means and stds.
scikit-learn learns with partial_fit on every batch; cifar-df with `cifar-df train`. Both
are then scored on the test split (images neither has seen).

  logreg  vs SGDClassifier(loss="log_loss", alpha=1e-4)
  svm     vs SGDClassifier(loss="hinge", alpha=3e-5, average=True)  (configs/svm.toml: ASGD)
  svm-last vs SGDClassifier(loss="hinge", alpha=3e-5)         (configs/svm.toml, --set average=0)
  mlp     vs MLPClassifier((128, 64), adam, lr 3e-4, alpha 5e-4, batch 128)  (configs/mlp.toml)
  kmeans  vs MiniBatchKMeans(10) + majority label per cluster (configs/kmeans.toml)

"fit" is the time spent in partial_fit (scikit-learn) or in the model's partial_fit
(cifar-df, as `cifar-df train` reports it); "pipeline" is preprocessing + fit for
scikit-learn and the whole `cifar-df train` command (load, SQL, fit, metrics, Parquet).

usage: python3 benches/compare_sklearn.py [DATA_DIR] [path/to/cifar-df] [MODEL ...]
"""
import os, re, subprocess, sys, tempfile, time
import numpy as np
from sklearn.cluster import MiniBatchKMeans
from sklearn.linear_model import SGDClassifier
from sklearn.neural_network import MLPClassifier

data = sys.argv[1] if len(sys.argv) > 1 else "../shared/data/cifar10-mini"
exe = sys.argv[2] if len(sys.argv) > 2 else "target/release/cifar-df"
only = sys.argv[3:] or ["logreg", "svm", "svm-last", "mlp", "kmeans"]
EPOCHS, BATCH = 5, 128
MEAN = np.array([0.4914, 0.4822, 0.4465], dtype=np.float32).reshape(1, 3, 1, 1)
STD = np.array([0.2470, 0.2435, 0.2616], dtype=np.float32).reshape(1, 3, 1, 1)
CONFIGS = {"logreg": ["configs/logreg.toml"], "svm": ["configs/svm.toml"],
           "svm-last": ["configs/svm.toml", "--set", "average=0"],
           "mlp": ["configs/mlp.toml"], "kmeans": ["configs/kmeans.toml"]}


def load(names):
    raw = b"".join(open(os.path.join(data, "cifar-10-batches-bin", n), "rb").read() for n in names)
    rec = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3073)
    return rec[:, 1:].reshape(-1, 3, 32, 32), rec[:, 0].astype(np.int64)


def normalize(x):
    return ((x.astype(np.float32) / 255.0 - MEAN) / STD).reshape(len(x), -1)


class KMeansClassifier:
    """MiniBatchKMeans whose clusters predict the majority training label."""

    def __init__(self):
        self.km = MiniBatchKMeans(n_clusters=10, random_state=0, n_init=1)
        self.counts = np.zeros((10, 10))

    def partial_fit(self, x, y, classes=None):
        self.km.partial_fit(x)
        np.add.at(self.counts, (self.km.labels_, y), 1)

    def predict(self, x):
        return self.counts.argmax(axis=1)[self.km.predict(x)]


def sklearn_model(name):
    if name == "logreg":
        return SGDClassifier(loss="log_loss", alpha=1e-4, random_state=0)
    if name == "svm":
        return SGDClassifier(loss="hinge", alpha=3e-5, average=True, random_state=0)
    if name == "svm-last":
        return SGDClassifier(loss="hinge", alpha=3e-5, random_state=0)
    if name == "mlp":
        return MLPClassifier(hidden_layer_sizes=(128, 64), solver="adam", learning_rate_init=3e-4,
                             alpha=5e-4, batch_size=BATCH, random_state=0)
    return KMeansClassifier()


xtr, ytr = load([f"data_batch_{i}.bin" for i in range(1, 6)])
xte, yte = load(["test_batch.bin"])
xte_n = normalize(xte)
n = EPOCHS * len(xtr)
rows = []
for name in only:
    rng = np.random.default_rng(0)
    clf = sklearn_model(name)
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
    sk_acc = (clf.predict(xte_n) == yte).mean()

    with tempfile.TemporaryDirectory() as runs:
        t = time.perf_counter()
        out = subprocess.run([exe, "-q", "train", "--config", *CONFIGS[name], "--data", data,
                              "--epochs", str(EPOCHS), "--batch-size", str(BATCH), "--run", "cmp",
                              "--runs", runs], check=True, capture_output=True, text=True).stdout
        train_s = time.perf_counter() - t
        pred = subprocess.run([exe, "-q", "predict", "--run", "cmp", "--runs", runs, "--data", data],
                              check=True, capture_output=True, text=True).stdout
    acc = float(pred.split("accuracy ")[1].split()[0])
    m = re.search(r"model fit ([\d,]+) images/s", out)
    df_fit = float(m.group(1).replace(",", "")) if m else float("nan")
    rows.append((name, sk_acc, acc, n / fit_time, df_fit, n / total, n / train_s))
    print(f"{name}: scikit-learn acc {sk_acc:.4f} fit {n / fit_time:,.0f}/s | "
          f"cifar-df acc {acc:.4f} fit {df_fit:,.0f}/s train command {n / train_s:,.0f}/s", flush=True)

print()
print("| model | scikit-learn test acc | cifar-df test acc | scikit-learn fit img/s | "
      "cifar-df fit img/s | fit speed-up | scikit-learn pipeline img/s | cifar-df train command img/s |")
print("|---|---|---|---|---|---|---|---|")
for name, sa, a, sf, df, sp, dp in rows:
    print(f"| {name} | {sa:.4f} | {a:.4f} | {sf:,.0f} | {df:,.0f} | {df / sf:.1f}x | {sp:,.0f} | {dp:,.0f} |")
