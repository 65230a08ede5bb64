#!/usr/bin/env python3
"""Nyström kernel ridge (as `ridge` with `nystrom = true`) on a cifar-df features cache, in
numpy: the validation accuracy of the default features model and of variants of its
features, to choose them (issue 22). Benchmark/selection only, never a test.

    cifar-df features --data VAL --config configs/patches.toml --out F   # VAL: cifar10_jpeg.py --validation
    python3 benches/nystrom_numpy.py F [--m 12000] [--gamma 0.4] [--lam 0.01 0.03] [--power 1.0 0.5]
        [--pca 0 4096] [--holdout 1000] [--train N] [--l2]

The first `m` training images are the landmarks; γ is `gamma` over their mean squared
distance, the ridge `lam` times the kernel's mean diagonal (1); kernel rows are centred by
the landmarks' mean row, with an unpenalised intercept: the model's own solve. `--power p`
re-scores with features `sign(x)·|x|^p` before standardisation (x recovered from the cache's
standardised features with the extractor's `feature_mean` / `feature_std`), each variant
standardised again over the landmarks (a cache written with `power = 0.5` already holds the
square roots: score it with the default `--power 1`). `--pca k` projects both sets on the first
k principal components of the landmarks; `--holdout N` validates on the last N training
images (for a cache of the 5,000-image sample, whose test split is the real one). Needs numpy, scipy and pyarrow; about 10 GB for
40,000 images and m = 12,000.
"""
import argparse, json, os, time
import numpy as np
import scipy.linalg as sl

from ridge_primal import load  # the cache's unflipped rows, as f32 and labels


def read_safetensors(path):
    """The f32 tensors of a safetensors file (8-byte header length, JSON header, data)."""
    raw = open(path, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    head = json.loads(raw[8:8 + n])
    out = {}
    for name, t in head.items():
        if name == "__metadata__" or t["dtype"] != "F32":
            continue
        a, b = t["data_offsets"]
        out[name] = np.frombuffer(raw[8 + n + a:8 + n + b], np.float32).reshape(t["shape"])
    return out


def sqdist(a, b, an, bn):
    d = an[:, None] + bn[None, :] - 2.0 * (a @ b.T)
    return np.maximum(d, 0.0, out=d)


def nystrom(Xtr, ytr, Xva, yva, m, gamma, lams, classes, chunk=4096):
    t0 = time.time()
    L = Xtr[:m]
    ln = (L.astype(np.float64) ** 2).sum(1).astype(np.float32)
    dll = sqdist(L, L, ln, ln)
    g = gamma / dll.mean()
    Kll = np.exp(-g * dll, dtype=np.float32)
    del dll
    c = Kll.mean(0)
    p = m + 1
    S = np.zeros((p, p))
    T = np.zeros((p, classes))
    for s in range(0, len(Xtr), chunk):
        x = Xtr[s:s + chunk]
        xn = (x.astype(np.float64) ** 2).sum(1).astype(np.float32)
        k = np.exp(-g * sqdist(x, L, xn, ln)) - c
        phi = np.hstack([k, np.ones((len(x), 1), np.float32)]).astype(np.float64)
        # By blocks of rows: OpenBLAS 0.3.31's syrk (what `phi.T @ phi` calls) crashes
        # beyond about 16,000 columns.
        for r in range(0, p, 4096):
            S[r:r + 4096] += phi[:, r:r + 4096].T @ phi
        Y = -np.ones((len(x), classes))
        Y[np.arange(len(x)), ytr[s:s + chunk]] = 1
        T += phi.T @ Y
    Kv = []
    for s in range(0, len(Xva), chunk):
        x = Xva[s:s + chunk]
        xn = (x.astype(np.float64) ** 2).sum(1).astype(np.float32)
        Kv.append(np.exp(-g * sqdist(x, L, xn, ln)) - c)
    Kv = np.vstack(Kv)
    t_sums = time.time() - t0
    out = {}
    for lam in lams:
        A = S.copy()
        A[:m, :m] += lam * Kll
        sol = sl.solve(A, T, assume_a="pos", check_finite=False)
        z = Kv @ sol[:m].astype(np.float32) + sol[m].astype(np.float32)
        out[lam] = float((z.argmax(1) == yva).mean())
    return out, t_sums


def project(tr, va, n, k):
    """Both sets on the first k principal components of tr[:n], from the n x n Gram matrix."""
    t = time.time()
    mu = tr[:n].mean(0)
    X = (tr[:n] - mu).astype(np.float64)
    w, U = np.linalg.eigh(X @ X.T)
    top = np.argsort(w)[::-1][:k]
    P = (X.T @ (U[:, top] / np.sqrt(np.maximum(w[top], 1e-12)))).astype(np.float32)
    out = [np.ascontiguousarray((a - mu) @ P) for a in (tr, va)]
    kept = w[top].sum() / w.sum()
    print(f"pca {k}: {kept:.3f} of the variance, {time.time() - t:.1f}s", flush=True)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("cache")
    ap.add_argument("--m", type=int, default=12000)
    ap.add_argument("--gamma", type=float, nargs="+", default=[0.4])
    ap.add_argument("--lam", type=float, nargs="+", default=[0.03])
    ap.add_argument("--power", type=float, nargs="+", default=[1.0])
    ap.add_argument("--train", type=int, default=0, help="use only the first N training images")
    ap.add_argument("--l2", action="store_true", help="also score each variant with its rows scaled to unit norm")
    ap.add_argument("--pca", type=int, nargs="+", default=[0],
                    help="also score each variant projected on its first K principal components "
                         "(fitted on the landmarks; 0: no projection)")
    ap.add_argument("--holdout", type=int, default=0,
                    help="validate on the last N training images instead of the cache's test split")
    a = ap.parse_args()
    t = time.time()
    Xtr, ytr = load(os.path.join(a.cache, "train"))
    Xva, yva = load(os.path.join(a.cache, "test"))
    if a.holdout:
        Xva, yva = Xtr[-a.holdout:], ytr[-a.holdout:]
        Xtr, ytr = Xtr[: -a.holdout], ytr[: -a.holdout]
    if a.train:
        Xtr, ytr = Xtr[: a.train], ytr[: a.train]
    classes = int(max(ytr.max(), yva.max())) + 1
    print(f"loaded {Xtr.shape} train, {Xva.shape} validation in {time.time() - t:.1f}s", flush=True)
    if any(pw != 1.0 for pw in a.power):
        tensors = read_safetensors(os.path.join(a.cache, "extractor", "extractor.safetensors"))
        mean, std = tensors["feature_mean"], tensors["feature_std"]
    for pw in a.power:
        if pw == 1.0:
            tr, va = Xtr, Xva
        else:
            tr = Xtr * std + mean
            va = Xva * std + mean
            tr = np.sign(tr) * np.abs(tr) ** pw
            va = np.sign(va) * np.abs(va) ** pw
            mu, sd = tr[: min(a.m, 1000)].mean(0), tr[: min(a.m, 1000)].std(0) + 1e-6
            tr = ((tr - mu) / sd).astype(np.float32)
            va = ((va - mu) / sd).astype(np.float32)
        for l2 in [False, True] if a.l2 else [False]:
            if l2:
                tr = tr / np.linalg.norm(tr, axis=1, keepdims=True)
                va = va / np.linalg.norm(va, axis=1, keepdims=True)
            for k in a.pca:
                ptr, pva = (tr, va) if k == 0 else project(tr, va, min(a.m, 12000, len(tr)), k)
                for g in a.gamma:
                    accs, ts = nystrom(ptr, ytr, pva, yva, a.m, g, a.lam, classes)
                    for lam, acc in accs.items():
                        print(json.dumps({"power": pw, "l2": l2, "pca": k, "m": a.m, "gamma": g,
                                          "lam": lam, "train": len(tr), "val_acc": round(acc, 4),
                                          "seconds": round(ts, 1)}), flush=True)


if __name__ == "__main__":
    main()
