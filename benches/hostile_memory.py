#!/usr/bin/env python3
"""Peak memory of cifar-df under hostile peers (issue 11, item 7).

    python3 benches/hostile_memory.py [BIN] [--scale K]

BIN is the release binary (default target/release/cifar-df). Each scenario runs the binary
as a child process and reads its peak resident set (VmHWM in /proc/PID/status) while it
lives. --scale multiplies the volume sent (default 1), so that running it at two scales
shows whether the peak grows with the length of the stream.

Scenarios:
  server-no-read   `stream --endless` to a client that connects and never reads
  endless-line     `export --source tcp://...` fed one spark-json line that does not end
                   (a number of 2 GiB x K digits; the line cap is the default 64 MiB)
  tiny-batches     `train --source tcp://... --model logreg` fed one-image spark-json
                   batches, one after another
  empty-batches    `export` fed `{}` lines (each one a rejected, empty batch)
  huge-config      `train --config` with an MLP of two 1,000,000-wide hidden layers

Prints one table row per scenario: peak RSS in MiB, what was sent, the exit status and the
last line of the child's stderr.
"""
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time


def peak_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def watch(proc, stop_after=None):
    """Polls the child's peak RSS until it exits (or stop_after seconds, then kills it)."""
    best = 0
    start = time.time()
    while proc.poll() is None:
        p = peak_kib(proc.pid)
        if p:
            best = max(best, p)
        if stop_after is not None and time.time() - start > stop_after:
            proc.kill()
            break
        time.sleep(0.05)
    proc.wait()
    return best


def serve_once(payload_iter):
    """A one-client TCP server on a free port writing what payload_iter yields."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    sent = [0]

    def run():
        conn, _ = srv.accept()
        try:
            for chunk in payload_iter:
                conn.sendall(chunk)
                sent[0] += len(chunk)
        except OSError:
            pass
        finally:
            conn.close()
            srv.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return port, t, sent


def spark_json_line(label, pixel):
    row = ", ".join(f'"feature{k}": {pixel}' for k in range(3072))
    return ('{"0": {' + row + f', "label": {label}}}}}\n').encode()


def last_line(text):
    lines = [l for l in text.strip().splitlines() if l.strip()]
    return lines[-1][:110] if lines else ""


def run(binary, args, stop_after=None):
    proc = subprocess.Popen([binary, *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    err = []
    t = threading.Thread(target=lambda: err.append(proc.stderr.read()), daemon=True)
    t.start()
    peak = watch(proc, stop_after)
    t.join(5)
    return peak, proc.returncode, last_line(err[0] if err else "")


def main():
    argv = sys.argv[1:]
    scale = 1
    if "--scale" in argv:
        i = argv.index("--scale")
        scale = int(argv[i + 1])
        del argv[i:i + 2]
    binary = argv[0] if argv else "target/release/cifar-df"
    tmp = tempfile.mkdtemp(prefix="cifar-df-hostile-")
    rows = []

    # 1. A client that connects and never reads.
    proc = subprocess.Popen([binary, "--quiet", "stream", "--data", "synthetic:20000:100",
                             "--endless", "--port", "0", "--write-timeout", str(3 * scale)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    port = None
    while port is None:
        line = proc.stderr.readline()
        if not line:
            break
        if "listening on" in line:
            port = int(line.rsplit(":", 1)[1])
    if port is None:
        proc.wait()
        peak, err = 0, proc.stderr.read()
    else:
        client = socket.create_connection(("127.0.0.1", port))
        peak = watch(proc, stop_after=60 * scale)
        err = proc.stderr.read()
        client.close()
    rows.append(("server-no-read", peak, f"client idle, --write-timeout {3 * scale}",
                 proc.returncode, last_line(err)))

    # 2. One line that does not end (2 GiB x scale of digits, then the peer closes).
    total = 2 * scale << 30
    chunk = b"1" * (1 << 20)
    head = [b'{"0": {"feature0": ']
    port, _, sent = serve_once(iter(head + [chunk] * (total >> 20)))
    peak, rc, err = run(binary, ["export", "--source", f"tcp://127.0.0.1:{port}",
                                 "--out", os.path.join(tmp, "line")])
    rows.append(("endless-line", peak, f"{sent[0] / 2**30:.1f} GiB in one line", rc, err))

    # 3. Tiny batches: one image per spark-json line, trained on as they come.
    n = 20000 * scale
    lines = [spark_json_line(k % 10, (k * 37) % 256) for k in range(10)]
    port, _, sent = serve_once(lines[k % 10] for k in range(n))
    peak, rc, err = run(binary, ["train", "--source", f"tcp://127.0.0.1:{port}", "--model",
                                 "logreg", "--runs", tmp, "--run", f"tiny{scale}",
                                 "--checkpoint-every", "1000"])
    rows.append(("tiny-batches", peak, f"{n} one-image batches ({sent[0] / 2**30:.2f} GiB)",
                 rc, err))

    # 4. Empty batches: `{}` lines, each rejected.
    n = 2_000_000 * scale
    port, _, sent = serve_once(b"{}\n" * 1000 for _ in range(n // 1000))
    peak, rc, err = run(binary, ["export", "--source", f"tcp://127.0.0.1:{port}",
                                 "--out", os.path.join(tmp, "empty")])
    rows.append(("empty-batches", peak, f"{n} `{{}}` lines", rc, err))

    # 5. A config asking for an absurd model.
    cfg = os.path.join(tmp, "huge.toml")
    with open(cfg, "w") as f:
        f.write('model = "mlp"\n[mlp]\nhidden = [1000000, 1000000]\n')
    peak, rc, err = run(binary, ["train", "--config", cfg, "--data", "synthetic:200:100",
                                 "--runs", tmp, "--run", f"huge{scale}"])
    rows.append(("huge-config", peak, "mlp.hidden = [1000000, 1000000]", rc, err))

    print(f"{'scenario':<16} {'peak MiB':>9}  {'rc':>3}  input / last stderr line")
    for name, peak, what, rc, err in rows:
        print(f"{name:<16} {peak / 1024:9.1f}  {rc:>3}  {what}")
        print(f"{'':<16} {'':>9}       {err}")


if __name__ == "__main__":
    main()
