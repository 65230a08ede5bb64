#!/usr/bin/env python3
"""PyTorch's run of `--model cnn`'s recipe, for side-by-side figures and for sweeping
hyper-parameters quickly on a GPU (benchmark only; `pip install torch`, never in CI).

The network, the optimiser and the schedule are cifar-df's (configs/cnn.toml, which follow
airbench94): a 2x2 whitening conv fitted on the first mini-batch, three conv groups, BatchNorm
without scale, GELU, a linear head times 1/9; Nesterov SGD with airbench94's decoupled
learning rate and weight decay, the BatchNorm shifts' rate 64x, label smoothing 0.2, a
warm-up to 23% of the planned images then a linear decay, Lookahead every 5 steps; each
image flipped with p = 0.5 and translated by up to 2 px (reflected border) every epoch; at
test the mean of the image's and its mirror's probabilities, each the mean of the logits of
the image and its 1-px up-left and down-right translations (weights 1/2, 1/4, 1/4).

    python3 benches/cnn_reference_train.py DATA [--epochs 40] [--batch 256] [--widths 32,64,128]
        [--lr 11.5] [--threads 2] [--device cpu|cuda] [--runs 1] [--sweep]
        [--fastest | --channels-last]

DATA is a folder of CIFAR-10 binary files (data_batch_*.bin, test_batch.bin): the test
split is scored at the end. Prints accuracy and seconds per run; --sweep runs a grid.
"""
import argparse
import glob
import itertools
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

MEAN = torch.tensor((0.4914, 0.4822, 0.4465)).view(1, 3, 1, 1)
STD = torch.tensor((0.2470, 0.2435, 0.2616)).view(1, 3, 1, 1)


def load(folder, pattern):
    files = sorted(glob.glob(os.path.join(folder, "**", pattern), recursive=True))
    raw = np.concatenate([np.fromfile(f, dtype=np.uint8) for f in files]).reshape(-1, 3073)
    y = torch.tensor(raw[:, 0].astype(np.int64))
    x = torch.tensor(raw[:, 1:].reshape(-1, 3, 32, 32).astype(np.float32) / 255.0)
    return (x - MEAN) / STD, y


class BatchNorm(nn.BatchNorm2d):
    def __init__(self, n, momentum):
        super().__init__(n, eps=1e-12, momentum=momentum)
        self.weight.requires_grad = False


class Conv(nn.Conv2d):
    def __init__(self, ci, co):
        super().__init__(ci, co, kernel_size=3, padding="same", bias=False)

    def reset_parameters(self):
        super().reset_parameters()
        w = self.weight.data
        torch.nn.init.dirac_(w[: w.size(1)])


class Group(nn.Module):
    def __init__(self, ci, co, m):
        super().__init__()
        self.conv1, self.norm1 = Conv(ci, co), BatchNorm(co, m)
        self.conv2, self.norm2 = Conv(co, co), BatchNorm(co, m)

    def forward(self, x):
        x = F.gelu(self.norm1(F.max_pool2d(self.conv1(x), 2)))
        return F.gelu(self.norm2(self.conv2(x)))


class Net(nn.Module):
    def __init__(self, widths, bn_momentum=0.4, scale=1 / 9):
        super().__init__()
        self.whiten = nn.Conv2d(3, 24, 2, padding=0, bias=True)
        self.whiten.weight.requires_grad = False
        self.whiten.bias.data.zero_()
        ci, groups = 24, []
        for w in widths:
            groups.append(Group(ci, w, bn_momentum))
            ci = w
        self.groups = nn.Sequential(*groups)
        self.head = nn.Linear(ci, 10, bias=False)
        self.scale = scale

    def forward(self, x):
        x = self.groups(F.gelu(self.whiten(x)))
        x = F.adaptive_max_pool2d(x, 1).flatten(1) if x.shape[-1] > 1 else x.flatten(1)
        return self.head(x) * self.scale


def init_whitening(layer, x, eps=5e-4):
    patches = x.unfold(2, 2, 1).unfold(3, 2, 1).transpose(1, 3).reshape(-1, 3, 2, 2).double()
    flat = patches.reshape(len(patches), -1)
    cov = flat.T @ flat / len(flat)
    vals, vecs = torch.linalg.eigh(cov)
    vals, vecs = vals.flip(0), vecs.T.flip(0)
    w = (vecs / torch.sqrt(vals.clamp(min=0) + eps).view(-1, 1)).reshape(12, 3, 2, 2)
    layer.weight.data[:] = torch.cat((w, -w)).float()


def augment(x, g):
    n = len(x)
    flip = torch.rand(n, generator=g) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1).to(x.device), x.flip(-1), x)
    pad = F.pad(x, (2, 2, 2, 2), mode="reflect")
    sy = torch.randint(0, 5, (n,), generator=g)
    sx = torch.randint(0, 5, (n,), generator=g)
    out = torch.empty_like(x)
    for a in range(5):
        for b in range(5):
            m = ((sy == a) & (sx == b)).to(x.device)
            if m.any():
                out[m] = pad[m, :, a:a + 32, b:b + 32]
    return out


def tta_logits(net, x):
    def views(v):
        pad = F.pad(v, (1, 1, 1, 1), mode="reflect")
        return 0.5 * net(v) + 0.25 * net(pad[:, :, 0:32, 0:32]) + 0.25 * net(pad[:, :, 2:34, 2:34])

    return views(x).softmax(1) * 0.5 + views(x.flip(-1)).softmax(1) * 0.5


def train(xtr, ytr, xte, yte, widths, epochs, batch, lr, seed, device, hyp, fastest=False,
          channels_last=False):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    net = Net(widths).to(device)
    # PyTorch's fastest CPU path: bf16 autocast and channels_last tensors (on a CPU without
    # AMX, fp32 channels_last can be faster: --channels-last).
    fmt = torch.channels_last if fastest or channels_last else torch.contiguous_format
    net = net.to(memory_format=fmt)
    perm0 = torch.randperm(len(xtr), generator=g)
    init_whitening(net.whiten, xtr[perm0[:batch]].to(device))
    momentum = hyp["momentum"]
    kilo = 1024 * (1 + 1 / (1 - momentum))
    total = epochs * len(xtr)
    norms = [p for n, p in net.named_parameters() if "norm" in n and p.requires_grad]
    others = [p for n, p in net.named_parameters() if "norm" not in n and p.requires_grad]
    base = lr / kilo
    opt = torch.optim.SGD(
        [dict(params=norms, lr=base * 64, weight_decay=0.0), dict(params=others, lr=base, weight_decay=0.0)],
        momentum=momentum, nesterov=True)
    slow = {k: v.clone() for k, v in net.state_dict().items()}
    seen, steps = 0, 0
    t = time.perf_counter()
    for epoch in range(epochs):
        perm = torch.randperm(len(xtr), generator=g)
        xa = augment(xtr[perm].to(device), g)
        ya = ytr[perm].to(device)
        net.whiten.bias.requires_grad = seen < hyp["whiten_bias_images"]
        for i in range(0, len(xa), batch):
            xb, yb = xa[i:i + batch], ya[i:i + batch]
            s = seen / total
            f = 0.2 * (1 - s / 0.23) + s / 0.23 if s < 0.23 else 1 - (s - 0.23) / 0.77 * 0.93
            wd = hyp["weight_decay"] * len(xb) / kilo * f
            for grp, mult in zip(opt.param_groups, (64, 1)):
                grp["lr"] = base * mult * f
                grp["weight_decay"] = wd / (base * mult * f)
            xb = xb.contiguous(memory_format=fmt)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=fastest):
                out = net(xb)
            loss = F.cross_entropy(out.float(), yb, label_smoothing=0.2, reduction="sum")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(xb)
            steps += 1
            if steps % 5 == 0:
                decay = 0.95 ** 5 * min(seen / total, 1.0) ** 3
                with torch.no_grad():
                    for k, v in net.state_dict().items():
                        if v.dtype.is_floating_point:
                            slow[k].lerp_(v, 1 - decay)
                            v.copy_(slow[k])
    secs = time.perf_counter() - t
    net.eval()
    with torch.no_grad():
        correct = 0
        for i in range(0, len(xte), 1000):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=fastest):
                p = tta_logits(net, xte[i:i + 1000].to(device).contiguous(memory_format=fmt))
            p = p.float()
            correct += (p.argmax(1).cpu() == yte[i:i + 1000]).sum().item()
    return correct / len(xte), secs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--widths", default="32,64,128")
    ap.add_argument("--lr", type=float, default=11.5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--grid", help="a list of (widths, epochs, batch, lr) tuples, as Python")
    ap.add_argument("--fastest", action="store_true",
                    help="PyTorch's fastest CPU path: bf16 autocast + channels_last")
    ap.add_argument("--channels-last", action="store_true",
                    help="fp32 channels_last (PyTorch's fastest path on CPUs without AMX)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.backends.cudnn.benchmark = True
    xtr, ytr = load(a.data, "data_batch_*.bin")
    xte, yte = load(a.data, "test_batch.bin")
    hyp = dict(momentum=0.85, weight_decay=0.0153, whiten_bias_images=3 * len(xtr))
    grid = [(tuple(int(w) for w in a.widths.split(",")), a.epochs, a.batch, a.lr)]
    if a.sweep:
        grid = list(itertools.product(
            [(32, 64, 128), (48, 96, 192), (64, 128, 256)], [16, 24, 32, 40], [256, 512], [11.5]))
        grid += list(itertools.product([(32, 64, 128)], [32], [256], [6.0, 8.0, 16.0, 22.0]))
    if a.grid:
        import ast
        grid = [tuple(g) for g in ast.literal_eval(a.grid)]
    for widths, epochs, batch, lr in grid:
        accs, times = [], []
        for r in range(a.runs):
            acc, secs = train(xtr, ytr, xte, yte, widths, epochs, batch, lr, r, a.device, hyp,
                              a.fastest, a.channels_last)
            accs.append(acc)
            times.append(secs)
        print(f"widths {'/'.join(map(str, widths))} epochs {epochs} batch {batch} lr {lr}: "
              f"accuracy {np.mean(accs):.4f} (runs {' '.join(f'{x:.4f}' for x in accs)}) "
              f"{np.mean(times):.1f} s on {a.device}"
              f"{' (bf16 autocast + channels_last)' if a.fastest else ''}"
              f"{' (fp32 channels_last)' if a.channels_last and not a.fastest else ''}", flush=True)


if __name__ == "__main__":
    main()
