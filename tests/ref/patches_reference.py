"""Independent numpy reference for cifar-df's patch extractor (src/features/patches.rs).

Usage: patches_reference.py EXTRACTOR_DIR IMAGES.u8 FEATURES.f32
  EXTRACTOR_DIR  a folder written by cifar-df (extractor.safetensors + extractor.json)
  IMAGES.u8      n raw CIFAR images (3072 bytes each: red plane, green, blue)
  FEATURES.f32   cifar-df's features of those images, little-endian float32, n x width

Recomputes (1) the ZCA whitening from the saved covariance and (2) every feature of every
image (normalisation, whitening, encoding, pooling, the flip-invariant fold and the
standardisation) with plain numpy, and exits non-zero if either differs from cifar-df's by
more than 1e-4 (relative to the largest value).
"""
import json
import struct
import sys

import numpy as np


def read_safetensors(path):
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        assert info["dtype"] == "F32", info
        a, b = info["data_offsets"]
        out[name] = np.frombuffer(raw[8 + n + a : 8 + n + b], dtype="<f4").reshape(info["shape"])
    return out


def cells_of(x, s, g):
    left = lambda x: x * g // s
    if 2 * x + 1 < s:
        return [left(x)]
    if 2 * x + 1 > s:
        return [g - 1 - left(s - 1 - x)]
    a, b = left(x), g - 1 - left(x)
    return sorted({a, b})


def main():
    folder, images_path, features_path = sys.argv[1:4]
    meta = json.load(open(f"{folder}/extractor.json"))
    p = meta["params"]
    t = read_safetensors(f"{folder}/extractor.safetensors")
    P, K, G, alpha, eps = p["patch"], p["atoms"], p["grid"], p["alpha"], p["eps"]
    enc, inv = p["encoding"], p["invariant"]

    # (1) whitening: W = U diag(1/sqrt(lambda + eps)) U^T of the saved covariance.
    cov = t["cov"].astype(np.float64)
    lam, U = np.linalg.eigh(cov)
    c = p.get("components", 0) or len(lam)
    lam, U = lam[len(lam) - c :], U[:, len(lam) - c :]  # the top principal components
    W = (U / np.sqrt(np.maximum(lam, 0) + eps)) @ U.T
    scale = np.abs(W).max()
    werr = np.abs(W - t["whiten"]).max() / scale
    print(f"whitening: max relative difference {werr:.2e}")

    # (2) features.
    imgs = np.fromfile(images_path, dtype=np.uint8).reshape(-1, 3, 32, 32).astype(np.float64)
    n = imgs.shape[0]
    S = 32 - P + 1
    win = np.lib.stride_tricks.sliding_window_view(imgs, (P, P), axis=(2, 3))  # n,3,S,S,P,P
    pat = win.transpose(0, 2, 3, 1, 4, 5).reshape(n, S, S, 3 * P * P)
    pat = (pat - pat.mean(-1, keepdims=True)) / np.sqrt(pat.var(-1, keepdims=True) + 10.0)
    mu = t["mean"].astype(np.float64)
    Wsaved = t["whiten"].astype(np.float64)
    D = t["atoms"].astype(np.float64)
    w = (pat - mu) @ Wsaved.T  # whitened patches
    r = w @ D.T  # n,S,S,K
    if enc == "threshold":
        codes = [np.maximum(r - alpha, 0), np.maximum(-r - alpha, 0)]
    else:
        z = np.sqrt(np.maximum((w**2).sum(-1)[..., None] + (D**2).sum(-1) - 2 * r, 0))
        codes = [np.maximum(z.mean(-1, keepdims=True) - z, 0)]
    axis = [cells_of(x, S, G) for x in range(S)]
    pooled = np.zeros((n, len(codes), G, G, K))
    for q, c in enumerate(codes):
        for gi in range(G):
            ys = [y for y in range(S) if gi in axis[y]]
            for gj in range(G):
                xs = [x for x in range(S) if gj in axis[x]]
                pooled[:, q, gi, gj] = c[:, ys][:, :, xs].mean((1, 2))
    if inv:
        half = K // 2
        mirror = np.concatenate([np.arange(half, K), np.arange(half)])
        parts = []
        for q in range(len(codes)):
            for gi in range(G):
                for gj in range((G + 1) // 2):
                    atoms = half if 2 * gj + 1 == G else K
                    a = pooled[:, q, gi, gj, :atoms]
                    b = pooled[:, q, gi, G - 1 - gj][:, mirror[:atoms]]
                    parts.append(a + b)
        feats = np.concatenate(parts, axis=1)
    else:
        feats = pooled.reshape(n, -1)
    feats = (feats - t["feature_mean"]) / t["feature_std"]
    ours = np.fromfile(features_path, dtype="<f4").reshape(n, -1)
    assert ours.shape == feats.shape, (ours.shape, feats.shape)
    ferr = np.abs(ours - feats).max() / max(np.abs(feats).max(), 1e-12)
    print(f"features: {n} images x {feats.shape[1]}, max relative difference {ferr:.2e}")
    if not (werr < 1e-4 and ferr < 1e-4):
        sys.exit(1)


if __name__ == "__main__":
    main()
