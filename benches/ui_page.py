"""The dashboard in a real browser: page load and update latency, and what a watching page
costs a run that trains. Needs chromium, chromedriver, selenium and pyarrow.

  python3 benches/ui_page.py [--bin target/release/cifar-df] [--reps 5]

1. Load: `cifar-df ui` over (a) one run of 100,000 batches, (b) 200 runs of 500 batches
   (metrics written with pyarrow in the run tables' schema); the time from navigation to
   the runs listed and the curves drawn, median of --reps loads.
2. Update: `cifar-df train --ui` with the page open; for each new total of batches the
   page shows, the time from that batch being learnt (its `ts` in the metrics table) to
   the page showing it; median and 90th percentile. The same with the page served by a
   separate `cifar-df ui` process.
3. Cost: a training run timed alone and while a page on `cifar-df ui` watches it (median
   of 3 each, alternating; the browser runs on this machine too), and the CPU time the
   dashboard's server process used meanwhile.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import pyarrow as pa
import pyarrow.parquet as pq

METRICS = pa.schema([
    ("run", pa.string()), ("model", pa.string()), ("split", pa.string()),
    ("epoch", pa.uint32()), ("batch", pa.uint64()), ("images", pa.uint64()),
    *[(n, pa.float64()) for n in [
        "acc", "loss", "precision", "recall", "f1",
        "acc_mean", "loss_mean", "precision_mean", "recall_mean", "f1_mean",
        "acc_window", "loss_window", "precision_window", "recall_window", "f1_window",
        "seconds"]],
    ("ts", pa.timestamp("ms", tz="UTC")), ("drift", pa.bool_()),
])
T0 = 1_780_000_000_000


def write_run(root, name, batches, per_part, start_ms):
    d = os.path.join(root, name)
    os.makedirs(os.path.join(d, "metrics"))
    os.makedirs(os.path.join(d, "eval_metrics"))
    for b in range(0, batches, per_part):
        n = min(per_part, batches - b)
        idx = list(range(b, b + n))
        acc = [0.3 + 0.4 * (1 - 2.718 ** (-i / 5000)) for i in idx]
        cols = {"run": [name] * n, "model": ["logreg"] * n, "split": ["train"] * n,
                "epoch": [1] * n, "batch": idx, "images": [128] * n}
        for c in METRICS.names[6:22]:
            cols[c] = [0.05] * n if c == "seconds" else acc
        cols["ts"] = [T0 + i * 50 for i in idx]
        cols["drift"] = [False] * n
        pq.write_table(pa.table(cols, schema=METRICS),
                       os.path.join(d, "metrics", f"part-{b:010}.parquet"))
    cols = {c: [] for c in METRICS.names}
    pq.write_table(pa.table(cols, schema=METRICS),
                   os.path.join(d, "eval_metrics", "part-0000000000.parquet"))
    info = {"run": name, "model": "logreg", "status": "finished", "seed": 0,
            "source": "synthetic", "config": "", "start_ms": start_ms,
            "end_ms": start_ms + 1000, "batches": batches, "images": batches * 128,
            "error": None}
    with open(os.path.join(d, "run.json"), "w") as f:
        json.dump(info, f)


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    for a in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--disable-background-networking", "--disable-component-update",
              "--window-size=1400,1400"]:
        opts.add_argument(a)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)


def start_ui(binary, runs):
    p = subprocess.Popen([binary, "ui", "--listen", "127.0.0.1:0", "--runs", runs],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = p.stdout.readline()
    url = line.split("dashboard on ")[1].split()[0]
    return p, url


def loaded(driver, runs_listed, batches_note):
    from selenium.webdriver.common.by import By
    rows = driver.find_elements(By.CSS_SELECTOR, "#runs tbody tr")
    note = driver.find_element(By.ID, "curves-note").text
    return (len(rows) >= runs_listed and batches_note in note
            and driver.find_elements(By.CSS_SELECTOR, "#chart canvas"))


def load_times(driver, url, runs_listed, batches_note, reps):
    from selenium.webdriver.support.ui import WebDriverWait
    times = []
    for _ in range(reps):
        driver.get("about:blank")
        t = time.perf_counter()
        driver.get(url)
        WebDriverWait(driver, 60, poll_frequency=0.01).until(
            lambda d: loaded(d, runs_listed, batches_note))
        times.append(time.perf_counter() - t)
    return times


OBSERVE = """
window.__seen = [];
const note = document.getElementById('curves-note');
new MutationObserver(() => {
  for (const part of note.textContent.split(' · ')) {
    if (part.startsWith(arguments[0] + ': ')) window.__seen.push([Date.now(), parseInt(part.split(' ')[1])]);
  }
}).observe(note, {childList: true, characterData: true, subtree: true});
"""


def batch_ts(binary, runs, run):
    out = subprocess.run([binary, "query", "--runs", runs, "--format", "csv",
                          f"select batch, cast(ts as bigint) as ms from metrics where run = '{run}' "
                          "and split = 'train' order by batch"],
                         capture_output=True, text=True, check=True).stdout
    ts = {}
    for line in out.splitlines()[1:]:
        b, ms = line.split(",")
        ts[int(b)] = int(ms)
    return ts


TRAIN = ["-q", "train", "--data", "synthetic:6000:0:1", "--batch-size", "20", "--model",
         "logreg", "--no-plots", "--no-test", "--sleep", "0.02"]


def update_latency(binary, work, separate):
    driver = browser()
    runs = os.path.join(work, "live-sep" if separate else "live-ui")
    run = "watched"
    args = [binary, *TRAIN, "--runs", runs, "--run", run]
    ui = None
    try:
        if separate:
            os.makedirs(runs, exist_ok=True)
            ui, url = start_ui(binary, runs)
            train = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        else:
            train = subprocess.Popen(args + ["--ui", "127.0.0.1:0"], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
            url = None
            while url is None:
                line = train.stderr.readline()
                if line.startswith("dashboard on "):
                    url = line.split()[2]
        driver.get(url + "#runs=" + run)
        driver.execute_script(OBSERVE, run)
        train.wait()
        time.sleep(1)
        seen = driver.execute_script("return window.__seen")
    finally:
        driver.quit()
        if ui:
            ui.kill()
    ts = batch_ts(binary, runs, run)
    lat = []
    last = 0
    for at, total in seen:
        if total > last and (total - 1) in ts:
            lat.append(at - ts[total - 1])
            last = total
    return lat


def cpu_seconds(pid):
    """User + system CPU seconds a process has used (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def browser_cpu_seconds():
    """CPU seconds used so far by every Chromium process (the page's rendering)."""
    total = 0.0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"chrom" not in f.read():
                    continue
            total += cpu_seconds(pid)
        except OSError:
            pass
    return total


def timed(binary, work, watched, i):
    """Seconds `train` takes (10 epochs of 20,000 synthetic images, logreg), alone or
    while a page on a separate `cifar-df ui` watches its runs folder (the page opened first,
    so its start is not timed); and the CPU seconds the dashboard's server used meanwhile."""
    runs = os.path.join(work, f"cost-{i}")
    os.makedirs(runs, exist_ok=True)
    args = [binary, "-q", "train", "--data", "synthetic:20000:0:1", "--epochs", "10",
            "--batch-size", "20", "--model", "logreg", "--no-plots", "--no-test",
            "--runs", runs, "--run", "r"]
    driver = ui = None
    if watched:
        ui, url = start_ui(binary, runs)
        driver = browser()
        driver.get(url + "#runs=r")
        time.sleep(1)
    try:
        server = cpu_seconds(ui.pid) if ui else 0.0
        page = browser_cpu_seconds()
        t = time.perf_counter()
        subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
        took = time.perf_counter() - t
        server = cpu_seconds(ui.pid) - server if ui else 0.0
        return took, server, browser_cpu_seconds() - page
    finally:
        if driver:
            driver.quit()
        if ui:
            ui.kill()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/cifar-df")
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    binary = os.path.abspath(a.bin)
    work = tempfile.mkdtemp(prefix="ui-page-")
    try:
        long_runs = os.path.join(work, "long")
        write_run(long_runs, "long", 100_000, 1_000, T0)
        many = os.path.join(work, "many")
        for i in range(200):
            write_run(many, f"r{i:03}", 500, 500, T0 + i)
        driver = browser()
        try:
            p, url = start_ui(binary, long_runs)
            t = load_times(driver, url + "#runs=long", 1, "100000 batches", a.reps)
            p.kill()
            print(f"load, 1 run of 100,000 batches: median {statistics.median(t)*1000:.0f} ms "
                  f"(min {min(t)*1000:.0f}, max {max(t)*1000:.0f})")
            p, url = start_ui(binary, many)
            ten = ",".join(f"r{i*20:03}" for i in range(10))
            t = load_times(driver, url + "#runs=" + ten, 200, "r180: 500 batches", a.reps)
            p.kill()
            print(f"load, 200 runs, 10 curves overlaid: median {statistics.median(t)*1000:.0f} ms "
                  f"(min {min(t)*1000:.0f}, max {max(t)*1000:.0f})")
        finally:
            driver.quit()
        for separate in (False, True):
            lat = sorted(update_latency(binary, work, separate))
            if lat:
                p90 = lat[int(0.9 * (len(lat) - 1))]
                where = "separate cifar-df ui" if separate else "train --ui"
                print(f"update latency ({where}): median {statistics.median(lat):.0f} ms, "
                      f"p90 {p90:.0f} ms over {len(lat)} updates")
        alone, watched, server, page = [], [], [], []
        for i in range(3):
            alone.append(timed(binary, work, False, 2 * i)[0])
            took, cpu, chrome = timed(binary, work, True, 2 * i + 1)
            watched.append(took)
            server.append(cpu)
            page.append(chrome)
        ma, mw = statistics.median(alone), statistics.median(watched)
        ms, mp = statistics.median(server), statistics.median(page)
        print(f"training 10 x 20,000 images: alone median {ma:.2f} s, watched by a page "
              f"{mw:.2f} s ({(mw / ma - 1) * 100:+.1f}%); meanwhile the dashboard server used "
              f"{ms:.2f} CPU s ({ms / mw * 100:.1f}% of one core) and the browser "
              f"{mp:.2f} CPU s ({mp / mw * 100:.1f}%)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
