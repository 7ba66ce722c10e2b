#!/usr/bin/env python3
"""Instructions and CPU time per line of `shipper run` on pipe-throughput's workload.

A fixed workload (the lines xtask/src/loadgen.rs writes for pipe-throughput: seed 0x5eed,
150-600 bytes log-uniform, 16 services Zipf 1, 10% cfjs1), one blocking writer with whole
lines up to 64 KiB per write(), one shipper worker with a pipe source, zstd level 1, mutual
TLS, acks from a one-worker `shipper receive` with `fsync = false` (the perf suite's configs;
the outbox is 1 GiB so that a slow receiver on a loaded machine drops nothing). Measured from
just before the first write until every line is acknowledged:

- default: CPU-seconds of the shipper (utime + stime from /proc, and perf stat's task-clock)
  per line; `--record` adds `perf record -g` cpu-clock samples (run*/perf.data) for shares.
- `--callgrind`: the shipper under valgrind's callgrind, instrumentation switched on just
  before the first write: user-space instructions (Ir) per line, exact and independent of
  the machine's load, and per function (callgrind_annotate run*/callgrind.out). It runs about
  30 times slower, so the shipper is always behind the writer and seals full batches.

Hardware counters (`perf stat -e instructions`) are what one would use first; the VMs of this
project have no PMU ("PMU not available due to virtualization"), hence callgrind.

Frame sizes depend on timing (a worker that catches up with its writer seals smaller frames),
so frames, lines per frame and seal reasons are printed beside the figures.

Usage: perf/tools/ipl.py BIN [--lines N] [--runs R] [--dir DIR] [--pin] [--rt] [--ebpf]
                         [--record | --callgrind] [--batch 'KEY = VALUE']...
"""

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

M64 = (1 << 64) - 1
PATHS = ["/api/v1/items", "/api/v1/users", "/static/app.js", "/", "/health", "/api/v2/search"]
WORDS = [w.encode() for w in ["cache ", "miss ", "upstream ", "retry ", "tls ", "handshake ",
                              "ok ", "slow ", "origin ", "pool ", "warm ", "evicted "]]
AGENTS = ["Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko)",
          "curl/7.88.1", "Go-http-client/2.0"]
FORMATS = ["cdn_access", "waf_event", "origin_fetch"]


class Rng:
    """testkit::rng::XorShift64Star."""

    def __init__(self, seed):
        self.s = max(seed & M64, 1)

    def next(self):
        s = self.s
        s ^= s >> 12
        s ^= (s << 25) & M64
        s ^= s >> 27
        self.s = s
        return (s * 0x2545F4914F6CDD1D) & M64


def weights(n, skew):
    zipf = [1.0 / (k + 1) ** skew for k in range(n)]
    total, acc, out = sum(zipf), 0.0, []
    for z in zipf:
        acc += z / total
        out.append(acc)
    return out


def lines(n, seed=0x5EED, writer=0, lo=150.0, hi=600.0, services=16, skew=1.0, cfjs1=0.1):
    """xtask::loadgen::lines, byte for byte."""
    rng, cdf, out = Rng(seed ^ ((writer + 1) << 32)), weights(services, skew), bytearray()

    def unit(x):
        return (x >> 11) / float(1 << 53)

    for i in range(n):
        r = rng.next()
        target = int(lo * (hi / lo) ** unit(rng.next()))
        u = unit(rng.next())
        svc = next((k for k, c in enumerate(cdf) if u < c), 0)
        start = len(out)
        level = "error" if r % 50 == 0 else "info"
        out += (f'{{"ts":"2026-11-21T12:{i // 60000 % 60:02}:{i // 1000 % 60:02}.'
                f'{r % 1000000:06}Z","level":"{level}","service":"svc-{svc:02}",').encode()
        if unit(rng.next()) < cfjs1:
            f = FORMATS[(r >> 4) % 3]
            cache = "miss" if r % 3 == 0 else "hit"
            out += (f'"format":"{f}","{f}":{{"colo":"ams{r % 9}","seq":{i},'
                    f'"bytes":{(r >> 40) % 100000},"cache":{{"status":"{cache}",'
                    f'"age":{(r >> 20) % 3600}}}}}').encode()
        else:
            status = 500 if r % 50 == 0 else 200
            out += (f'"host":"edge-{r % 300}.ams","msg":"GET {PATHS[(r >> 16) % 6]}/{i} '
                    f'{status} in {(r >> 24) % 900}ms","req":{{"id":"{rng.next():016x}",'
                    f'"ua":"{AGENTS[(r >> 32) % 3]}","bytes":{(r >> 40) % 100000}}}').encode()
        out += f',"trace":"{rng.next():016x}{rng.next():016x}","note":"'.encode()
        left = max(target - (len(out) - start + 3), 0)
        while left > 0:
            w = WORDS[rng.next() % 12]
            take = min(len(w), left)
            out += w[:take]
            left -= take
        out += b'"}\n'
    return bytes(out)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            return r.read().decode()
    except OSError:
        return ""


def total(text, name):
    pat = re.compile(rf"^{name}(\{{[^}}]*\}})? (\S+)$", re.M)
    return sum(float(m.group(2)) for m in pat.finditer(text))


def configs(d, pki, rx, rm, sm, fifo, batch):
    tls = f'ca = "{pki}/ca.pem"\n'
    with open(f"{d}/receiver.toml", "w") as f:
        f.write(f'[receiver]\nlisten = "127.0.0.1:{rx}"\nworkers = 1\n[tls]\n{tls}'
                f'cert = "{pki}/receiver.pem"\nkey = "{pki}/receiver.key"\n[output]\n'
                f'directory = "{d}/out"\nfsync = false\n[metrics]\n'
                f'listen = "127.0.0.1:{rm}"\n')
    with open(f"{d}/edge.toml", "w") as f:
        f.write(f'[shipper]\nworkers = 1\n[metrics]\nlisten = "127.0.0.1:{sm}"\n'
                f'[[sources.pipe]]\npath = "{fifo}"\n[batch]\nzstd_level = 1\n{batch}'
                f'[receivers]\nprimary = ["127.0.0.1:{rx}"]\n'
                f'outbox_bytes_max = {1 << 30}\n[tls]\n{tls}'
                f'cert = "{pki}/shipper.pem"\nkey = "{pki}/shipper.key"\n'
                f'server_name = "localhost"\n')


def wait_for(cond, secs, what):
    deadline = time.time() + secs
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.05)
    sys.exit(f"timed out: {what}")


def write_fifo(fifo, data, chunk=64 << 10):
    with open(fifo, "wb", buffering=0) as f:
        at = 0
        while at < len(data):
            end = data.rfind(b"\n", at, at + chunk) + 1
            if end <= at:
                end = data.find(b"\n", at) + 1
            f.write(data[at:end])
            at = end


def proc_cpu(pid):
    """utime + stime of every thread of `pid`, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_run(args, data, n, run):
    d = f"{args.dir}/run{run}"
    subprocess.run(["rm", "-rf", d], check=True)
    os.makedirs(d)
    pki, fifo = f"{args.dir}/pki", f"{d}/ship.pipe"
    rx, rm, sm = free_port(), free_port(), free_port()
    configs(d, pki, rx, rm, sm, fifo, "".join(b + "\n" for b in args.batch))
    env = dict(os.environ, RUST_LOG="warn")
    rt = ["chrt", "-f", "10"] if args.rt else []
    pin = (lambda c: rt + ["taskset", "-c", c]) if args.pin else (lambda c: rt)
    rcv = subprocess.Popen(pin("0") + [args.bin, "receive", "-c", f"{d}/receiver.toml"], env=env,
                           stdout=subprocess.DEVNULL, stderr=open(f"{d}/receiver.log", "w"))
    wait_for(lambda: scrape(rm), 20, "receiver metrics")
    cmd = pin("1") + [args.bin, "run", "-c", f"{d}/edge.toml"]
    cmd += [] if args.ebpf else ["--no-ebpf"]
    if args.callgrind:
        cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no",
               f"--callgrind-out-file={d}/callgrind.out"] + cmd
    shp = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                           stderr=open(f"{d}/shipper.log", "w"))
    wait_for(lambda: scrape(sm) and os.path.exists(fifo), 120, "shipper metrics")
    stat = f"{d}/stat.csv"
    if args.callgrind:
        subprocess.run(["callgrind_control", "-i", "on", str(shp.pid)], check=True,
                       stdout=subprocess.DEVNULL)
        perf = None
    else:
        perf = subprocess.Popen(["perf", "stat", "-x,", "-o", stat, "-e", "task-clock",
                                 "-p", str(shp.pid)])
        if args.record:
            rec = subprocess.Popen(["perf", "record", "-q", "-F", "4000", "-g", "-o",
                                    f"{d}/perf.data", "-p", str(shp.pid)])
    time.sleep(0.5)
    cpu0 = proc_cpu(shp.pid)
    t0 = time.time()
    if args.pin:
        os.sched_setaffinity(0, {0})
    if args.rt:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
    write_fifo(fifo, data)
    acked = [0.0]

    def done():
        text = scrape(sm)
        acked[0] = total(text, "shipper_records_acked_total")
        return acked[0] + total(text, "shipper_lines_dropped_total") >= n

    wait_for(done, 3600, "every line acknowledged")
    wall = time.time() - t0
    cpu = proc_cpu(shp.pid) - cpu0
    text = scrape(sm)
    if perf:
        perf.send_signal(signal.SIGINT)
        perf.wait()
        if args.record:
            rec.send_signal(signal.SIGINT)
            rec.wait()
    else:
        subprocess.run(["callgrind_control", "-i", "off", str(shp.pid)], check=True,
                       stdout=subprocess.DEVNULL)
    for p in (shp, rcv):
        p.send_signal(signal.SIGTERM)
        p.wait()
    counts = {}
    if perf:
        for row in open(stat):
            parts = row.strip().split(",")
            if len(parts) > 2 and parts[0].replace(".", "").isdigit():
                counts[parts[2]] = float(parts[0])
    else:
        ir = subprocess.run(["callgrind_annotate", f"{d}/callgrind.out"], capture_output=True,
                            text=True).stdout
        m = re.search(r"^([\d,]+) \(100\.0%\)\s+PROGRAM TOTALS", ir, re.M) or \
            re.search(r"^([\d,]+)\s+PROGRAM TOTALS", ir, re.M)
        counts["Ir"] = float(m.group(1).replace(",", "")) if m else 0.0
    frames = total(text, "shipper_frames_sent_total")
    fbytes = total(text, "shipper_frame_bytes_sent_total")
    return {
        **({"Ir/line": counts.get("Ir", 0) / n} if args.callgrind else {
            "task_ns/line": counts.get("task-clock", 0) * 1e6 / n,
            "cpu_ns/line": cpu * 1e9 / n,
            "lines/cpu_s": n / max(cpu, 1e-9),
        }),
        "acked": acked[0], "dropped": total(text, "shipper_lines_dropped_total"),
        "frames": frames, "lines/frame": n / max(frames, 1),
        "bytes/frame": fbytes / max(frames, 1), "wall_s": wall,
        "sealed": {r: total(text, f'shipper_batches_sealed_total{{[^}}]*reason="{r}"[^}}]*}}')
                   for r in ("full", "interval", "idle")},
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bin")
    ap.add_argument("--lines", type=int, default=1000000)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--dir", default="/tmp/ipl")
    ap.add_argument("--pin", action="store_true",
                    help="pipe-throughput's allotment: shipper on CPU 1, writer and receiver on 0")
    ap.add_argument("--rt", action="store_true",
                    help="SCHED_FIFO for the shipper, receiver and writer: a loaded machine's "
                         "other work cannot preempt them, as on a quiet one")
    ap.add_argument("--ebpf", action="store_true", help="without --no-ebpf")
    ap.add_argument("--record", action="store_true",
                    help="perf record -g (cpu-clock samples) of the shipper into run*/perf.data")
    ap.add_argument("--callgrind", action="store_true",
                    help="count instructions (Ir) under valgrind's callgrind instead of CPU time")
    ap.add_argument("--batch", action="append", default=[],
                    help="a line added to [batch], e.g. 'seal_when_idle = false'")
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    cache = f"{args.dir}/load-{args.lines}.ndjson"
    if not os.path.exists(cache):
        with open(cache + ".tmp", "wb") as f:
            f.write(lines(args.lines))
        os.rename(cache + ".tmp", cache)
    data = open(cache, "rb").read()
    if not os.path.exists(f"{args.dir}/pki/ca.pem"):
        subprocess.run([args.bin, "dev-certs", "--dir", f"{args.dir}/pki"], check=True,
                       stdout=subprocess.DEVNULL)
    for run in range(args.runs):
        r = one_run(args, data, args.lines, run)
        print(" ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in r.items()), flush=True)


if __name__ == "__main__":
    main()
