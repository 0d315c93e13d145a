"""The service commands of the ``parle`` CLI: a standing coordinator, pool workers, and the jobs client.

    parle coordinator --listen 127.0.0.1:50051 --state-dir DIR [--token-file F] [--tls-cert F --tls-key F]
                      [--worker-token-file F --client-token-file F] [--insecure]
    parle worker --coordinator HOST:PORT [--job ID] [--device cpu|cuda|cuda:N] [--token-file F]
                 [--allow-code PREFIX ...] [--data-dir DIR ...]
    parle submit CONFIG | jobs | status ID [--watch] | cancel ID | download ID -o FILE   (--coordinator ADDR)

Addresses and tokens also come from PARLE_COORDINATOR and PARLE_TOKEN.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
import threading
from pathlib import Path
from types import FrameType

from protos.messages import CoordinatorError

log = logging.getLogger("parle")


def _client_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--coordinator", metavar="HOST:PORT", help="default: $PARLE_COORDINATOR")
    parser.add_argument("--token-file", type=Path, help="file holding the token (default: $PARLE_TOKEN)")
    parser.add_argument("--ca-cert", type=Path, help="CA certificate to verify a TLS coordinator")


def _client(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from cluster.client import Endpoint, JobsClient

    return JobsClient(Endpoint.resolve(args.coordinator, args.token_file, args.ca_cert))


def _on_signals(stop: threading.Event) -> None:
    def handler(signum: int, frame: FrameType | None) -> None:
        log.info("signal %d: shutting down", signum)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def bound_heap() -> None:
    """Keep the coordinator's memory proportional to the model: glibc otherwise keeps freed model-sized
    buffers in per-thread arenas (one per gRPC handler thread) and its mmap threshold grows past them, so
    RSS grew with workers x model size. Large buffers are mmapped (returned on free), arenas capped."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(name)
    m_mmap_threshold, m_arena_max = -3, -8
    libc.mallopt(m_mmap_threshold, 1 << 20)
    libc.mallopt(m_arena_max, 2)


def cmd_coordinator(args: argparse.Namespace) -> int:
    from coordinator.auth import is_loopback, read_token
    from coordinator.server import CoordinatorServer
    from coordinator.service import StateDirLocked

    bound_heap()
    token = read_token(args.token_file) or os.environ.get("PARLE_TOKEN") or None
    worker_token = read_token(args.worker_token_file, "--worker-token-file")
    client_token = read_token(args.client_token_file, "--client-token-file")
    if bool(worker_token) != bool(client_token) and not token:
        print("parle coordinator: --worker-token-file and --client-token-file go together", file=sys.stderr)
        print("(or give --token-file: one token for both)", file=sys.stderr)
        return 2
    secured = bool(token or worker_token)
    if not is_loopback(args.listen) and not (secured or args.tls_cert) and not args.insecure:
        print(
            f"parle coordinator: --listen {args.listen} is reachable from other machines but no token "
            "(--token-file or PARLE_TOKEN) or TLS is set; give one, or --insecure to allow any caller",
            file=sys.stderr,
        )
        return 2
    stop = threading.Event()
    _on_signals(stop)  # from here, SIGTERM stops the coordinator cleanly (checkpoints first)
    try:
        server = CoordinatorServer(
            args.state_dir,
            args.listen,
            token,
            args.tls_cert,
            args.tls_key,
            worker_token=worker_token,
            client_token=client_token,
            inflight_bytes=args.max_inflight_bytes,
            upload_idle_s=args.upload_idle_s,
            max_pending_jobs=args.max_pending_jobs,
            metrics_retention_s=args.metrics_retention_s,
            data_channel=not args.no_data_channel,
            data_port=args.data_port,
        )
    except StateDirLocked as err:
        print(f"parle coordinator: {err}", file=sys.stderr)
        return 1
    try:
        if args.metrics_port:
            from prometheus_client import start_http_server

            start_http_server(args.metrics_port, addr=args.listen.rsplit(":", 1)[0])
        print(f"parle coordinator listening on {server.address}", flush=True)
        stop.wait()
        log.info("stopping: no new work; checkpointing running jobs")
    finally:
        server.close()
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    import torch

    from cluster.client import Endpoint
    from cluster.local import replica_device, visible_gpus
    from worker.loop import WorkerLoop
    from worker.transports.grpc import GrpcTransport
    from worker.workloads.trust import Trust

    # cuda with --replica a: GPU a mod G, as `parle train --workers` places them; no GPU visible: exit 2
    device = args.device if args.device == "cpu" else replica_device(args.device, args.replica or 0, visible_gpus())
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(args.metrics_port, addr=args.metrics_addr)
    endpoint = Endpoint.resolve(args.coordinator, args.token_file, args.ca_cert)
    with GrpcTransport(
        endpoint.address,
        endpoint.token,
        endpoint.ca_cert,
        job_id=args.job,
        data_channel=not args.no_data_channel,
        data_address=args.data_address,
    ) as transport:
        loop = WorkerLoop(
            transport,
            args.name,
            device,
            want_replica=args.replica,
            serve_forever=args.job is None,
            reconnect_s=args.reconnect_s,
            trust=Trust.of(args.allow_code, args.data_dir),
            offer_on_rejoin=True,  # a restarted coordinator takes it back at the round it was in
        )
        stop = threading.Event()
        _on_signals(stop)

        def stop_loop() -> None:
            stop.wait()
            loop.stop()

        threading.Thread(target=stop_loop, daemon=True).start()
        loop.run()
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from protos.spec import load_spec

    spec = load_spec(args.config, args.set)  # validate here: a bad file never reaches the coordinator
    if args.ray:
        from ray.job_submission import JobSubmissionClient

        entrypoint = f"parle train {args.config} --runtime ray" + "".join(f" --set {s}" for s in args.set)
        client = JobSubmissionClient(args.ray)
        print(client.submit_job(entrypoint=entrypoint, runtime_env={"working_dir": str(args.working_dir)}))
        return 0
    with _client(args) as client:
        print(client.submit(spec.to_yaml()))
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    from cluster.client import describe

    with _client(args) as client:
        jobs = [describe(info) for info in client.jobs()]
    if args.json:
        print(json.dumps(jobs, indent=1))
        return 0
    width = max([len(j["id"]) + 2 for j in jobs] + [28])  # ids are the name and 32 hex digits
    print(f"{'ID':<{width}}{'STATE':<11}{'ROUND':>11}{'EPOCH':>8}{'WORKERS':>9}{'TEST ERR':>10}")
    for j in jobs:
        err = f"{100 * j['test_error']:.2f}%" if "test_error" in j else "-"
        print(
            f"{j['id']:<{width}}{j['state']:<11}{j['round']:>5}/{j['total_rounds']:<5}{j['epoch']:>8.2f}"
            f"{j['live_workers']:>5}/{j['replicas']:<3}{err:>10}"
        )
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from cluster.client import describe

    with _client(args) as client:
        if not args.watch:
            print(json.dumps(describe(client.get(args.job_id)), indent=1))
            return 0
        for event in client.watch(args.job_id):
            kind = event.WhichOneof("event")
            if kind == "snapshot":
                print(json.dumps(describe(event.snapshot)))
            elif kind == "round":
                r = event.round
                line = f"round {r.round} epoch {r.epoch:.2f} loss {r.train_loss:.4f} gamma {r.values.gamma:.3g}"
                print(f"{line} rho {r.values.rho:.3g} workers {r.contributors} {r.round_seconds:.2f}s", flush=True)
            elif kind == "eval":
                e = event.eval.result
                print(f"eval round {e.round} split {e.split} loss {e.loss:.4f} error {100 * e.error:.2f}%", flush=True)
            elif kind == "state":
                print(f"state {event.state.state} {event.state.message}", flush=True)
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    from cluster.client import describe

    with _client(args) as client:
        print(json.dumps(describe(client.cancel(args.job_id))))
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file

    with _client(args) as client:
        tensors, manifest = client.download(args.job_id, args.what)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(args.output))
    at_round = f", round {manifest['round']}" if "round" in manifest else ""
    print(f"{args.output}: {len(tensors)} tensor(s){at_round}")
    return 0


def add_service_commands(sub: argparse._SubParsersAction) -> None:
    co = sub.add_parser("coordinator", help="run a standing coordinator (gRPC)")
    co.add_argument("--listen", default="127.0.0.1:50051", help="HOST:PORT to bind (default loopback)")
    co.add_argument("--state-dir", type=Path, required=True, help="job registry, checkpoints and results")
    co.add_argument("--token-file", type=Path, help="require this token from every caller (or set PARLE_TOKEN)")
    co.add_argument("--worker-token-file", type=Path, help="the workers' token (Coordinator service)")
    co.add_argument("--client-token-file", type=Path, help="the submitters' token (Jobs service)")
    co.add_argument("--tls-cert", type=Path)
    co.add_argument("--tls-key", type=Path)
    co.add_argument(
        "--insecure", action="store_true", help="allow a non-loopback --listen without a token or TLS (any caller)"
    )
    co.add_argument(
        "--max-inflight-bytes", type=int, default=2 << 30, help="upload bytes held at once, all streams (2 GiB)"
    )
    co.add_argument("--upload-idle-s", type=float, default=60.0, help="cancel an upload silent this long")
    co.add_argument("--max-pending-jobs", type=int, default=64, help="jobs waiting for workers; more are refused")
    co.add_argument(
        "--metrics-retention-s", type=float, default=3600.0, help="keep a finished job's Prometheus series this long"
    )
    co.add_argument("--metrics-port", type=int, default=0, help="serve Prometheus /metrics on this port (0: off)")
    co.add_argument(
        "--data-port", type=int, default=0,
        help="port of the data channel, the raw-socket path for Exchange rounds, on --listen's host (0: any free port)",
    )  # fmt: skip
    co.add_argument(
        "--no-data-channel", action="store_true", help="exchange over gRPC streams only (offer no data channel)"
    )
    co.set_defaults(func=cmd_coordinator)

    wk = sub.add_parser("worker", help="run a worker: one replica at a time for a coordinator")
    _client_flags(wk)
    wk.add_argument("--job", help="serve this job and exit when it ends (default: serve any job, forever)")
    wk.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (cuda with --replica a: GPU a mod the GPUs)")
    wk.add_argument("--name", default=f"worker-{socket.gethostname()}-{os.getpid()}")
    wk.add_argument("--replica", type=int, help="ask for this replica index")
    wk.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    wk.add_argument("--reconnect-s", type=float, default=300.0, help="keep retrying an unreachable coordinator")
    wk.add_argument("--metrics-port", type=int, default=0, help="serve Prometheus /metrics here (0: off)")
    wk.add_argument("--metrics-addr", default="127.0.0.1", help="address for --metrics-port (0.0.0.0 in containers)")
    wk.add_argument(
        "--allow-code",
        action="append",
        metavar="PREFIX",
        help="run a job's model or data callable from modules under PREFIX (repeatable; default: built-ins only)",
    )
    wk.add_argument(
        "--data-dir",
        action="append",
        type=Path,
        metavar="DIR",
        help="read a job's data.root only under DIR, symlinks resolved (repeatable; "
        "default: /usr/share/datasets/fashion-mnist)",
    )
    wk.add_argument("--no-data-channel", action="store_true", help="exchange over gRPC streams only")
    wk.add_argument("--data-address", metavar="HOST:PORT", help="reach the data channel here (default: gRPC's host)")
    wk.set_defaults(func=cmd_worker)

    sm = sub.add_parser("submit", help="submit a job; prints its id")
    sm.add_argument("config", type=Path)
    sm.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    sm.add_argument("--ray", metavar="http://HEAD:8265", help="submit to a Ray cluster instead (prints the Ray job id)")
    sm.add_argument("--working-dir", type=Path, default=Path("."), help="with --ray: uploaded as the job's working dir")
    _client_flags(sm)
    sm.set_defaults(func=cmd_submit)

    jb = sub.add_parser("jobs", help="list jobs")
    jb.add_argument("--json", action="store_true")
    _client_flags(jb)
    jb.set_defaults(func=cmd_jobs)

    st = sub.add_parser("status", help="a job's state; --watch streams rounds and evals")
    st.add_argument("job_id")
    st.add_argument("--watch", action="store_true")
    _client_flags(st)
    st.set_defaults(func=cmd_status)

    ca = sub.add_parser("cancel", help="cancel a job (its results are kept)")
    ca.add_argument("job_id")
    _client_flags(ca)
    ca.set_defaults(func=cmd_cancel)

    dl = sub.add_parser("download", help="download a job's reference, last checkpoint or exported model")
    dl.add_argument("job_id")
    dl.add_argument("-o", "--output", type=Path, required=True, help="a .safetensors file")
    dl.add_argument("--what", choices=["reference", "checkpoint", "model"], default="reference")
    _client_flags(dl)
    dl.set_defaults(func=cmd_download)


def service_errors(err: Exception) -> int:
    """Exit statuses for service errors: 2 for what the user can fix, 1 otherwise."""
    if isinstance(err, CoordinatorError):
        print(f"parle: {err.code}: {err}", file=sys.stderr)
        return 2 if err.code in ("INVALID_ARGUMENT", "NOT_FOUND", "UNAUTHENTICATED") else 1
    print(f"parle: {err}", file=sys.stderr)
    return 2
