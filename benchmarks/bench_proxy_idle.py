"""vsock-proxy with many clients vs a plain thread-per-connection relay, measured in the same run (issue 18.4).

All over TCP on 127.0.0.1 (the stand-in for AF_VSOCK), each party its own process:
client (this process) → relay process → upstream process. The relay is either

* baseline ("plain relay"): two threads per connection, ``recv_into`` + ``sendall``, 256 KiB buffers,
  no connection limit (the relay of benchmarks/bench_vsock_proxy.py);
* proxy: ``enclavekit vsock-proxy --listen tcp://...`` (default ``-w``, limits and timeouts).

Three measurements, each against the baseline in the same run:

1. latency: IDLE connections are opened and held silent, then PROBES new clients each connect, send
   1 KiB, read the 1 KiB echo and close, one after another; p50/p99 of that round trip.
   Target: proxy p99 < 50 ms.
2. memory: RSS (VmRSS) of the relay process before and after opening the idle connections, per
   connection (user-space memory only; kernel socket buffers are not in RSS).
3. throughput: CONCURRENT clients each push SIZE bytes at once and wait for the sink's byte count;
   aggregate MB/s; each round runs both back to back (order alternating) and the result is the median
   of the per-round ratios (the machine may be shared). Target: ratio proxy/baseline ≥ 0.9.

    python benchmarks/bench_proxy_idle.py                      # 1,000 idle, 100 × 8 MiB, 5 rounds
    python benchmarks/bench_proxy_idle.py --idle 200 --size 2MiB   # quick
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

CHUNK = 256 * 1024
TARGET_P99_MS = 50.0
TARGET_RATIO = 0.9

RAISE_NOFILE = r"""
import resource
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
try:
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
except (ValueError, OSError):
    pass
"""

# One thread, epoll: echoes every connection (idle ones cost nothing here).
ECHO = (
    RAISE_NOFILE
    + r"""
import selectors, socket
srv = socket.create_server(("127.0.0.1", 0), backlog=4096); srv.setblocking(False)
print(srv.getsockname()[1], flush=True)
sel = selectors.DefaultSelector(); sel.register(srv, selectors.EVENT_READ)
while True:
    for key, _ in sel.select():
        s = key.fileobj
        if s is srv:
            try:
                c, _ = srv.accept()
            except BlockingIOError:
                continue
            c.setblocking(False); sel.register(c, selectors.EVENT_READ); continue
        try:
            data = s.recv(65536)
        except OSError:
            data = b""
        if data:
            s.setblocking(True); s.sendall(data); s.setblocking(False)
        else:
            sel.unregister(s); s.close()
"""
)

SINK = (
    RAISE_NOFILE
    + r"""
import socket, struct, threading
srv = socket.create_server(("127.0.0.1", 0), backlog=4096); print(srv.getsockname()[1], flush=True)
def handle(c):
    buf = bytearray(1 << 18); n = 0
    try:
        while True:
            k = c.recv_into(buf)
            if not k: break
            n += k
        c.sendall(struct.pack(">Q", n))
    except OSError:
        pass
    finally:
        c.close()
while True:
    c, _ = srv.accept(); threading.Thread(target=handle, args=(c,), daemon=True).start()
"""
)

BASELINE = (
    RAISE_NOFILE
    + r"""
import socket, sys, threading
threading.stack_size(256 * 1024)
up = int(sys.argv[1]); size = int(sys.argv[2])
srv = socket.create_server(("127.0.0.1", 0), backlog=4096); print(srv.getsockname()[1], flush=True)
def pump(a, b):
    buf = bytearray(size); view = memoryview(buf)
    try:
        while True:
            k = a.recv_into(buf)
            if not k: break
            b.sendall(view[:k])
        b.shutdown(socket.SHUT_WR)
    except OSError:
        pass
def handle(c):
    u = socket.create_connection(("127.0.0.1", up))
    u.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    t = threading.Thread(target=pump, args=(u, c)); t.start(); pump(c, u); t.join(); c.close(); u.close()
while True:
    c, _ = srv.accept(); threading.Thread(target=handle, args=(c,), daemon=True).start()
"""
)


def parse_size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    text = text.strip().lower().removesuffix("ib").removesuffix("b")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def raise_own_nofile() -> int:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def start_script(script: str, *args: str) -> tuple[subprocess.Popen[bytes], int]:
    proc = subprocess.Popen(
        [sys.executable, "-c", script, *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port: int = probe.getsockname()[1]
        return port


def wait_port(port: int, deadline: float = 20.0) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


@contextlib.contextmanager
def proxy_process(target_port: int, workers: int | None) -> Iterator[tuple[int, int]]:
    """``enclavekit vsock-proxy`` towards 127.0.0.1:target_port; yields (listen port, pid)."""
    enclavekit = str(Path(sys.executable).parent / "enclavekit")
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "allowlist.yaml"
        config.write_text(f"allowlist:\n- {{address: 127.0.0.1, port: {target_port}}}\n")
        port = free_port()
        args = [
            enclavekit,
            "vsock-proxy",
            "8000",
            "127.0.0.1",
            str(target_port),
            "--config",
            str(config),
            "--listen",
            f"tcp://127.0.0.1:{port}",
        ]
        if workers is not None:
            args += ["-w", str(workers)]
        proc = subprocess.Popen(args, stderr=subprocess.DEVNULL)
        try:
            wait_port(port)
            yield port, proc.pid
        finally:
            proc.terminate()
            proc.wait(10)


@contextlib.contextmanager
def baseline_process(target_port: int) -> Iterator[tuple[int, int]]:
    proc, port = start_script(BASELINE, str(target_port), str(CHUNK))
    try:
        yield port, proc.pid
    finally:
        proc.kill()
        proc.wait(10)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return -1


def settle_rss(pid: int) -> int:
    """RSS once it stops moving (connections are set up asynchronously in the relay)."""
    last = rss_kib(pid)
    for _ in range(50):
        time.sleep(0.1)
        now = rss_kib(pid)
        if now == last:
            return now
        last = now
    return last


def open_idle(port: int, count: int) -> list[socket.socket]:
    idle = []
    for _ in range(count):
        idle.append(socket.create_connection(("127.0.0.1", port), timeout=10))
    # Make sure every one of them is relayed (upstream connected): one byte each way.
    for sock in idle:
        sock.sendall(b"!")
    for sock in idle:
        sock.settimeout(10)
        if sock.recv(1) != b"!":
            raise SystemExit("an idle connection was not relayed")
    return idle


def probe(port: int, payload: bytes) -> float:
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(10)
        sock.sendall(payload)
        got = 0
        while got < len(payload):
            chunk = sock.recv(len(payload) - got)
            if not chunk:
                raise SystemExit("relay closed before the echo came back")
            got += len(chunk)
    return time.perf_counter() - started


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def latency_and_memory(
    relay: contextlib.AbstractContextManager[tuple[int, int]], idle_count: int, probes: int
) -> tuple[float, float, float]:
    """(p50 ms, p99 ms, RSS KiB per idle connection) with ``idle_count`` silent clients held."""
    payload = os.urandom(1024)
    with relay as (port, pid):
        for _ in range(20):  # warm up threads and loops
            probe(port, payload)
        before = settle_rss(pid)
        idle = open_idle(port, idle_count)
        try:
            after = settle_rss(pid)
            times = [probe(port, payload) for _ in range(probes)]
        finally:
            for sock in idle:
                sock.close()
    per_conn = (after - before) / idle_count
    return percentile(times, 0.5) * 1e3, percentile(times, 0.99) * 1e3, per_conn


def transfer(port: int, size: int, out: list[float], index: int) -> None:
    data = memoryview(bytes(CHUNK))
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.settimeout(120)
        left = size
        while left:
            n = min(left, CHUNK)
            sock.sendall(data[:n])
            left -= n
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while len(answer) < 8:
            chunk = sock.recv(8 - len(answer))
            if not chunk:
                raise SystemExit("relay closed before the sink answered")
            answer += chunk
    (count,) = struct.unpack(">Q", answer)
    out[index] = float(count)


def concurrent_rate(port: int, clients: int, size: int) -> float:
    """Aggregate MB/s of ``clients`` simultaneous transfers of ``size`` bytes."""
    counts = [0.0] * clients
    threads = [
        threading.Thread(target=transfer, args=(port, size, counts, i)) for i in range(clients)
    ]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    if counts != [float(size)] * clients:
        raise SystemExit("a transfer lost bytes")
    return clients * size / elapsed / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idle", type=int, default=1000, help="idle connections held open")
    parser.add_argument("--probes", type=int, default=300, help="new clients timed")
    parser.add_argument("--concurrent", type=int, default=100, help="simultaneous transfers")
    parser.add_argument("--size", default="8MiB", help="bytes per transfer")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--workers", type=int, default=None, help="vsock-proxy -w (default: its own)"
    )
    args = parser.parse_args()
    size = parse_size(args.size)
    soft = raise_own_nofile()
    if soft < args.idle + args.concurrent + 256:
        raise SystemExit(f"RLIMIT_NOFILE {soft} is too low for --idle {args.idle}")

    echo, echo_port = start_script(ECHO)
    sink, sink_port = start_script(SINK)
    try:
        base_p50, base_p99, base_mem = latency_and_memory(
            baseline_process(echo_port), args.idle, args.probes
        )
        proxy_p50, proxy_p99, proxy_mem = latency_and_memory(
            proxy_process(echo_port, args.workers), args.idle, args.probes
        )
        rates: dict[str, list[float]] = {"baseline": [], "proxy": []}
        with (
            baseline_process(sink_port) as (base_port, _),
            proxy_process(sink_port, args.workers) as (proxy_port, _),
        ):
            concurrent_rate(base_port, args.concurrent, CHUNK)  # warm up both
            concurrent_rate(proxy_port, args.concurrent, CHUNK)
            for round_ in range(args.rounds):
                order = [("baseline", base_port), ("proxy", proxy_port)]
                for name, port in order if round_ % 2 == 0 else order[::-1]:
                    rate = concurrent_rate(port, args.concurrent, size)
                    rates[name].append(rate)
                    print(f"round {round_ + 1}: {name:8s} {rate:8.1f} MB/s", file=sys.stderr)
    finally:
        echo.kill()
        sink.kill()
    # The machine may be shared: each round measures both back to back (order alternating), and the
    # median of the per-round ratios is the result, so load drifting during the run affects both alike.
    ratio = statistics.median(p / b for p, b in zip(rates["proxy"], rates["baseline"], strict=True))
    best = {name: statistics.median(values) for name, values in rates.items()}
    workers = "default" if args.workers is None else str(args.workers)
    print(f"vsock-proxy -w {workers}; {args.idle} idle connections held; {args.probes} new clients")
    print(
        f"1 KiB round trip, new client : proxy p50 {proxy_p50:.2f} ms p99 {proxy_p99:.2f} ms | "
        f"plain relay p50 {base_p50:.2f} ms p99 {base_p99:.2f} ms | "
        f"ratio p99 proxy/plain {proxy_p99 / base_p99:.2f} (target: proxy p99 < {TARGET_P99_MS:.0f} ms)"
    )
    print(
        f"memory per idle connection    : proxy {proxy_mem:.1f} KiB | plain relay {base_mem:.1f} KiB "
        f"(relay process RSS delta / {args.idle}; kernel socket buffers not included)"
    )
    print(
        f"{args.concurrent} concurrent × {size / (1 << 20):g} MiB : plain relay "
        f"{best['baseline']:.1f} MB/s, proxy {best['proxy']:.1f} MB/s (medians of {args.rounds} rounds)"
    )
    print(
        f"ratio proxy/plain relay       : {ratio:.2f} (median of per-round ratios; "
        f"target >= {TARGET_RATIO})"
    )
    from _results import record  # here, so edits to the measurement above merge cleanly

    idle = f"{args.idle} idle connections held"
    record(
        bench="bench_proxy_idle",
        figure=f"vsock-proxy rate / plain relay rate, {args.concurrent} concurrent x {size / (1 << 20):g} MiB",
        value=ratio,
        unit="ratio",
        baseline=f"plain thread-per-connection relay ({best['baseline']:.1f} MB/s), median of {args.rounds} per-round ratios",
        target=f">= {TARGET_RATIO}",
        met=ratio >= TARGET_RATIO,
        headline=True,
    )
    record(
        bench="bench_proxy_idle",
        figure=f"vsock-proxy p99 1 KiB round trip, new client, {idle}",
        value=proxy_p99,
        unit="ms",
        baseline=f"plain relay p99 {base_p99:.2f} ms (ratio {proxy_p99 / base_p99:.2f}), same run",
        target=f"< {TARGET_P99_MS:g} ms",
        met=proxy_p99 < TARGET_P99_MS,
        headline=True,
    )
    record(
        bench="bench_proxy_idle",
        figure=f"vsock-proxy memory per idle connection, {idle}",
        value=proxy_mem,
        unit="KiB",
        baseline=f"plain relay {base_mem:.1f} KiB (relay process RSS delta; kernel buffers not included)",
    )
    if proxy_p99 >= TARGET_P99_MS or ratio < TARGET_RATIO:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
