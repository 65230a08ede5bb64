#!/usr/bin/env python3
"""Test-only reference for cifar-df's CNN (`--model cnn`), in float64 numpy.

    cnn_reference.py IN.json OUT.json

IN.json holds a network (airbench94's shape: a 2x2 whitening conv with a learnt bias and
GELU, blocks of conv3x3 - maxpool2 - BatchNorm - GELU - conv3x3 - BatchNorm - GELU, a final
max pool over the last block's whole output, a linear head times `scale`), a batch of NHWC
images and labels, and SGD settings. The network is written here from its definition, not
from cifar-df's code: convolutions as sums of shifted einsums, BatchNorm with the batch's
statistics and no scale, GELU as x * Phi(x) with math.erf, the label-smoothed cross-entropy
summed over the batch (PyTorch's CrossEntropyLoss(label_smoothing=eps, reduction='none')
.sum()).

OUT.json gets: the logits and the loss of the first forward pass; the gradients of the loss
with respect to every parameter tensor by a hand-written backward pass, each checked here
against central finite differences of the forward pass on sampled entries (the script fails
if they disagree); the running statistics after the pass; and the parameters after
`steps` steps of PyTorch's SGD (torch.optim.SGD's documented update, nesterov=True):
d = g + decay*w; buf = momentum*buf + d (buf = d at the first step); w -= lr*(d + momentum*buf),
each step on the same batch, with its own learning rates.
"""
import json
import math
import sys

import numpy as np

ERF = np.vectorize(math.erf)


def gelu(z):
    return z * 0.5 * (1.0 + ERF(z / math.sqrt(2.0)))


def gelu_grad(z):
    cdf = 0.5 * (1.0 + ERF(z / math.sqrt(2.0)))
    pdf = np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    return cdf + z * pdf


def conv(x, w, k, pad):
    """x: n,h,w,ci; w: (k*k*ci, co) rows ordered (ky, kx, ci)."""
    n, h, wd, ci = x.shape
    co = w.shape[1]
    wk = w.reshape(k, k, ci, co)
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    oh, ow = h + 2 * pad - k + 1, wd + 2 * pad - k + 1
    out = np.zeros((n, oh, ow, co))
    for ky in range(k):
        for kx in range(k):
            out += np.einsum("nhwc,co->nhwo", xp[:, ky:ky + oh, kx:kx + ow, :], wk[ky, kx])
    return out


def conv_grads(x, w, k, pad, dy):
    """Gradients of sum(conv(x, w) * dy) with respect to w and x."""
    n, h, wd, ci = x.shape
    co = w.shape[1]
    wk = w.reshape(k, k, ci, co)
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    oh, ow = dy.shape[1], dy.shape[2]
    dw = np.zeros((k, k, ci, co))
    dxp = np.zeros_like(xp)
    for ky in range(k):
        for kx in range(k):
            dw[ky, kx] = np.einsum("nhwc,nhwo->co", xp[:, ky:ky + oh, kx:kx + ow, :], dy)
            dxp[:, ky:ky + oh, kx:kx + ow, :] += np.einsum("nhwo,co->nhwc", dy, wk[ky, kx])
    dx = dxp[:, pad:pad + h, pad:pad + wd, :]
    return dw.reshape(k * k * ci, co), dx


def maxpool(x, p):
    n, h, w, c = x.shape
    oh, ow = h // p, w // p
    v = x[:, :oh * p, :ow * p, :].reshape(n, oh, p, ow, p, c)
    return v.max(axis=(2, 4))


def maxpool_grad(x, p, dy):
    n, h, w, c = x.shape
    oh, ow = h // p, w // p
    dx = np.zeros_like(x)
    for i in range(oh):
        for j in range(ow):
            win = x[:, i * p:(i + 1) * p, j * p:(j + 1) * p, :].reshape(n, p * p, c)
            arg = win.argmax(axis=1)  # first maximum
            for t in range(p * p):
                m = arg == t
                dx[:, i * p + t // p, j * p + t % p, :] += np.where(m, dy[:, i, j, :], 0.0)
    return dx


def bn(x, b, eps):
    mean = x.mean(axis=(0, 1, 2))
    var = x.var(axis=(0, 1, 2))
    rstd = 1.0 / np.sqrt(var + eps)
    xhat = (x - mean) * rstd
    return xhat + b, (xhat, rstd, mean, var)


def bn_grad(cache, dz):
    xhat, rstd, _, _ = cache
    m = dz.shape[0] * dz.shape[1] * dz.shape[2]
    db = dz.sum(axis=(0, 1, 2))
    dx = rstd * (dz - db / m - xhat * (dz * xhat).sum(axis=(0, 1, 2)) / m)
    return dx, db


def forward(net, params, x, y, keep=False):
    widths, k = net["widths"], net["classes"]
    eps, scale, smooth = net["bn_eps"], net["scale"], net["label_smoothing"]
    t = {}
    z0 = conv(x, net["whiten"], 2, 0) + params[0]
    a = gelu(z0)
    t["z0"], t["a0"] = z0, a
    nb = len(widths)
    blocks = []
    for b in range(nb):
        c1 = conv(a, params[1 + 2 * b], 3, 1)
        p1 = maxpool(c1, 2)
        z1, bn1 = bn(p1, params[1 + 2 * nb + 2 * b], eps)
        a1 = gelu(z1)
        c2 = conv(a1, params[2 + 2 * b], 3, 1)
        z2, bn2 = bn(c2, params[2 + 2 * nb + 2 * b], eps)
        a2 = gelu(z2)
        blocks.append(dict(inp=a, c1=c1, p1=p1, z1=z1, bn1=bn1, a1=a1, c2=c2, z2=z2, bn2=bn2, a2=a2))
        a = a2
    fp = a.shape[1]
    feats = maxpool(a, fp).reshape(a.shape[0], -1)
    head = params[-1].reshape(widths[-1], k)
    logits = scale * feats @ head
    lse = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
    logp = logits - lse[:, None]
    target = np.full(logits.shape, smooth / k)
    target[np.arange(len(y)), y] += 1.0 - smooth
    loss = -(target * logp).sum()
    if not keep:
        return loss
    return loss, logits, dict(t=t, blocks=blocks, feats=feats, last=a, target=target, logp=logp)


def backward(net, params, x, y, cache):
    widths, k = net["widths"], net["classes"]
    scale = net["scale"]
    nb = len(widths)
    grads = [None] * len(params)
    dlogits = np.exp(cache["logp"]) - cache["target"]
    head = params[-1].reshape(widths[-1], k)
    grads[-1] = (scale * cache["feats"].T @ dlogits).reshape(-1)
    dfeats = scale * dlogits @ head.T
    last = cache["last"]
    fp = last.shape[1]
    da = maxpool_grad(last, fp, dfeats.reshape(last.shape[0], 1, 1, -1))
    for b in reversed(range(nb)):
        B = cache["blocks"][b]
        dz2 = da * gelu_grad(B["z2"])
        dc2, grads[2 + 2 * nb + 2 * b] = bn_grad(B["bn2"], dz2)
        grads[2 + 2 * b], da1 = conv_grads(B["a1"], params[2 + 2 * b], 3, 1, dc2)
        dz1 = da1 * gelu_grad(B["z1"])
        dp1, grads[1 + 2 * nb + 2 * b] = bn_grad(B["bn1"], dz1)
        dc1 = maxpool_grad(B["c1"], 2, dp1)
        grads[1 + 2 * b], da = conv_grads(B["inp"], params[1 + 2 * b], 3, 1, dc1)
        grads[1 + 2 * b] = grads[1 + 2 * b].reshape(-1)
        grads[2 + 2 * b] = grads[2 + 2 * b].reshape(-1)
    dz0 = da * gelu_grad(cache["t"]["z0"])
    grads[0] = dz0.sum(axis=(0, 1, 2))
    return grads


def shaped(net, params):
    """Conv weights as (k*k*ci, co) matrices, the rest flat."""
    widths = net["widths"]
    out = [np.asarray(params[0], dtype=np.float64)]
    ci = 24
    for w in widths:
        out.append(np.asarray(params[len(out)], dtype=np.float64).reshape(9 * ci, w))
        out.append(np.asarray(params[len(out)], dtype=np.float64).reshape(9 * w, w))
        ci = w
    for p in params[len(out):]:
        out.append(np.asarray(p, dtype=np.float64))
    return out


def main():
    cfg = json.load(open(sys.argv[1]))
    net = cfg["net"]
    net["whiten"] = np.asarray(net["whiten"], dtype=np.float64).reshape(12, 24)
    side = cfg.get("side", 32)
    x = np.asarray(cfg["x"], dtype=np.float64).reshape(-1, side, side, 3)
    y = np.asarray(cfg["y"], dtype=np.int64)
    params = shaped(net, cfg["params"])
    loss, logits, cache = forward(net, params, x, y, keep=True)
    grads = backward(net, params, x, y, cache)

    # Finite differences of the forward pass on sampled entries of every tensor.
    rng = np.random.default_rng(7)
    worst = 0.0
    for t, p in enumerate(params):
        flat = p.reshape(-1)
        g = np.asarray(grads[t]).reshape(-1)
        for i in rng.choice(flat.size, size=min(6, flat.size), replace=False):
            # Max pooling is not differentiable where a window's two largest values tie: a
            # step that crosses such a point differs, so smaller steps are tried too.
            errs = []
            for h in (1e-5, 1e-6, 1e-7):
                old = flat[i]
                flat[i] = old + h
                up = forward(net, params, x, y)
                flat[i] = old - h
                down = forward(net, params, x, y)
                flat[i] = old
                fd = (up - down) / (2 * h)
                errs.append((abs(fd - g[i]) / (1.0 + abs(fd)), fd))
                if errs[-1][0] <= 1e-6:
                    break
            err, fd = min(errs)
            worst = max(worst, err)
            if err > 1e-6:
                sys.exit(f"tensor {t} entry {i}: backward {g[i]} vs finite differences {errs}")

    # Running statistics after the pass (PyTorch: momentum m, unbiased variance).
    m = net["bn_momentum"]
    nb = len(net["widths"])
    rmean, rvar = [], []
    for b in range(nb):
        for key in ("bn1", "bn2"):
            _, _, mean, var = cache["blocks"][b][key]
            cnt = x.shape[0] * cache["blocks"][b]["p1" if key == "bn1" else "c2"].shape[1] ** 2
            rmean.append(((1 - m) * 0.0 + m * mean).tolist())
            rvar.append(((1 - m) * 1.0 + m * var * cnt / (cnt - 1)).tolist())

    # SGD steps on the same batch.
    sgd = cfg["sgd"]
    cur = [p.copy() for p in params]
    bufs = [np.zeros_like(p) for p in params]
    for step in sgd["steps"]:
        l, lg, c = forward(net, cur, x, y, keep=True)
        gs = backward(net, cur, x, y, c)
        for t in range(len(cur)):
            lr, decay = step["lr"][t], step["decay"][t]
            if lr == 0.0:
                continue
            g = np.asarray(gs[t]).reshape(cur[t].shape)
            d = g + decay * cur[t]
            bufs[t] = sgd["momentum"] * bufs[t] + d
            cur[t] = cur[t] - lr * (d + sgd["momentum"] * bufs[t])

    json.dump(
        dict(
            loss=loss,
            logits=logits.reshape(-1).tolist(),
            grads=[np.asarray(g).reshape(-1).tolist() for g in grads],
            running_mean=rmean,
            running_var=rvar,
            after=[p.reshape(-1).tolist() for p in cur],
            fd_worst=worst,
        ),
        open(sys.argv[2], "w"),
    )


if __name__ == "__main__":
    main()
