#!/usr/bin/env python3
"""PyTorch's side of `cargo bench --bench cnn`: the same network (airbench94's, widths
32/64/128 and 64/256/256) trained on the CPU with the same threads and mini-batch, in
images/s of one SGD step (forward, backward, update). Benchmark only: `pip install torch`
(never in CI).

    python3 benches/cnn_torch.py [--threads 2] [--batch 256] [--steps 20] [--config all]

By default it runs PyTorch's fastest CPU configuration, the reference cifar-df is measured
against: bf16 autocast (`torch.autocast("cpu", dtype=torch.bfloat16)`) with channels_last
tensors; `--config all` adds fp32 NCHW (PyTorch's default), fp32 channels_last and bf16
NCHW.
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
    ap.add_argument("--config", choices=sorted(CONFIGS) + ["all"], default="fastest",
                    help="fastest: bf16 autocast + channels_last (the reference); all: the "
                         "four of fp32/bf16 x NCHW/channels_last")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    names = sorted(CONFIGS) if a.config == "all" else [a.config]
    for name in names:
        bf16, channels_last = CONFIGS[name]
        run(a, name, bf16, channels_last)


# name: (bf16 autocast, channels_last)
CONFIGS = {
    "fastest": (True, True),
    "fp32-nchw": (False, False),
    "fp32-channels-last": (False, True),
    "bf16-nchw": (True, False),
}


def cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def run(a, config, bf16, channels_last):
    torch.manual_seed(0)
    for widths in ([32, 64, 128], [64, 256, 256]):
        net = make_net(widths)
        x = torch.randn(a.batch, 3, 32, 32)
        y = torch.randint(0, 10, (a.batch,))
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
            x = x.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=1e-3,
                              momentum=0.85, nesterov=True, weight_decay=1e-4)
        loss_fn = nn.CrossEntropyLoss(label_smoothing=0.2, reduction="none")

        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = net(x) / 9
            loss = loss_fn(out.float(), y).sum()
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
        print(f"torch {torch.__version__} {config} widths {'/'.join(map(str, widths))} "
              f"batch {a.batch} threads {a.threads} ({cpu_name()}): median step "
              f"{med * 1e3:.1f} ms, {a.batch / med:.0f} images/s")


if __name__ == "__main__":
    main()
