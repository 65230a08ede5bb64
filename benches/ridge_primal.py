#!/usr/bin/env python3
"""Ridge regression in the primal on a cifar-df features cache, in numpy: the validation
accuracy per lambda (relative to the mean squared norm of a feature vector, as `ridge`'s
lambda), to choose the full-scale features model (issue 22). Benchmark/selection only.

    cifar-df features --data VAL --config configs/patches.toml --out F   # VAL: cifar10_jpeg.py --validation
    OPENBLAS_NUM_THREADS=1 python3 benches/ridge_primal.py F 0.01 0.03 0.1

(OPENBLAS_NUM_THREADS=1: the bundled OpenBLAS's threaded Cholesky crashed on the
18,432 x 18,432 matrix here.) Needs numpy, scipy and pyarrow; about 12 GB of memory for
40,000 images of 18,432 features.
"""
import sys, time
import numpy as np
import pyarrow.dataset as ds
import scipy.linalg as sl

def load(d):
    t = ds.dataset(d, format="parquet").to_table(columns=["label", "flipped", "features"])
    keep = ~t["flipped"].to_numpy(zero_copy_only=False)
    y = t["label"].to_numpy()[keep]
    f = t["features"].combine_chunks()
    X = f.values.to_numpy().reshape(len(keep), -1)[keep]
    return np.ascontiguousarray(X, dtype=np.float32), y


def main():
    F = sys.argv[1]
    lams = [float(v) for v in sys.argv[2:]] or [1e-3, 3e-3, 1e-2, 3e-2, 1e-1]
    t = time.time()
    Xtr, ytr = load(F + "/train")
    Xva, yva = load(F + "/test")
    n, d = Xtr.shape
    print(f"loaded {n} x {d} train, {len(yva)} val in {time.time()-t:.1f}s", flush=True)
    Y = -np.ones((n, 10), np.float32); Y[np.arange(n), ytr] = 1
    t = time.time()
    A = Xtr.T @ Xtr
    B = (Xtr.T @ Y).astype(np.float64)
    print(f"XtX in {time.time()-t:.1f}s", flush=True)
    md = np.trace(A) / n
    for lam in lams:
        t = time.time()
        M = A.astype(np.float64)
        M[np.diag_indices(d)] += lam * md
        L = np.linalg.cholesky(M)
        del M
        Z = sl.solve_triangular(L, B, lower=True, check_finite=False)
        W = sl.solve_triangular(L, Z, lower=True, trans='T', check_finite=False).astype(np.float32)
        del L
        acc = ((Xva @ W).argmax(1) == yva).mean()
        tr = ((Xtr[:5000] @ W).argmax(1) == ytr[:5000]).mean()
        print(f"lambda {lam:g}: val {acc:.4f} train(5k) {tr:.4f} solve {time.time()-t:.1f}s", flush=True)


if __name__ == "__main__":
    main()
