"""Coordinator hardening against a real server on 127.0.0.1: bounded specs, streams, uploads and lists;
finished jobs leaving memory; SIGTERM and the state-directory lock on a real ``parle coordinator``;
worker and client roles; duties only from the worker assigned."""

from __future__ import annotations

import gc
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
import yaml
from prometheus_client import REGISTRY

from cluster.client import Endpoint, JobsClient
from coordinator.server import CoordinatorServer
from coordinator.service import StateDirLocked
from protos import parle_pb2 as pb
from protos import parle_pb2_grpc as pb_grpc
from protos.codec import MAX_CHUNK_BYTES, encode_tensors
from protos.spec import SpecError, load_spec, resolve
from worker.loop import WorkerLoop
from worker.transports.grpc import GrpcTransport

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 10.0
N = 1000  # elements of the raw workers' tensors: the coordinator does not know the model
SPEC: dict[str, Any] = {
    "name": "hard",
    "preset": "parle",
    "replicas": 1,
    "epochs": 1000,
    "model": {"name": "lenet"},
    "data": {"name": "synthetic", "synthetic_size": 256, "batch_size": 32},
    "optim": {"L": 2},
    "eval": {"every_epochs": 1e12},
    "runtime": {"lease_s": 3600.0},
}


def spec(**changes: Any) -> dict[str, Any]:
    return {**SPEC, **changes}


def alias_bomb(levels: int = 9) -> str:
    lines = ["name: bomb", "model:", "  name: lenet", "  options:", "    a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels):
        lines.append(f"    a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]")
    return "\n".join(lines) + "\n"


def join(coord: pb_grpc.CoordinatorStub, job_id: str, name: str = "raw", md: Any = ()) -> str:
    request = pb.JoinRequest(worker_name=name, device="cpu", job_id=job_id)
    replies = list(coord.Join(request, metadata=list(md), timeout=TIMEOUT))
    return str(replies[0].header.worker_id)


def upload(job_id: str, worker_id: str, round: int, mu: torch.Tensor) -> list[pb.ExchangeChunk]:
    headers, chunks = encode_tensors([("mu", mu)])
    head = pb.ExchangeUpload(
        worker_id=worker_id,
        job_id=job_id,
        round=round,
        train_loss=1.0,
        inner_steps=2,
        samples=64,
        chain_seconds=0.01,
        tensors=headers,
        train_size=256,
    )
    return [pb.ExchangeChunk(upload=head), *(pb.ExchangeChunk(chunk=c) for c in chunks)]


def exchange(coord: pb_grpc.CoordinatorStub, job_id: str, worker_id: str, round: int, md: Any = ()) -> Any:
    replies = list(
        coord.Exchange(iter(upload(job_id, worker_id, round, torch.ones(N))), metadata=list(md), timeout=TIMEOUT)
    )
    return replies[0].download


def code_of(send: Callable[[], object]) -> tuple[str, str]:
    try:
        send()
    except grpc.RpcError as err:
        return err.code().name, err.details() or ""  # type: ignore[attr-defined]
    return "OK", ""


@pytest.fixture
def server(tmp_path: Path) -> Iterator[CoordinatorServer]:
    with CoordinatorServer(tmp_path / "state", upload_idle_s=1.0, inflight_bytes=64 << 20) as srv:
        yield srv


@pytest.fixture
def stubs(server: CoordinatorServer) -> Iterator[tuple[pb_grpc.CoordinatorStub, pb_grpc.JobsStub]]:
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.CoordinatorStub(channel), pb_grpc.JobsStub(channel)


# =====================================================================================================
# Bounded specs
# =====================================================================================================


@pytest.mark.timeout(60)
def test_alias_bomb_refused_fast_while_heartbeats_answer(
    server: CoordinatorServer, stubs: tuple[pb_grpc.CoordinatorStub, pb_grpc.JobsStub], tmp_path: Path
) -> None:
    coord, jobs = stubs
    job_id = server.manager.submit(resolve(spec()))
    worker_id = join(coord, job_id)
    beats: list[float] = []
    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.is_set():
            started = time.monotonic()
            coord.Heartbeat(pb.HeartbeatRequest(worker_id=worker_id, job_id=job_id), timeout=TIMEOUT)
            beats.append(time.monotonic() - started)
            time.sleep(0.01)

    beater = threading.Thread(target=heartbeat, daemon=True)
    beater.start()
    try:
        for levels in (6, 9, 12):
            started = time.monotonic()
            code, details = code_of(
                lambda n=levels: jobs.Submit(pb.SubmitRequest(spec_yaml=alias_bomb(n)), timeout=TIMEOUT)  # type: ignore[misc]
            )
            took = time.monotonic() - started
            assert code == "INVALID_ARGUMENT" and "aliases" in details, (code, details)
            assert took < 1.0, f"an alias bomb of {levels} levels took {took:.2f}s to refuse"
        huge = "name: big\nmodel: {name: lenet, options: {pad: '" + "x" * (100 << 10) + "'}}\n"
        code, details = code_of(lambda: jobs.Submit(pb.SubmitRequest(spec_yaml=huge), timeout=TIMEOUT))
        assert code == "INVALID_ARGUMENT" and "larger than the limit" in details, (code, details)
    finally:
        stop.set()
        beater.join(timeout=TIMEOUT)
    assert beats and max(beats) < 1.0, f"heartbeats took up to {max(beats):.2f}s"
    assert [r.id for r in server.manager.list()] == [job_id], "a refused spec registered a job"
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(alias_bomb(12))
    started = time.monotonic()
    with pytest.raises(SpecError, match="aliases"):
        load_spec(bomb)
    assert time.monotonic() - started < 1.0


@pytest.mark.parametrize(
    "path,value",
    [
        ("optim.gamma_growth", 1e300),
        ("optim.round_deadline_s", float("inf")),
        ("model.width", 10**9),
        ("model.depth", 10**6),
        ("data.batch_size", 10**18),
        ("data.synthetic_size", 10**12),
        ("data.test_batch_size", 10**9),
        ("data.bn_batches", 10**9),
        ("eval.every_epochs", float("inf")),
        ("eval.every_epochs", float("nan")),
        ("runtime.lease_s", float("inf")),
        ("runtime.start_timeout_s", 1e300),
        ("seed", 2**70),
        ("seed", -1),
        ("replicas", 100_000),
        ("checkpoint.keep", 10**9),
        ("optim.lr_drop_epochs", [float("inf")]),
    ],
)
def test_unbounded_numbers_are_refused(path: str, value: Any) -> None:
    raw: dict[str, Any] = {}
    node = raw
    *parents, leaf = path.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    with pytest.raises(SpecError, match=path.split(".")[-1]):
        resolve(raw)


# =====================================================================================================
# Streams, uploads and the byte budget
# =====================================================================================================


@pytest.mark.timeout(120)
def test_300_watch_streams_leave_get_and_heartbeat_answering(server: CoordinatorServer) -> None:
    job_id = server.manager.submit(resolve(spec()))
    channels = [grpc.insecure_channel(server.address) for _ in range(10)]
    calls: list[Any] = []
    try:
        coord = pb_grpc.CoordinatorStub(channels[0])
        worker_id = join(coord, job_id)
        for i in range(300):
            calls.append(pb_grpc.JobsStub(channels[i % 10]).Watch(pb.WatchRequest(job_id=job_id), timeout=60))
        outcomes = {"open": 0, "RESOURCE_EXHAUSTED": 0}
        for call in calls:
            try:
                first = next(call)
                assert first.WhichOneof("event") == "snapshot"
                outcomes["open"] += 1
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err  # type: ignore[attr-defined]
                assert "Watch" in (err.details() or "")  # type: ignore[attr-defined]
                outcomes["RESOURCE_EXHAUSTED"] += 1
        limit = server.limits.streams.limits["Watch"]
        assert outcomes == {"open": limit, "RESOURCE_EXHAUSTED": 300 - limit}
        jobs = pb_grpc.JobsStub(channels[1])
        for _ in range(5):
            started = time.monotonic()
            info = jobs.Get(pb.GetRequest(job_id=job_id), timeout=5)
            beat = coord.Heartbeat(pb.HeartbeatRequest(worker_id=worker_id, job_id=job_id), timeout=5)
            assert info.id == job_id and not beat.stop
            assert time.monotonic() - started < 2.0
    finally:
        for call in calls:
            call.cancel()
        for channel in channels:
            channel.close()
    deadline = time.monotonic() + 10
    while server.limits.streams.open("Watch") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.limits.streams.open("Watch") == 0, "cancelled Watch streams still hold their slots"


def stalled_upload(job_id: str, worker_id: str, elements: int, release: threading.Event) -> Iterator[pb.ExchangeChunk]:
    messages = upload(job_id, worker_id, 0, torch.zeros(elements))
    yield messages[0]  # the header, then nothing
    release.wait(30)


@pytest.mark.timeout(120)
def test_stalled_uploads_do_not_block_another_jobs_exchange(
    server: CoordinatorServer, stubs: tuple[pb_grpc.CoordinatorStub, pb_grpc.JobsStub]
) -> None:
    coord, _ = stubs
    stalled_job = server.manager.submit(resolve(spec(name="stalled", replicas=2)))
    staller = join(coord, stalled_job)
    other_job = server.manager.submit(resolve(spec(name="other")))
    worker = join(coord, other_job)
    release = threading.Event()
    # 8 uploads of 16 MiB each, with a budget of 64 MiB: 4 hold it all, 4 wait for it.
    stalls = [coord.Exchange(stalled_upload(stalled_job, staller, 4 << 20, release), timeout=60) for _ in range(8)]
    try:
        # The stalled uploads hold the byte budget until the idle timeout (1 s here) ends them; the other
        # job's exchange may be told RESOURCE_EXHAUSTED meanwhile, and sends again as a worker does.
        deadline = time.monotonic() + 30
        while True:
            try:
                reply = exchange(coord, other_job, worker, 0)
                break
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err  # type: ignore[attr-defined]
                assert time.monotonic() < deadline, "the other job's exchange never got through"
                time.sleep(0.1)
        assert reply.closed_round == 0
        codes = [code_of(lambda c=call: list(c))[0] for call in stalls]  # type: ignore[misc]
        assert set(codes) <= {"CANCELLED", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"}, codes
    finally:
        release.set()
        for call in stalls:
            call.cancel()
    deadline = time.monotonic() + 10
    while server.limits.budget.held and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.limits.budget.held == 0
    assert server.manager.job(stalled_job).round == 0, "a stalled upload changed its job"


def trickling_upload(job_id: str, worker_id: str, elements: int, release: threading.Event) -> Iterator[Any]:
    """An upload that keeps the idle timeout at bay (a chunk every 0.5 s) and never completes."""
    for message in upload(job_id, worker_id, 0, torch.zeros(elements))[:-1]:
        yield message
        if release.wait(0.5):
            return


@pytest.mark.timeout(180)
def test_a_worker_sends_its_upload_again_while_the_byte_budget_is_spoken_for(
    server: CoordinatorServer, stubs: tuple[pb_grpc.CoordinatorStub, pb_grpc.JobsStub]
) -> None:
    coord, _ = stubs
    hog_job = server.manager.submit(resolve(spec(name="hog", replicas=2)))
    hog = join(coord, hog_job)
    release = threading.Event()
    hold = coord.Exchange(trickling_upload(hog_job, hog, 16 << 20, release), timeout=120)  # all 64 MiB
    job_id = server.manager.submit(resolve(spec(name="patient", max_rounds=3)))
    retries = ("parle_worker_exchange_retries_total", {"job_id": job_id})
    transport = GrpcTransport(server.address, job_id=job_id)
    loop = WorkerLoop(transport, "w0")
    failures: list[BaseException] = []

    def run() -> None:
        try:
            loop.run()
        except BaseException as err:  # the test reports it
            failures.append(err)

    worker = threading.Thread(target=run, daemon=True)
    try:
        deadline = time.monotonic() + 30
        while server.limits.budget.held < 64 << 20:
            assert time.monotonic() < deadline, "the trickling upload never took the budget"
            time.sleep(0.05)
        worker.start()
        deadline = time.monotonic() + 60
        while not REGISTRY.get_sample_value(*retries):  # refused RESOURCE_EXHAUSTED at least once, sent again
            assert time.monotonic() < deadline and not failures, failures or "the worker was never refused"
            time.sleep(0.1)
        assert server.manager.job(job_id).round == 0
    finally:
        release.set()  # the hog's upload ends unfinished: its bytes are let go
        code_of(lambda: list(hold))
        worker.join(timeout=120)
        transport.close()
    assert not failures, failures
    assert server.manager.job(job_id).wait(30).value == "succeeded" and loop.joins == 1


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ["Report", "Exchange"])
def test_8_gib_declaration_refused_before_its_bytes(
    server: CoordinatorServer, stubs: tuple[pb_grpc.CoordinatorStub, pb_grpc.JobsStub], method: str
) -> None:
    coord, _ = stubs
    job_id = server.manager.submit(resolve(spec()))
    worker_id = join(coord, job_id)
    total = 8 << 30
    big = pb.TensorHeader(
        name="x", dtype=pb.DTYPE_UINT8, shape=[total], total_bytes=total, num_chunks=math.ceil(total / MAX_CHUNK_BYTES)
    )
    first_chunk = pb.TensorChunk(tensor_index=0, chunk_index=0, data=bytes(MAX_CHUNK_BYTES))
    more = threading.Event()

    def stream() -> Iterator[Any]:
        if method == "Report":
            yield pb.ReportChunk(header=pb.ReportHeader(worker_id=worker_id, job_id=job_id, tensors=[big]))
            yield pb.ReportChunk(chunk=first_chunk)
        else:
            head = pb.ExchangeUpload(worker_id=worker_id, job_id=job_id, tensors=[big], train_size=256)
            yield pb.ExchangeChunk(upload=head)
            yield pb.ExchangeChunk(chunk=first_chunk)
        more.wait(10)  # the sender would go on; the answer must not wait for it

    call = coord.Report if method == "Report" else coord.Exchange
    started = time.monotonic()
    code, details = code_of(
        lambda: list(call(stream(), timeout=TIMEOUT)) if method == "Exchange" else call(stream(), timeout=TIMEOUT)
    )
    more.set()
    assert code == "RESOURCE_EXHAUSTED" and "8589934592 bytes" in details, (code, details)
    assert time.monotonic() - started < 2.0
    assert server.limits.budget.held == 0


@pytest.mark.timeout(60)
def test_small_chunks_refused(
    server: CoordinatorServer, stubs: tuple[pb_grpc.CoordinatorStub, pb_grpc.JobsStub]
) -> None:
    coord, _ = stubs
    job_id = server.manager.submit(resolve(spec()))
    worker_id = join(coord, job_id)
    mu = torch.ones(50_000)
    for chunk_bytes in (1, 4096):  # far too many chunks announced
        headers, chunks = encode_tensors([("mu", mu)], chunk_bytes=chunk_bytes)
        head = upload(job_id, worker_id, 0, mu)[0]
        head.upload.ClearField("tensors")
        head.upload.tensors.extend(headers)
        messages = [head, *(pb.ExchangeChunk(chunk=c) for c in chunks)]
        code, details = code_of(lambda m=messages: list(coord.Exchange(iter(m), timeout=TIMEOUT)))  # type: ignore[misc]
        assert code == "INVALID_ARGUMENT" and "at least" in details, (code, details)
    # A plan of full chunks whose second chunk comes short.
    headers, chunks = encode_tensors([("mu", mu)], chunk_bytes=64 * 1024)
    chunk_list = list(chunks)
    chunk_list[0].data = chunk_list[0].data[:1000]
    head = upload(job_id, worker_id, 0, mu)[0]
    head.upload.ClearField("tensors")
    head.upload.tensors.extend(headers)
    code, details = code_of(
        lambda: list(coord.Exchange(iter([head, *(pb.ExchangeChunk(chunk=c) for c in chunk_list)]), timeout=TIMEOUT))
    )
    assert code == "INVALID_ARGUMENT" and "full" in details, (code, details)
    assert server.manager.job(job_id).round == 0


@pytest.mark.timeout(60)
def test_list_pages_and_pending_cap(tmp_path: Path) -> None:
    with CoordinatorServer(tmp_path / "state", max_pending_jobs=5) as srv, JobsClient(Endpoint(srv.address)) as client:
        ids = [client.submit(yaml.safe_dump(spec())) for _ in range(5)]
        with pytest.raises(Exception, match=r"waiting for workers"):
            client.submit(yaml.safe_dump(spec()))
        for job_id in ids[:3]:
            client.cancel(job_id)
        ids += [client.submit(yaml.safe_dump(spec())) for _ in range(3)]
        listed = [j.id for j in client.jobs(page_size=3)]
        assert listed == list(reversed(ids)), "pages lost, repeated or misordered jobs"
        first = client.stub.List(pb.ListRequest(page_size=3), timeout=TIMEOUT)
        assert len(first.jobs) == 3 and first.next_page_token
        newest = client.stub.List(pb.ListRequest(limit=2), timeout=TIMEOUT)
        assert [j.id for j in newest.jobs] == list(reversed(ids))[:2] and not newest.next_page_token
        cancelled = client.stub.List(pb.ListRequest(states=[pb.JOB_STATE_CANCELLED]), timeout=TIMEOUT)
        assert sorted(j.id for j in cancelled.jobs) == sorted(ids[:3])
        code, _ = code_of(lambda: client.stub.List(pb.ListRequest(page_token="nonsense"), timeout=TIMEOUT))
        assert code == "INVALID_ARGUMENT"


# =====================================================================================================
# Lifecycle
# =====================================================================================================


def open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def series_of(job_id: str) -> int:
    return sum(1 for metric in REGISTRY.collect() for sample in metric.samples if sample.labels.get("job_id") == job_id)


@pytest.mark.timeout(300)
def test_submit_cancel_cycles_return_files_and_memory(tmp_path: Path) -> None:
    cycles, warmup = 1000, 100
    text = yaml.safe_dump(spec(name="cycle"))
    with (
        CoordinatorServer(tmp_path / "state", release_after_s=0.0, metrics_retention_s=0.0) as srv,
        JobsClient(Endpoint(srv.address)) as client,
    ):

        def settle() -> None:
            deadline = time.monotonic() + 10
            while srv.manager.live_jobs() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert srv.manager.live_jobs() == 0, "finished jobs are still held in memory"
            gc.collect()

        ids: list[str] = []
        for i in range(cycles):
            job_id = client.submit(text)
            client.cancel(job_id)
            ids.append(job_id)
            if i + 1 == warmup:
                settle()
                files, rss = open_files(), rss_bytes()
        settle()
        files_after, rss_after = open_files(), rss_bytes()
        assert len(set(ids)) == cycles
        assert files_after <= files + 3, f"open files: {files} after {warmup} cycles, {files_after} after {cycles}"
        assert rss_after <= rss + (24 << 20), f"RSS: {rss >> 20} MiB after {warmup} cycles, {rss_after >> 20} MiB after"
        assert series_of(ids[0]) == 0 and series_of(ids[-1]) == 0, "a released job's metric series remain"
        # Released jobs still answer Get, List and Download (from the registry and their run directory).
        assert client.get(ids[0]).state == pb.JOB_STATE_CANCELLED
        assert [e["kind"] for e in client.events(ids[0])] == ["state"]
        assert len(client.jobs()) == cycles
        print(f"\nsubmit+cancel: {files} -> {files_after} open files, {rss >> 20} -> {rss_after >> 20} MiB RSS")


@pytest.mark.timeout(60)
def test_job_ids_are_unique_and_directories_exclusive(tmp_path: Path) -> None:
    with CoordinatorServer(tmp_path / "state") as srv:
        job_id = srv.manager.submit(resolve(spec()))
        assert len(job_id) == len("hard-") + 32
        job_dir = srv.manager.job_dir(job_id)
        (job_dir / "metrics.jsonl").write_text('{"kind": "mine"}\n')
        # A run directory that exists already (a stolen id) is never reused: the submit fails, nothing is kept.
        import uuid as uuid_module

        real = uuid_module.uuid4
        taken = uuid_module.UUID(job_id.removeprefix("hard-"))
        uuid_module.uuid4 = lambda: taken  # type: ignore[assignment]
        try:
            with pytest.raises(Exception):  # noqa: B017 - the registry refuses the id three times
                srv.manager.submit(resolve(spec()))
        finally:
            uuid_module.uuid4 = real  # type: ignore[assignment]
        assert (job_dir / "metrics.jsonl").read_text() == '{"kind": "mine"}\n'
        assert [r.id for r in srv.manager.list()] == [job_id]


@pytest.mark.timeout(30)
def test_second_coordinator_on_one_state_dir_refused(tmp_path: Path) -> None:
    with CoordinatorServer(tmp_path / "state"):
        with pytest.raises(StateDirLocked, match="in use"):
            CoordinatorServer(tmp_path / "state")
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "cluster.cli",
                "coordinator",
                "--listen",
                "127.0.0.1:0",
                "--state-dir",
                str(tmp_path / "state"),
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=30,
        )
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode != 0 and len(lines) == 1 and "in use by another coordinator" in lines[0], proc.stderr
    with CoordinatorServer(tmp_path / "state"):  # released on close
        pass


def start_coordinator(state: Path, *extra: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cluster.cli",
            "coordinator",
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            str(state),
            *extra,
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert "listening on" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
    return proc, line.rsplit(" ", 1)[1].strip()


def reap(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)


@pytest.mark.timeout(120)
def test_sigterm_during_a_waiting_sync_round(tmp_path: Path) -> None:
    state = tmp_path / "state"
    proc, address = start_coordinator(state)
    try:
        with grpc.insecure_channel(address) as channel, JobsClient(Endpoint(address)) as client:
            coord = pb_grpc.CoordinatorStub(channel)
            job_id = client.submit(yaml.safe_dump(spec(replicas=2)))
            a, b = join(coord, job_id, "a"), join(coord, job_id, "b")
            done = [threading.Thread(target=exchange, args=(coord, job_id, w, 0)) for w in (a, b)]
            for t in done:
                t.start()
            for t in done:
                t.join(TIMEOUT)
            outcome: list[tuple[str, str]] = []
            waiter = threading.Thread(target=lambda: outcome.append(code_of(lambda: exchange(coord, job_id, a, 1))))
            waiter.start()
            time.sleep(1.0)  # a waits in round 1 for b
            assert waiter.is_alive()
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=10)
            took = time.monotonic() - started
            waiter.join(TIMEOUT)
        assert rc == 0 and took < 10, f"exit {rc} after {took:.1f}s"
        assert outcome and outcome[0][0] in ("UNAVAILABLE", "CANCELLED"), outcome
        ckpts = sorted((state / "jobs" / job_id / "checkpoints").glob("ckpt-*"))
        assert ckpts and ckpts[-1].name.endswith("000001"), ckpts
        # A restarted coordinator resumes the job from that checkpoint.
        proc, address = start_coordinator(state)
        with JobsClient(Endpoint(address)) as client:
            info = client.get(job_id)
            assert info.round == 1 and info.state in (pb.JOB_STATE_RUNNING, pb.JOB_STATE_PENDING)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        reap(proc)


@pytest.mark.timeout(30)
def test_non_loopback_listen_needs_a_token_or_insecure(tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "cluster.cli",
        "coordinator",
        "--listen",
        "0.0.0.0:0",
        "--state-dir",
        str(tmp_path / "s"),
    ]
    env = {k: v for k, v in os.environ.items() if k != "PARLE_TOKEN"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=30, env=env)
    assert proc.returncode == 2 and "--insecure" in proc.stderr, proc.stderr
    started = subprocess.Popen([*cmd, "--insecure"], cwd=REPO, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert started.stdout is not None and "listening on" in started.stdout.readline()
        started.send_signal(signal.SIGTERM)
        assert started.wait(timeout=10) == 0
    finally:
        if started.poll() is None:
            started.kill()
        started.wait(timeout=10)


# =====================================================================================================
# Roles and duties
# =====================================================================================================


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


@pytest.mark.timeout(60)
def test_wrong_role_tokens_are_permission_denied(tmp_path: Path) -> None:
    with (
        CoordinatorServer(tmp_path / "state", worker_token="wtok", client_token="ctok") as srv,
        grpc.insecure_channel(srv.address) as channel,
    ):
        coord, jobs = pb_grpc.CoordinatorStub(channel), pb_grpc.JobsStub(channel)
        text = yaml.safe_dump(spec())
        code, details = code_of(
            lambda: jobs.Submit(pb.SubmitRequest(spec_yaml=text), metadata=bearer("wtok"), timeout=TIMEOUT)
        )
        assert code == "PERMISSION_DENIED" and "client token" in details, (code, details)
        job_id = jobs.Submit(pb.SubmitRequest(spec_yaml=text), metadata=bearer("ctok"), timeout=TIMEOUT).job_id
        code, _ = code_of(lambda: join(coord, job_id, md=bearer("ctok")))
        assert code == "PERMISSION_DENIED"
        code, _ = code_of(lambda: jobs.List(pb.ListRequest(), metadata=bearer("wtok"), timeout=TIMEOUT))
        assert code == "PERMISSION_DENIED"
        code, _ = code_of(lambda: jobs.List(pb.ListRequest(), metadata=bearer("nope"), timeout=TIMEOUT))
        assert code == "UNAUTHENTICATED"
        worker_id = join(coord, job_id, md=bearer("wtok"))
        beat = pb.HeartbeatRequest(worker_id=worker_id, job_id=job_id)
        code, _ = code_of(lambda: coord.Heartbeat(beat, metadata=bearer("ctok"), timeout=TIMEOUT))
        assert code == "PERMISSION_DENIED"
        assert not coord.Heartbeat(beat, metadata=bearer("wtok"), timeout=TIMEOUT).stop
        assert srv.manager.job(job_id).live_workers == 1


def eval_report(job_id: str, worker_id: str, round: int, model: bool = False) -> Iterator[pb.ReportChunk]:
    result = pb.EvalResult(round=round, split=pb.SPLIT_TEST, loss=1.0, error=0.25)
    headers: list[pb.TensorHeader] = []
    chunks: list[pb.TensorChunk] = []
    if model:
        encoded = encode_tensors([("weight", torch.ones(4))])
        headers, chunks = list(encoded.headers), list(encoded.chunks)
    head = pb.ReportHeader(
        worker_id=worker_id,
        job_id=job_id,
        round=round,
        evals=[result],
        state_kind=pb.STATE_KIND_MODEL if model else pb.STATE_KIND_UNSPECIFIED,
        tensors=headers,
    )
    yield pb.ReportChunk(header=head)
    yield from (pb.ReportChunk(chunk=c) for c in chunks)


@pytest.mark.timeout(60)
def test_eval_only_from_the_assigned_worker(
    server: CoordinatorServer, stubs: tuple[pb_grpc.CoordinatorStub, pb_grpc.JobsStub]
) -> None:
    coord, _ = stubs
    job_id = server.manager.submit(resolve(spec(replicas=2, eval={"every_epochs": 0.01, "train_subset": 0})))
    a, b = join(coord, job_id, "a"), join(coord, job_id, "b")
    threads = [threading.Thread(target=exchange, args=(coord, job_id, w, 0)) for w in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    job = server.manager.job(job_id)
    assert job.round == 1
    evaluator = job._evals.evaluator
    assert job._evals.awaited == 0 and evaluator in (a, b)
    other = b if evaluator == a else a
    code, details = code_of(lambda: coord.Report(eval_report(job_id, other, 0), timeout=TIMEOUT))
    assert code == "FAILED_PRECONDITION" and "awaited" in details, (code, details)
    code, details = code_of(lambda: coord.Report(eval_report(job_id, evaluator, 0, model=True), timeout=TIMEOUT))
    assert code == "FAILED_PRECONDITION" and "last round" in details, (code, details)
    assert job.last_test_error is None and not (job.directory / "final.safetensors").exists()
    assert coord.Report(eval_report(job_id, evaluator, 0), timeout=TIMEOUT).stored
    assert job.last_test_error == 0.25
    code, _ = code_of(lambda: coord.Report(eval_report(job_id, evaluator, 0), timeout=TIMEOUT))
    assert code == "FAILED_PRECONDITION", "a second report of the same evaluation was accepted"
