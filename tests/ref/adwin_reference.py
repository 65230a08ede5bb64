#!/usr/bin/env python3
"""River's ADWIN on fixed sequences, the reference for cifar-df's drift detector.

    python3 tests/ref/adwin_reference.py

Prints one JSON object per line: {"name", "values", "detections", "rises"}, where
"detections" are the indices at which river.drift.ADWIN() (its defaults: delta 0.002,
clock 32, max_buckets 5, min_window_length 5, grace_period 10) set drift_detected, and
"rises" says for each whether the window's mean (River's `estimation`) after the update is
above the mean of the window before it together with the new value. Values are multiples
of 1/1024, so that they cross JSON exactly.
"""
import json
import random

from river import drift


def sequence(name, rng):
    if name == "loss-steps":
        # A loss that falls, then jumps twice (two changes of concept), with noise.
        out = []
        for i in range(6000):
            base = 2.3 - 1.2 * min(i, 1500) / 1500
            if i >= 3000:
                base += 0.9
            if i >= 4500:
                base -= 0.5
            out.append(base + rng.gauss(0, 0.15))
        return out
    if name == "bernoulli":
        return [float(rng.random() < (0.2 if i < 2500 else 0.6)) for i in range(5000)]
    if name == "stationary":
        return [rng.uniform(0, 1) for _ in range(4000)]
    if name == "ramp":
        return [i / 3000 + rng.gauss(0, 0.3) for i in range(3000)]
    raise ValueError(name)


for k, name in enumerate(["loss-steps", "bernoulli", "stationary", "ramp"]):
    rng = random.Random(100 + k)
    values = [round(v * 1024) / 1024 for v in sequence(name, rng)]
    adwin = drift.ADWIN()
    detections, rises = [], []
    for i, v in enumerate(values):
        before = (adwin.estimation * adwin.width + v) / (adwin.width + 1)
        adwin.update(v)
        if adwin.drift_detected:
            detections.append(i)
            rises.append(adwin.estimation > before)
    print(json.dumps({"name": name, "values": values, "detections": detections, "rises": rises}))
