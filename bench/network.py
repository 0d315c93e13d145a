"""Parle's communication win on shaped links: Parle (L = 25) vs Elastic-SGD (L = 0) across network namespaces.

Builds its own small network (root only): a coordinator namespace holding a bridge (10.213.0.1/24) and one
namespace per worker, each joined to the bridge by a veth pair (10.213.0.2, .3, ...). Links are shaped with a
token bucket (``tc qdisc ... tbf``) on the egress of both ends of every veth pair, so each worker has its own
RATE link to the coordinator in each direction. Only addresses assigned here are ever contacted; everything
is removed at the end, on errors and on SIGINT/SIGTERM (and namespaces left by a killed run are removed at
the start).

The real services run in the namespaces: ``parle coordinator`` in the coordinator namespace (a token file,
listening on the bridge address), one ``parle worker`` process per worker namespace (one torch thread each),
the job submitted with ``parle submit`` from the coordinator namespace (so the submission never crosses a
link). For each link setting and model, Parle (preset parle, L = 25: one exchange per 25 mini-batches) and
Elastic-SGD (preset elastic-sgd, L = 0: one exchange per mini-batch, the communication pattern of
data-parallel SGD) run one after the other, so machine load hits both alike.

What is measured, over a window of the same number of mini-batches per worker (``--batches``) after warm-up
rounds: wall-clock from the coordinator's round events ("time" of the round that closes the warm-up to the
round that closes the window), the slowest chain of each round summed (compute), and the bytes that crossed
the coordinator's veth ports in both directions (Ethernet frames: payload, gRPC/HTTP2, TCP/IP and Ethernet
headers), read when the bench sees those two round events in the job's metrics log (a lag of a few ms, a
small fraction of one round's bytes). The window is a fraction of a data pass; per-pass wall-clock is
extrapolated from it (one data pass = a replica's 60,000 samples = 468 mini-batches of 128), bytes per
sample are measured. Wall-clock depends on the CPU load of the machine; two figures do not: the bytes, and
"link s / pass", the time one data pass's bytes need on one worker's link at the tbf rate (upload and
download of a sync round do not overlap). Before each link setting, one TCP stream from worker 0 to the
coordinator checks what the link really carries. Nothing here asserts times.

    sudo .venv/bin/python -m bench.network [--models mnistfc lenet] [--rates none 1gbit 100mbit]
                                           [--batches 50] [--json]

Needs root, ``ip`` and ``tc`` (Debian package iproute2), the tbf qdisc (sch_tbf) and the bridge and veth
drivers, and Fashion-MNIST in /usr/share/datasets/fashion-mnist (Debian package dataset-fashion-mnist).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import yaml

PREFIX = "pbnet"  # every namespace this bench makes starts with it; leftovers with it are removed at start
COORD_NS = f"{PREFIX}-coord"
SUBNET = "10.213.0"  # private; only addresses assigned here are used
COORD_ADDR = f"{SUBNET}.1"
BRIDGE = "pbbr0"
REPO = Path(__file__).resolve().parent.parent
TRAIN_SIZE = 60_000  # Fashion-MNIST's training set: one data pass of one replica (frac 1)


@dataclass(frozen=True)
class Method:
    preset: str
    L: int  # mini-batches per round: max(L, 1)
    warmup: int  # rounds before the window: start-up (joins, data loading, first exchanges) stays out of it
    # Read the byte counters once the round's downloads are over (the link is quiet while the chain runs), so
    # a window of a few rounds holds whole rounds. Elastic-SGD's links are never quiet; its window has 50+
    # rounds, so a transfer more or less at either end is under 1%.
    settle: bool


METHODS = {"parle": Method("parle", 25, 1, settle=True), "elastic-sgd": Method("elastic-sgd", 0, 5, settle=False)}
PARAMS = {"mnistfc": 1_867_786, "lenet": 132_220}  # float32 elements exchanged per upload or download


class NetworkBenchError(RuntimeError):
    """The bench cannot run here (not root, a tool or kernel feature missing, a service that did not start)."""


def worker_ns(i: int) -> str:
    return f"{PREFIX}-w{i}"


def worker_addr(i: int) -> str:
    return f"{SUBNET}.{i + 2}"


def port_dev(i: int) -> str:
    """The coordinator-side end of worker i's veth pair (a bridge port): its counters are the wire."""
    return f"{PREFIX}-c{i}"


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise NetworkBenchError(f"{' '.join(cmd)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc


def own_namespaces(listing: str, prefix: str = PREFIX) -> list[str]:
    """The names in ``ip netns list`` output that this bench makes (``PREFIX-...``); others are never touched."""
    names = [line.split()[0] for line in listing.splitlines() if line.strip()]
    return [name for name in names if name.startswith(f"{prefix}-")]


def remove_namespaces(prefix: str = PREFIX) -> list[str]:
    """Delete every namespace named ``PREFIX-...`` (their veth ends and the bridge go with them)."""
    removed = own_namespaces(sh("ip", "netns", "list").stdout, prefix)
    for name in removed:
        sh("ip", "netns", "delete", name, check=False)
    return removed


def check_prerequisites() -> None:
    if os.geteuid() != 0:
        raise NetworkBenchError("needs root (it creates network namespaces, veth pairs and tc qdiscs)")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise NetworkBenchError(f"`{tool}` not found: install the Debian package iproute2")


@contextlib.contextmanager
def exclusive() -> Iterator[None]:
    """One bench.network at a time: a second one would remove the first one's namespaces at its start."""
    path = Path(tempfile.gettempdir()) / f"{PREFIX}.lock"
    with path.open("w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise NetworkBenchError(f"another bench.network is running (it holds {path})") from None
        yield


@contextlib.contextmanager
def network(workers: int) -> Iterator[None]:
    """The namespaces, bridge and veth pairs; removed on exit whatever happens."""
    remove_namespaces()
    try:
        sh("ip", "netns", "add", COORD_NS)
        sh("ip", "-n", COORD_NS, "link", "set", "lo", "up")
        sh("ip", "-n", COORD_NS, "link", "add", BRIDGE, "type", "bridge")
        sh("ip", "-n", COORD_NS, "addr", "add", f"{COORD_ADDR}/24", "dev", BRIDGE)
        sh("ip", "-n", COORD_NS, "link", "set", BRIDGE, "up")
        for i in range(workers):
            ns = worker_ns(i)
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            # Created inside the worker namespace, the coordinator end is then moved: no device ever
            # appears in the root namespace, so no name there can clash.
            sh("ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", port_dev(i))
            sh("ip", "-n", ns, "link", "set", port_dev(i), "netns", COORD_NS)
            sh("ip", "-n", ns, "addr", "add", f"{worker_addr(i)}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", COORD_NS, "link", "set", port_dev(i), "master", BRIDGE)
            sh("ip", "-n", COORD_NS, "link", "set", port_dev(i), "up")
        yield
    finally:
        remove_namespaces()


def shape(workers: int, rate: str | None) -> None:
    """Token bucket of ``rate`` on both ends of every link (None: unshaped). The burst is 10 ms at the rate,
    at least 64 KiB (a GSO segment), so a 100 Mbit/s link carries about 95 Mbit/s of TCP."""
    ends = [(COORD_NS, port_dev(i)) for i in range(workers)] + [(worker_ns(i), "eth0") for i in range(workers)]
    for ns, dev in ends:
        sh("tc", "-n", ns, "qdisc", "del", "dev", dev, "root", check=False)
        if rate is not None:
            burst = max(64 * 1024, int(rate_bits(rate) / 8 / 100))
            sh("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate, "burst", str(burst),
               "latency", "50ms")  # fmt: skip


# One TCP stream from worker 0 to the coordinator: what a shaped link really carries (tbf's rate counts
# Ethernet frames; a TCP stream gets about 95% of it as payload).
_RECEIVER = """
import socket, sys, time
s = socket.socket()
s.bind((sys.argv[1], 0))
s.listen(1)
print(s.getsockname()[1], flush=True)
c, _ = s.accept()
buf, n, t0 = bytearray(1 << 20), 0, None
while k := c.recv_into(buf):
    t0 = t0 or time.monotonic()
    n += k
print(n, time.monotonic() - t0, flush=True)
"""
_SENDER = """
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2]))) as c:
    c.sendall(bytes(int(sys.argv[3])))
"""


def link_mbit(nbytes: int = 16 << 20) -> float:
    """Payload Mbit/s of one TCP stream of ``nbytes`` from worker 0 to the coordinator, timed by the receiver
    from its first byte to the end."""
    receiver = subprocess.Popen(
        ["ip", "netns", "exec", COORD_NS, sys.executable, "-c", _RECEIVER, COORD_ADDR],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert receiver.stdout is not None
        port = receiver.stdout.readline().strip()
        sh("ip", "netns", "exec", worker_ns(0), sys.executable, "-c", _SENDER, COORD_ADDR, port, str(nbytes))
        received, seconds = receiver.stdout.readline().split()
    finally:
        receiver.kill()
        receiver.wait()
    if int(received) != nbytes:
        raise NetworkBenchError(f"link check: {received} of {nbytes} bytes arrived")
    return nbytes * 8 / float(seconds) / 1e6


def rate_bits(rate: str) -> float:
    """``100mbit`` -> 1e8 (tc's decimal units: kbit, mbit, gbit)."""
    units = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "bit": 1.0}
    for unit, scale in units.items():
        if rate.endswith(unit):
            return float(rate[: -len(unit)]) * scale
    raise ValueError(f"rate {rate!r}: expected a number with kbit, mbit or gbit (tc's units)")


def wire_bytes(workers: int) -> int:
    """Bytes sent and received by the coordinator's bridge ports, all links, both directions."""
    out = json.loads(sh("ip", "-n", COORD_NS, "-s", "-j", "link", "show", "master", BRIDGE).stdout)
    ports = {link["ifname"]: link["stats64"] for link in out}
    return sum(ports[port_dev(i)]["rx"]["bytes"] + ports[port_dev(i)]["tx"]["bytes"] for i in range(workers))


def quiet_wire_bytes(workers: int, quiet_s: float = 0.2, timeout_s: float = 10.0) -> int:
    """``wire_bytes`` once it has not changed for ``quiet_s`` (or after ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    last, since = wire_bytes(workers), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.02)
        now = wire_bytes(workers)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            break
    return last


def netns_python(ns: str, *args: str) -> list[str]:
    """This interpreter in namespace ``ns``, running this checkout's code."""
    return ["ip", "netns", "exec", ns, "env", f"PYTHONPATH={REPO}", sys.executable, "-m", "cluster.cli", *args]


def job_spec(model: str, method: str, workers: int, rounds: int) -> dict[str, Any]:
    m = METHODS[method]
    return {
        "name": f"net-{model}-{method}",
        "preset": m.preset,
        "replicas": workers,
        "epochs": 1000,  # max_rounds ends it
        "max_rounds": rounds,
        "model": {"name": model},
        "data": {"name": "fashion-mnist", "batch_size": 128},
        "optim": {"L": m.L},
        "eval": {"every_epochs": 1e12, "train_subset": 0},
        "checkpoint": {"every_rounds": 10**9},
        "runtime": {"lease_s": 600.0, "start_timeout_s": 600.0},
    }


@dataclass
class Measurement:
    model: str
    method: str
    link: str
    batches: int  # mini-batches per worker in the window
    rounds: int
    wall_s: float
    compute_s: float  # sum over the window's rounds of the slowest worker's chain
    wire_bytes: int
    samples: int  # all workers
    rate_bps: float | None  # the tbf rate of every link, each direction (None: unshaped)
    repeat: int = 0

    @property
    def bytes_per_sample(self) -> float:
        return self.wire_bytes / self.samples

    def pass_s(self, batches_per_pass: int) -> float:
        return self.wall_s / self.batches * batches_per_pass

    def link_floor_s(self, workers: int, batches_per_pass: int) -> float | None:
        """Seconds one data pass's bytes take on one worker's link at the tbf rate, whatever the CPU load: a
        sync round's upload and download do not overlap, so both directions add up."""
        if self.rate_bps is None:
            return None
        return self.wire_bytes / workers * batches_per_pass / self.batches * 8 / self.rate_bps

    def payload_bytes(self, workers: int) -> int:
        """The tensors alone: one upload and one download of the model per worker per round, float32."""
        return 2 * 4 * PARAMS[self.model] * workers * self.rounds


@dataclass
class Services:
    """The coordinator and worker processes of one measurement; their output goes to log files."""

    procs: list[subprocess.Popen[str]]
    logs: list[Path]

    def start(self, cmd: list[str], log: Path, stdout: int | None = None) -> subprocess.Popen[str]:
        with log.open("w") as f:
            proc = subprocess.Popen(cmd, stdout=stdout if stdout is not None else f, stderr=f, text=True)
        self.procs.append(proc)
        self.logs.append(log)
        return proc

    def tails(self, lines: int = 5) -> str:
        return "\n".join(
            f"--- {log.name}:\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
            for log in self.logs
            if log.exists()
        )

    def stop(self) -> None:
        for proc in reversed(self.procs):  # workers first, the coordinator last
            if proc.poll() is None:
                proc.terminate()
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_round(events: Path, round: int, timeout_s: float, services: Services) -> dict[str, Any]:
    """Poll the job's metrics log until the event of ``round`` closing appears; returns it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if events.exists():
            for line in events.read_text().splitlines():
                with contextlib.suppress(json.JSONDecodeError):
                    event = json.loads(line)
                    if event.get("kind") == "round" and event["round"] == round:
                        return event
                    if event.get("kind") == "state" and event["state"] in ("failed", "cancelled"):
                        raise NetworkBenchError(f"job {event['state']}: {event['message']}")
        dead = [log.stem for p, log in zip(services.procs, services.logs, strict=True) if p.poll() is not None]
        if dead:
            raise NetworkBenchError(f"exited early: {', '.join(dead)}")
        time.sleep(0.005)
    raise NetworkBenchError(f"round {round} did not close within {timeout_s:.0f} s")


def measure(
    model: str, method: str, rate: str | None, workers: int, batches: int, root: Path, timeout_s: float
) -> Measurement:
    steps, warmup = max(METHODS[method].L, 1), METHODS[method].warmup
    link = rate or "unshaped"
    if batches % steps:
        raise ValueError(f"--batches {batches} is not a multiple of {method}'s {steps} mini-batches per round")
    rounds = batches // steps
    run_dir = root / f"{model}-{method}-{link}"
    token = run_dir / "token"
    run_dir.mkdir()
    token.write_text(secrets.token_hex(16))
    token.chmod(0o600)
    spec = run_dir / "job.yaml"
    # One more round after the window: the model gathered at the last round is outside it.
    spec.write_text(yaml.safe_dump(job_spec(model, method, workers, warmup + rounds + 1)))
    services = Services([], [])
    try:
        cmd = netns_python(COORD_NS, "coordinator", "--listen", f"{COORD_ADDR}:0", "--token-file", str(token),
                           "--state-dir", str(run_dir / "state"))  # fmt: skip
        coordinator = services.start(
            cmd,
            run_dir / "coordinator.log",
            stdout=subprocess.PIPE,
        )
        assert coordinator.stdout is not None
        line = coordinator.stdout.readline()  # "parle coordinator listening on HOST:PORT"
        if "listening on" not in line:
            raise NetworkBenchError(f"coordinator did not start: {line!r}")
        address = line.rsplit(" ", 1)[1].strip()
        submit = sh(*netns_python(COORD_NS, "submit", str(spec), "--coordinator", address, "--token-file", str(token)))
        job_id = submit.stdout.strip().splitlines()[-1]
        for i in range(workers):
            cmd = netns_python(worker_ns(i), "worker", "--coordinator", address, "--job", job_id, "--token-file",
                               str(token), "--replica", str(i), "--name", f"{PREFIX}-w{i}", "--threads", "1",
                               "--reconnect-s", "60")  # fmt: skip
            services.start(cmd, run_dir / f"worker-{i}.log")
        events = run_dir / "state" / "jobs" / job_id / "metrics.jsonl"
        read = quiet_wire_bytes if METHODS[method].settle else wire_bytes
        start = wait_round(events, warmup - 1, timeout_s, services)
        bytes0 = read(workers)
        end = wait_round(events, warmup + rounds - 1, timeout_s, services)
        bytes1 = read(workers)
        window = [
            e
            for e in (json.loads(x) for x in events.read_text().splitlines() if x.strip())
            if e.get("kind") == "round" and warmup <= e["round"] < warmup + rounds
        ]
    except NetworkBenchError as err:
        raise NetworkBenchError(f"{model} {method} {link}: {err}\n{services.tails()}") from None
    finally:
        services.stop()
    return Measurement(
        model=model,
        method=method,
        link=link,
        rate_bps=None if rate is None else rate_bits(rate),
        batches=batches,
        rounds=rounds,
        wall_s=end["time"] - start["time"],
        compute_s=sum(e["chain_seconds"] for e in window),
        wire_bytes=bytes1 - bytes0,
        samples=workers * batches * 128,
    )


def _raise_on_signal(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # unwinds through the finally blocks: services, then namespaces


def print_row(r: Measurement, workers: int, batches_per_pass: int) -> None:
    share = 1 - r.compute_s / r.wall_s
    overhead = r.wire_bytes / r.payload_bytes(workers)
    floor = r.link_floor_s(workers, batches_per_pass)
    print(
        f"{r.model:<8}{r.link:>9}{r.method:>13}{r.rounds:>8}{r.wall_s:>10.1f}{r.compute_s:>11.1f}{100 * share:>11.0f}%"
        f"{r.pass_s(batches_per_pass):>10.0f}{'-' if floor is None else f'{floor:.1f}':>14}"
        f"{r.bytes_per_sample:>14,.0f}{overhead:>13.3f}x",
        flush=True,
    )


def ratios(results: list[Measurement]) -> dict[tuple[str, str], list[tuple[float, float]]]:
    """(model, link) -> [(wall-clock, bytes per sample) of Elastic-SGD / Parle] for each repeat, in order; each
    Elastic-SGD measurement against the Parle one of the same repeat (they ran back to back)."""
    out: dict[tuple[str, str], list[tuple[float, float]]] = {}
    parle = {(r.model, r.link, r.repeat): r for r in results if r.method == "parle"}
    for r in results:
        p = parle.get((r.model, r.link, r.repeat))
        if r.method == "elastic-sgd" and p is not None:
            out.setdefault((r.model, r.link), []).append((r.wall_s / p.wall_s, r.bytes_per_sample / p.bytes_per_sample))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["mnistfc", "lenet"], choices=sorted(PARAMS))
    parser.add_argument("--rates", nargs="+", default=["none", "1gbit", "100mbit"], help="tbf rates; none: unshaped")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument(
        "--batches", type=int, default=50, help="mini-batches per worker in the window (multiple of 25)"
    )
    parser.add_argument("--repeats", type=int, default=1, help="sweeps; each repeat swaps which method runs first")
    parser.add_argument("--timeout-s", type=float, default=900.0, help="per round event awaited")
    parser.add_argument("--json", action="store_true", help="also print one JSON line per measurement")
    args = parser.parse_args(argv)
    for rate in args.rates:
        if rate != "none":
            rate_bits(rate)
    if args.workers < 1 or args.workers > 250 or args.repeats < 1 or args.batches < 25 or args.batches % 25:
        parser.error("--workers 1-250, --repeats >= 1, --batches a positive multiple of 25")
    try:
        check_prerequisites()
    except NetworkBenchError as err:
        sys.exit(f"bench.network: {err}")
    signal.signal(signal.SIGTERM, _raise_on_signal)
    batches_per_pass = TRAIN_SIZE // 128
    print(
        f"{args.workers} workers (1 torch thread each) and a coordinator in their own network namespaces; window: "
        f"{args.batches} mini-batches of 128 per worker after warm-up rounds (Parle 1, Elastic-SGD 5), "
        f"extrapolated to one data pass ({batches_per_pass} mini-batches); compute = the slowest chain of each "
        "round, summed; comm share = 1 - compute / window; s / pass = the window's wall-clock extrapolated; link "
        "s / pass = the time a pass's bytes need on one link at the tbf rate (independent of CPU load); bytes = "
        "Ethernet frames at the coordinator's ports, both directions; payload = the float32 tensors (one upload "
        "and one download per worker per round)"
    )
    print(
        f"{'model':<8}{'link':>9}{'method':>13}{'rounds':>8}{'window s':>10}{'compute s':>11}{'comm share':>12}"
        f"{'s / pass':>10}{'link s / pass':>14}{'bytes/sample':>14}{'wire/payload':>14}"
    )
    results: list[Measurement] = []
    started = time.monotonic()
    with exclusive(), tempfile.TemporaryDirectory(prefix="bench-network-") as tmp, network(args.workers):
        for repeat in range(args.repeats):
            for rate in args.rates:
                shaped = None if rate == "none" else rate
                shape(args.workers, shaped)
                link = shaped or "unshaped"
                carried = link_mbit()
                print(f"link {link}: one TCP stream worker 0 -> coordinator carried {carried:,.0f} Mbit/s", flush=True)
                if args.json:
                    print(json.dumps({"link": link, "repeat": repeat, "tcp_mbit_s": carried}), flush=True)
                for model in args.models:
                    order = list(METHODS) if repeat % 2 == 0 else list(reversed(METHODS))
                    for method in order:
                        root = Path(tmp) / f"repeat{repeat}"
                        root.mkdir(exist_ok=True)
                        r = measure(model, method, shaped, args.workers, args.batches, root, args.timeout_s)
                        r.repeat = repeat
                        results.append(r)
                        print_row(r, args.workers, batches_per_pass)
                        if args.json:
                            print(json.dumps({**asdict(r), "pass_s": r.pass_s(batches_per_pass),
                                              "link_floor_pass_s": r.link_floor_s(args.workers, batches_per_pass),
                                              "bytes_per_sample": r.bytes_per_sample}), flush=True)  # fmt: skip
    print("\nElastic-SGD / Parle (the papers: Parle 2-4x faster than data-parallel SGD):")
    for (model, link), pairs in ratios(results).items():
        walls = ", ".join(f"{w:.2f}x" for w, _ in pairs)
        sizes = ", ".join(f"{b:.1f}x" for _, b in pairs)
        print(f"  {model:<8}{link:>9}: wall-clock {walls}; bytes per sample {sizes}")
        if args.json:
            print(json.dumps({"model": model, "link": link, "wall_ratio": [w for w, _ in pairs],
                              "bytes_ratio": [b for _, b in pairs]}))  # fmt: skip
    left = own_namespaces(sh("ip", "netns", "list").stdout)
    print(f"\ntotal {time.monotonic() - started:.0f} s; namespaces left: {', '.join(left) or 'none'}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("bench.network: interrupted; services stopped, namespaces removed")
    except NetworkBenchError as err:
        sys.exit(f"bench.network: {err}")
