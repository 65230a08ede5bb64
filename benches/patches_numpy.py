"""The numpy reference of the random-patches method, for the side-by-side in docs/features.md.

  python3 benches/patches_numpy.py ../shared/data/cifar10-mini

K = 2,048 random whitened 6x6 patches (1,024 sampled + their mirror images), per-patch
brightness/contrast normalisation, ZCA whitening (eps 0.01), soft threshold 0.25 with a
polarity split, 3x3 average pooling, standardisation, the training images *and their
flipped copies*, linear ridge regression solved in the dual (lambda 0.03 x mean diagonal,
chosen on a validation split of the training images), and a flip-averaged test. Prints
the test accuracy and the wall time of the whole job (fit, features, train, test).
"""
import os
import sys
import time

import numpy as np

P, K, ALPHA, EPS, LAM, SEED = 6, 2048, 0.25, 0.01, 0.03, 0


def load(d, f):
    b = np.fromfile(os.path.join(d, f), dtype=np.uint8).reshape(-1, 3073)
    return b[:, 1:].reshape(-1, 3, 32, 32), b[:, 0].astype(np.int64)


def norm(p):
    return (p - p.mean(-1, keepdims=True)) / np.sqrt(p.var(-1, keepdims=True) + 10.0)


def main():
    d = os.path.join(sys.argv[1], "cifar-10-batches-bin")
    t0 = time.time()
    tr = [load(d, f"data_batch_{i}.bin") for i in range(1, 6)]
    xtr = np.concatenate([a for a, _ in tr]).astype(np.float32)
    ytr = np.concatenate([b for _, b in tr])
    xte, yte = load(d, "test_batch.bin")
    xte = xte.astype(np.float32)
    rng = np.random.default_rng(SEED)
    S = 32 - P + 1
    mirror = np.arange(3 * P * P).reshape(3, P, P)[:, :, ::-1].reshape(-1)
    n = 100_000
    ii, yy, xx = rng.integers(0, len(xtr), n), rng.integers(0, S, n), rng.integers(0, S, n)
    samp = norm(np.stack([xtr[i, :, y : y + P, x : x + P].reshape(-1) for i, y, x in zip(ii, yy, xx)]))
    aug = np.concatenate([samp, samp[:, mirror]])
    mu = aug.mean(0)
    lam, U = np.linalg.eigh(np.cov(aug - mu, rowvar=False))
    W = (U / np.sqrt(lam + EPS)) @ U.T
    atoms = ((samp - mu) @ W.T)[rng.choice(n, K // 2, replace=False)]
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    atoms = np.concatenate([atoms, atoms[:, mirror]])
    F = (atoms @ W).astype(np.float32)
    b = (atoms @ (W @ mu)).astype(np.float32)

    def encode(X):
        out = []
        for c in range(0, len(X), 50):
            win = np.lib.stride_tricks.sliding_window_view(X[c : c + 50], (P, P), axis=(2, 3))
            p = norm(win.transpose(0, 2, 3, 1, 4, 5).reshape(-1, 3 * P * P))
            r = (p @ F.T - b).reshape(-1, S, S, K)
            f = []
            for code in (np.maximum(r - ALPHA, 0), np.maximum(-r - ALPHA, 0)):
                for gi in range(3):
                    for gj in range(3):
                        f.append(code[:, 9 * gi : 9 * gi + 9, 9 * gj : 9 * gj + 9].mean((1, 2)))
            out.append(np.concatenate(f, axis=1))
        return np.concatenate(out)

    flip = lambda X: X[:, :, :, ::-1]
    ftr = np.concatenate([encode(xtr), encode(flip(xtr))])
    fte, ftef = encode(xte), encode(flip(xte))
    m, s = ftr.mean(0), ftr.std(0) + 1e-3
    ftr, fte, ftef = (ftr - m) / s, (fte - m) / s, (ftef - m) / s
    y2 = np.concatenate([ytr, ytr])
    G = ftr @ ftr.T
    Y = np.eye(10)[y2] * 2 - 1
    A = np.linalg.solve(G + LAM * np.trace(G) / len(G) * np.eye(len(G)), Y)
    scores = (fte @ ftr.T) @ A + (ftef @ ftr.T) @ A
    acc = (scores.argmax(1) == yte).mean()
    print(f"numpy reference: test accuracy {acc:.4f}, {time.time() - t0:.1f} s for the whole job")


if __name__ == "__main__":
    main()
