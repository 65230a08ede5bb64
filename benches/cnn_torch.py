#!/usr/bin/env python3
"""PyTorch's side of `cargo bench --bench cnn`: the same network (airbench94's, widths
32/64/128 and 64/256/256) trained on the CPU with the same threads and mini-batch, in
images/s of one SGD step (forward, backward, update). Benchmark only: `pip install torch`
(never in CI).

    python3 benches/cnn_torch.py [--threads 2] [--batch 256] [--steps 20]
"""
import argparse
import time

import torch
from torch import nn


class BatchNorm(nn.BatchNorm2d):
    def __init__(self, n, momentum=0.6, eps=1e-12):
        super().__init__(n, eps=eps, momentum=1 - momentum)
        self.weight.requires_grad = False


class Conv(nn.Conv2d):
    def __init__(self, ci, co, k=3, padding="same", bias=False):
        super().__init__(ci, co, kernel_size=k, padding=padding, bias=bias)


class ConvGroup(nn.Module):
    def __init__(self, ci, co):
        super().__init__()
        self.conv1, self.pool, self.norm1 = Conv(ci, co), nn.MaxPool2d(2), BatchNorm(co)
        self.conv2, self.norm2, self.activ = Conv(co, co), BatchNorm(co), nn.GELU()

    def forward(self, x):
        x = self.activ(self.norm1(self.pool(self.conv1(x))))
        return self.activ(self.norm2(self.conv2(x)))


def make_net(widths):
    net = nn.Sequential(
        Conv(3, 24, 2, padding=0, bias=True),
        nn.GELU(),
        ConvGroup(24, widths[0]),
        ConvGroup(widths[0], widths[1]),
        ConvGroup(widths[1], widths[2]),
        nn.MaxPool2d(3),
        nn.Flatten(),
        nn.Linear(widths[2], 10, bias=False),
    )
    net[0].weight.requires_grad = False
    # The steady state: airbench94 freezes the whitening bias after 3 epochs (cifar-df's
    # bench measures the same), so no input gradient for the first convolution.
    net[0].bias.requires_grad = False
    return net


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--channels-last", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    for widths in ([32, 64, 128], [64, 256, 256]):
        net = make_net(widths)
        x = torch.randn(a.batch, 3, 32, 32)
        y = torch.randint(0, 10, (a.batch,))
        if a.channels_last:
            net = net.to(memory_format=torch.channels_last)
            x = x.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=1e-3,
                              momentum=0.85, nesterov=True, weight_decay=1e-4)
        loss_fn = nn.CrossEntropyLoss(label_smoothing=0.2, reduction="none")

        def step():
            out = net(x) / 9
            loss = loss_fn(out, y).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        for _ in range(3):
            step()
        times = []
        for _ in range(a.steps):
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
        times.sort()
        med = times[len(times) // 2]
        print(f"torch {torch.__version__} widths {'/'.join(map(str, widths))} batch {a.batch} "
              f"threads {a.threads}: median step {med * 1e3:.1f} ms, {a.batch / med:.0f} images/s")


if __name__ == "__main__":
    main()
