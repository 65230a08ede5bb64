#!/usr/bin/env python3
"""Python baseline for the spark-json decode benchmark (run by hand, not in CI).

Starts `cifar-df stream` on the synthetic set in batches of 128 (the same lines the
criterion bench decodes), reads 10 batches as a client and times `json.loads` on each line,
as the original Spark/Python pipeline had to. Prints MB/s and images/s.

usage: python3 benches/json_loads.py [path/to/cifar-df]
"""
import json, socket, subprocess, sys, time

exe = sys.argv[1] if len(sys.argv) > 1 else "target/release/cifar-df"
proc = subprocess.Popen(
    [exe, "-q", "stream", "--data", "synthetic:1280:0:42", "--batch-size", "128", "--port", "0"],
    stderr=subprocess.PIPE, text=True)
port = None
for line in proc.stderr:
    if line.startswith("listening on "):
        port = int(line.rsplit(":", 1)[1])
        break
sock = socket.create_connection(("127.0.0.1", port))
data = b""
while True:
    chunk = sock.recv(1 << 20)
    if not chunk:
        break
    data += chunk
proc.wait()
lines = data.split(b"\n")[:-1]
nbytes = sum(len(l) for l in lines)
best = float("inf")
for _ in range(3):
    t = time.perf_counter()
    for l in lines:
        json.loads(l)
    best = min(best, time.perf_counter() - t)
images = 128 * len(lines)
print(f"python json.loads: {len(lines)} lines, {nbytes / 1e6:.1f} MB: "
      f"{nbytes / best / 1e6:.1f} MB/s, {images / best:.0f} images/s")
