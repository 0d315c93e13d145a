"""Who may talk to the coordinator: bearer tokens on every RPC of both services,
TLS with a CA generated at test time, and job files that stay inside the state directory."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from cluster.client import Endpoint, JobsClient
from coordinator.auth import server_credentials
from coordinator.job import JobState
from coordinator.server import CoordinatorServer
from protos import parle_pb2 as pb
from protos import parle_pb2_grpc as pb_grpc
from protos.messages import CoordinatorError
from protos.spec import resolve
from worker.transports.grpc import GrpcTransport

TOKEN = "s3cret"
TIMEOUT = 5.0
SPEC: dict[str, Any] = {
    "name": "t",
    "preset": "parle",
    "replicas": 2,
    "epochs": 1,
    "model": {"name": "lenet"},
    "data": {"name": "synthetic", "synthetic_size": 256, "batch_size": 32},
    "optim": {"L": 2},
    "runtime": {"lease_s": 3600.0},
}


def unauthenticated() -> float:
    value = REGISTRY.get_sample_value("parle_rejected_updates_total", {"reason": "unauthenticated"})
    return value or 0.0


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


# =====================================================================================================
# Tokens
# =====================================================================================================


@dataclass
class Secured:
    server: CoordinatorServer
    channel: grpc.Channel
    coord: pb_grpc.CoordinatorStub
    jobs: pb_grpc.JobsStub
    job_id: str
    worker_id: str


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    with (
        CoordinatorServer(tmp_path_factory.mktemp("token") / "state", token=TOKEN) as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        coord, jobs = pb_grpc.CoordinatorStub(channel), pb_grpc.JobsStub(channel)
        job_id = server.manager.submit(resolve(SPEC))
        join = pb.JoinRequest(worker_name="member", device="cpu", job_id=job_id)
        head = next(iter(coord.Join(join, metadata=bearer(TOKEN), timeout=TIMEOUT))).header
        yield Secured(server, channel, coord, jobs, job_id, head.worker_id)


def every_rpc(s: Secured) -> dict[str, Callable[[list[tuple[str, str]]], object]]:
    """One call of each RPC of both services, with real ids, so only the token can make it fail."""
    mu_header = pb.TensorHeader(name="mu", dtype=pb.DTYPE_FLOAT32, shape=[1], total_bytes=4, num_chunks=1)
    exchange = [
        pb.ExchangeChunk(
            upload=pb.ExchangeUpload(worker_id=s.worker_id, job_id=s.job_id, round=0, tensors=[mu_header])
        ),
        pb.ExchangeChunk(chunk=pb.TensorChunk(data=b"\0\0\0\0")),
    ]
    report = [pb.ReportChunk(header=pb.ReportHeader(worker_id=s.worker_id, job_id=s.job_id))]
    who = {"worker_id": s.worker_id, "job_id": s.job_id}
    c, j = s.coord, s.jobs
    return {
        "Coordinator.Join": lambda md: list(
            c.Join(pb.JoinRequest(worker_name="x", job_id=s.job_id), metadata=md, timeout=TIMEOUT)
        ),
        "Coordinator.Exchange": lambda md: list(c.Exchange(iter(exchange), metadata=md, timeout=TIMEOUT)),
        "Coordinator.Heartbeat": lambda md: c.Heartbeat(pb.HeartbeatRequest(**who), metadata=md, timeout=TIMEOUT),
        "Coordinator.Leave": lambda md: c.Leave(
            pb.LeaveRequest(**who, failed=True, reason="not you"), metadata=md, timeout=TIMEOUT
        ),
        "Coordinator.Report": lambda md: c.Report(iter(report), metadata=md, timeout=TIMEOUT),
        "Coordinator.FetchModel": lambda md: list(
            c.FetchModel(pb.FetchModelRequest(worker_id="w0", job_id=s.job_id, round=0), metadata=md, timeout=TIMEOUT)
        ),
        "Jobs.Submit": lambda md: j.Submit(
            pb.SubmitRequest(spec_yaml=yaml.safe_dump(SPEC)), metadata=md, timeout=TIMEOUT
        ),
        "Jobs.Get": lambda md: j.Get(pb.GetRequest(job_id=s.job_id), metadata=md, timeout=TIMEOUT),
        "Jobs.List": lambda md: j.List(pb.ListRequest(), metadata=md, timeout=TIMEOUT),
        "Jobs.Cancel": lambda md: j.Cancel(pb.CancelRequest(job_id=s.job_id), metadata=md, timeout=TIMEOUT),
        "Jobs.Watch": lambda md: list(j.Watch(pb.WatchRequest(job_id=s.job_id), metadata=md, timeout=TIMEOUT)),
        "Jobs.Download": lambda md: list(j.Download(pb.DownloadRequest(job_id=s.job_id), metadata=md, timeout=TIMEOUT)),
    }


RPCS = [
    "Coordinator.Join",
    "Coordinator.Exchange",
    "Coordinator.Heartbeat",
    "Coordinator.Leave",
    "Coordinator.Report",
    "Coordinator.FetchModel",
    "Jobs.Submit",
    "Jobs.Get",
    "Jobs.List",
    "Jobs.Cancel",
    "Jobs.Watch",
    "Jobs.Download",
]
BAD_METADATA: dict[str, list[tuple[str, str]]] = {
    "none": [],
    "wrong": bearer("s3cre7"),
    "prefix": bearer("s3cre"),
    "longer": bearer("s3cret2"),
    "case": bearer("S3CRET"),
    "empty": bearer(""),
    "no-scheme": [("authorization", TOKEN)],
    "basic": [("authorization", f"Basic {TOKEN}")],
    "other-header": [("x-token", TOKEN)],
}


def assert_untouched(s: Secured, jobs_before: int) -> None:
    job = s.server.manager.job(s.job_id)
    assert job.state is JobState.RUNNING, f"an unauthenticated call moved the job to {job.state.value}"
    assert job.live_workers == 1 and job.round == 0
    assert len(s.server.manager.list()) == jobs_before, "an unauthenticated Submit registered a job"


@pytest.mark.timeout(60)
def test_every_rpc_in_the_list() -> None:
    names = {f"Coordinator.{m.name}" for m in pb.DESCRIPTOR.services_by_name["Coordinator"].methods}
    names |= {f"Jobs.{m.name}" for m in pb.DESCRIPTOR.services_by_name["Jobs"].methods}
    assert names == set(RPCS)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("rpc", RPCS)
@pytest.mark.parametrize("metadata", list(BAD_METADATA), ids=list(BAD_METADATA))
def test_rpc_without_the_token_is_unauthenticated(secured: Secured, rpc: str, metadata: str) -> None:
    jobs_before = len(secured.server.manager.list())
    before = unauthenticated()
    with pytest.raises(grpc.RpcError) as caught:
        every_rpc(secured)[rpc](BAD_METADATA[metadata])
    err = caught.value
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED, f"{rpc}: {err.code()} {err.details()}"  # type: ignore[attr-defined]
    assert TOKEN not in err.details()  # type: ignore[attr-defined]
    assert unauthenticated() >= before + 1
    assert_untouched(secured, jobs_before)


@pytest.mark.timeout(60)
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    token=st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=20).filter(
        lambda t: t != TOKEN
    ),
    rpc=st.sampled_from(RPCS),
)
def test_any_wrong_token_is_unauthenticated(secured: Secured, token: str, rpc: str) -> None:
    jobs_before = len(secured.server.manager.list())
    with pytest.raises(grpc.RpcError) as caught:
        every_rpc(secured)[rpc](bearer(token))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
    assert_untouched(secured, jobs_before)


@pytest.mark.timeout(60)
def test_right_token_submit_get_list(secured: Secured) -> None:
    with JobsClient(Endpoint(secured.server.address, TOKEN), timeout_s=TIMEOUT) as client:
        job_id = client.submit(yaml.safe_dump({**SPEC, "name": "authorised"}))
        info = client.get(job_id)
        assert info.id == job_id and info.name == "authorised" and info.state == pb.JOB_STATE_PENDING
        assert job_id in {i.id for i in client.jobs()}
        assert client.cancel(job_id).state == pb.JOB_STATE_CANCELLED
    with JobsClient(Endpoint(secured.server.address, "wrong"), timeout_s=TIMEOUT) as client:
        with pytest.raises(CoordinatorError) as caught:
            client.get(secured.job_id)
        assert caught.value.code == "UNAUTHENTICATED"


@pytest.mark.timeout(60)
def test_right_token_worker_transport(secured: Secured) -> None:
    """A worker with the token joins, heartbeats and leaves; one without it is refused at Join."""
    job_id = secured.server.manager.submit(resolve({**SPEC, "name": "workers"}))
    with GrpcTransport(secured.server.address, token=TOKEN, job_id=job_id, timeout_s=TIMEOUT) as worker:
        grant = worker.join("good", "cpu")
        assert grant.job_id == job_id and worker.heartbeat()
        assert secured.server.manager.job(job_id).live_workers == 1
        with GrpcTransport(secured.server.address, token=None, job_id=job_id, timeout_s=TIMEOUT) as stranger:
            with pytest.raises(CoordinatorError) as caught:
                stranger.join("bad", "cpu")
            assert caught.value.code == "UNAUTHENTICATED"
        assert secured.server.manager.job(job_id).live_workers == 1
    assert secured.server.manager.job(job_id).live_workers == 0


# =====================================================================================================
# TLS
# =====================================================================================================


def openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


def make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    key, cert = directory / f"{name}.key", directory / f"{name}.pem"
    openssl(
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        str(key),
        "-out",
        str(cert),
        "-days",
        "2",
        "-subj",
        f"/CN={name}",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )
    return key, cert


def make_server_cert(directory: Path, ca_key: Path, ca_cert: Path, san: str) -> tuple[Path, Path]:
    key, csr, cert = directory / "server.key", directory / "server.csr", directory / "server.pem"
    ext = directory / "server.ext"
    ext.write_text(
        f"subjectAltName={san}\nbasicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
    )
    openssl(
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        str(key),
        "-out",
        str(csr),
        "-subj",
        "/CN=localhost",
        cwd=directory,
    )
    openssl(
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        str(ca_cert),
        "-CAkey",
        str(ca_key),
        "-set_serial",
        "4242",
        "-out",
        str(cert),
        "-days",
        "2",
        "-extfile",
        str(ext),
        cwd=directory,
    )
    return cert, key


@dataclass
class Tls:
    server: CoordinatorServer
    ca: Path
    other_ca: Path

    @property
    def port(self) -> int:
        return self.server.port


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tls]:
    directory = tmp_path_factory.mktemp("tls")
    ca_key, ca_cert = make_ca(directory, "parle-test-ca")
    _, other_ca = make_ca(directory, "someone-else")
    cert, key = make_server_cert(directory, ca_key, ca_cert, "DNS:localhost,IP:127.0.0.1")
    with CoordinatorServer(directory / "state", listen="127.0.0.1:0", tls_cert=cert, tls_key=key) as server:
        assert server.address == f"127.0.0.1:{server.port}"
        server.manager.submit(resolve(SPEC))
        yield Tls(server, ca_cert, other_ca)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
def test_tls_client_with_the_ca_can_list(tls: Tls, host: str) -> None:
    with JobsClient(Endpoint(f"{host}:{tls.port}", None, tls.ca), timeout_s=TIMEOUT) as client:
        jobs = client.jobs()
    assert [j.name for j in jobs] == ["t"]


@pytest.mark.timeout(60)
def test_tls_worker_transport_joins(tls: Tls) -> None:
    job_id = tls.server.manager.list()[0].id
    with GrpcTransport(f"localhost:{tls.port}", ca_cert=tls.ca, job_id=job_id, timeout_s=TIMEOUT) as worker:
        grant = worker.join("tls-worker", "cpu")
        assert grant.job_id == job_id and worker.heartbeat()


def fails_unavailable(channel: grpc.Channel) -> None:
    with channel:
        stub = pb_grpc.JobsStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.List(pb.ListRequest(), timeout=TIMEOUT)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value  # type: ignore[attr-defined]


@pytest.mark.timeout(60)
def test_plaintext_client_cannot_connect(tls: Tls) -> None:
    fails_unavailable(grpc.insecure_channel(f"127.0.0.1:{tls.port}"))
    with (
        JobsClient(Endpoint(f"127.0.0.1:{tls.port}"), timeout_s=TIMEOUT) as client,
        pytest.raises(CoordinatorError) as caught,
    ):
        client.jobs()
    assert caught.value.code == "UNAVAILABLE"


@pytest.mark.timeout(60)
def test_tls_client_with_system_roots_cannot_connect(tls: Tls) -> None:
    fails_unavailable(grpc.secure_channel(f"localhost:{tls.port}", grpc.ssl_channel_credentials()))


@pytest.mark.timeout(60)
def test_tls_client_trusting_another_ca_cannot_connect(tls: Tls) -> None:
    creds = grpc.ssl_channel_credentials(root_certificates=tls.other_ca.read_bytes())
    fails_unavailable(grpc.secure_channel(f"localhost:{tls.port}", creds))


@pytest.mark.timeout(60)
def test_tls_client_expecting_another_host_cannot_connect(tls: Tls) -> None:
    creds = grpc.ssl_channel_credentials(root_certificates=tls.ca.read_bytes())
    options = [("grpc.ssl_target_name_override", "coordinator.example.com")]
    fails_unavailable(grpc.secure_channel(f"127.0.0.1:{tls.port}", creds, options=options))


@pytest.mark.timeout(60)
def test_tls_and_token_together(tmp_path: Path) -> None:
    ca_key, ca_cert = make_ca(tmp_path, "ca")
    cert, key = make_server_cert(tmp_path, ca_key, ca_cert, "DNS:localhost")
    with CoordinatorServer(tmp_path / "state", token=TOKEN, tls_cert=cert, tls_key=key) as server:
        address = f"localhost:{server.port}"
        with JobsClient(Endpoint(address, None, ca_cert), timeout_s=TIMEOUT) as client:
            with pytest.raises(CoordinatorError) as caught:
                client.jobs()
            assert caught.value.code == "UNAUTHENTICATED"
        with JobsClient(Endpoint(address, TOKEN, ca_cert), timeout_s=TIMEOUT) as client:
            job_id = client.submit(yaml.safe_dump(SPEC))
            assert client.get(job_id).id == job_id


@pytest.mark.timeout(60)
def test_tls_cert_and_key_go_together(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="go together"):
        server_credentials(tmp_path / "cert.pem", None)
    with pytest.raises(ValueError, match="go together"):
        server_credentials(None, tmp_path / "key.pem")
    assert server_credentials(None, None) is None


@pytest.mark.timeout(60)
def test_binds_loopback_by_default(tmp_path: Path) -> None:
    with CoordinatorServer(tmp_path / "state") as server:
        assert server.address == f"127.0.0.1:{server.port}" and server.port > 0


# =====================================================================================================
# Job files stay inside the state directory
# =====================================================================================================


def files_outside(root: Path, state_dir: Path) -> list[str]:
    return sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p != state_dir and state_dir not in p.parents and p not in state_dir.parents
    )


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["../../escaped", "nested/../../../escaped", "ABSOLUTE"])
def test_job_name_cannot_escape_the_state_directory(tmp_path: Path, name: str) -> None:
    """A job name is a label, not a path: Submit must refuse names that would put the job's files outside
    STATE_DIR/jobs (INVALID_ARGUMENT), or keep them inside anyway."""
    state_dir = tmp_path / "deep" / "state"
    if name == "ABSOLUTE":
        name = str(tmp_path / "absolute")  # still under tmp_path, so nothing leaks out of the test
    with CoordinatorServer(state_dir, token=TOKEN) as server:
        before = files_outside(tmp_path, state_dir)
        with JobsClient(Endpoint(server.address, TOKEN), timeout_s=TIMEOUT) as client:
            try:
                job_id = client.submit(yaml.safe_dump({**SPEC, "name": name}))
                outcome = "OK"
                where = Path(server.manager.job_dir(job_id)).resolve()
            except CoordinatorError as err:
                outcome, where = err.code, None
        leaked = [f for f in files_outside(tmp_path, state_dir) if f not in before]
    inside = where is None or (state_dir / "jobs").resolve() in where.parents
    assert outcome in ("OK", "INVALID_ARGUMENT"), outcome
    assert inside and not leaked, (
        f"Submit name={name!r}: {outcome}, job directory {where}, files written outside: {leaked}"
    )


@pytest.mark.timeout(60)
def test_reference_is_not_served_without_the_token(secured: Secured) -> None:
    """Download is the one RPC that hands out weights: check the refusal carries no tensor bytes."""
    responses = secured.jobs.Download(pb.DownloadRequest(job_id=secured.job_id), timeout=TIMEOUT)
    received: list[Any] = []
    with pytest.raises(grpc.RpcError) as caught:
        received.extend(responses)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
    assert received == []
