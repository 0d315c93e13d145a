"""The worker loop: one replica, any transport (docs/algorithm.md, worker side).

    join -> [chain -> exchange -> elastic step -> duties (upload x or state, evaluate the model)] * rounds -> leave

The same loop runs in the local runtime's threads, in ``parle worker`` processes and in Ray actors.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from protos.messages import (
    CoordinatorError,
    EvalReport,
    ExchangeReply,
    JoinGrant,
    RoundStats,
    RoundValues,
)
from protos.spec import JobSpec
from worker import metrics
from worker.devices import to_device, to_host
from worker.flat import FlatParameters
from worker.kernels import ChainHyper, OuterHyper
from worker.replica import ReplicaState
from worker.replica_rng import GLOBAL_RNG_LOCK, ReplicaRng, replica_seed
from worker.transports import WorkerTransport
from worker.workloads import (
    BatchSampler,
    WorkloadError,
    build_model,
    evaluate,
    load_dataset,
    reestimate_batchnorm,
    shard_indices,
)
from worker.workloads.trust import Trust

log = logging.getLogger(__name__)

# Serialises the replicas of one process that share a device in replica order (local runtime), so that
# the global RNG they draw from (dropout) is used in a fixed order and runs are reproducible. A process
# with one replica needs none.
Turns = Callable[[int], AbstractContextManager[None]]


def no_turns(replica: int) -> AbstractContextManager[None]:
    return contextlib.nullcontext()


class NonFiniteLoss(RuntimeError):
    pass


@dataclass
class Workload:
    """A replica's model, flat parameters, data and sampler, built from the job spec."""

    model: nn.Module
    flat: FlatParameters
    sampler: BatchSampler
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor

    @classmethod
    def build(cls, spec: JobSpec, replica: int, device: torch.device) -> Workload:
        data = load_dataset(spec.data, seed=spec.seed).to(device)
        # Sync replicas start from different initialisations; EASGD's start from one shared point.
        init = 0 if spec.optim.mode == "async" else replica
        with GLOBAL_RNG_LOCK, torch.random.fork_rng(devices=[]):
            # The CPU generator only (the model is built on the CPU): torch.manual_seed would also reseed
            # every GPU's generator, under the feet of replicas computing on other GPUs.
            torch.default_generator.manual_seed(replica_seed(spec.seed, init, 0))
            model = build_model(spec.model, data.input_shape, data.num_classes).to(device)
        shard = shard_indices(data.train_x.shape[0], replica, spec.replicas, spec.data.frac, spec.seed)
        sampler = BatchSampler(
            shard, data.train_x, data.train_y, spec.data.batch_size, spec.seed, replica, spec.data.augment
        )
        flat = FlatParameters(model.parameters())
        return cls(model, flat, sampler, data.train_x, data.train_y, data.test_x, data.test_y)


# Errors after which a worker joins again: the coordinator restarted (it no longer knows this worker),
# the worker missed its lease or a round, or the connection dropped.
REJOIN_CODES = frozenset({"UNAVAILABLE", "NOT_FOUND", "FAILED_PRECONDITION", "DEADLINE_EXCEEDED", "ABORTED"})


class WorkerLoop:
    """Runs replicas for a coordinator until the job ends.

    ``serve_forever``: a pool worker; after a job ends it asks for the next one. ``reconnect_s``: how long
    to keep retrying while the coordinator is unreachable (0: fail at once). ``turns``: the compute turns
    this replica shares with the others on its device; ``exchange_turns``: the order of async exchanges
    across devices (local runtime). ``trust``: the user code and data directories a job may name (default:
    built-ins only); a job naming others fails, the loop goes on.
    ``offer_on_rejoin`` (a worker over a network, of one job or of a pool): keep a copy of the replica's
    state at the start of each sync round, and when the coordinator is lost, rejoin the same job asking to
    be taken back with it, so that a restarted coordinator resumes at the round it was in. A pool worker
    whose job is gone by then joins like a newcomer."""

    def __init__(
        self,
        transport: WorkerTransport,
        name: str,
        device: str = "cpu",
        want_replica: int | None = None,
        turns: Turns = no_turns,
        serve_forever: bool = False,
        reconnect_s: float = 0.0,
        exchange_turns: Turns = no_turns,
        trust: Trust | None = None,
        offer_on_rejoin: bool = False,
    ) -> None:
        self.transport = transport
        self.name = name
        self.device = torch.device(device)
        self.want_replica = want_replica
        self.turns = turns
        self.exchange_turns = exchange_turns
        self.serve_forever = serve_forever
        self.reconnect_s = reconnect_s
        self.trust = trust or Trust()
        self.offer_on_rejoin = offer_on_rejoin
        # (round, this replica's state at its start): what it offers when it rejoins.
        self._resume_point: tuple[int, dict[str, Tensor]] | None = None
        self.rounds_done = 0
        self.joins = 0
        self.prefix = f"[{name}]"
        self._stop = threading.Event()

    def stop(self) -> None:
        """Ask the loop to end after the current round (e.g. on SIGTERM)."""
        self._stop.set()

    def run(self) -> None:
        resume: tuple[int, dict[str, Tensor]] | None = None
        while not self._stop.is_set():
            grant = self._join(resume)
            if grant is None:
                return
            # What it may offer if this coordinator is lost too: never a state kept for another job.
            self._resume_point = resume if grant.resume else None
            try:
                if grant.resume and resume is not None:
                    self._resume(grant, *resume)
                else:
                    self._setup(grant)
                resume = None
                self._train(grant)
            except (NonFiniteLoss, WorkloadError) as err:
                # The job's failure, not the worker's: the job goes FAILED with the message, and a pool
                # worker goes on to serve the next job.
                message = f"replica {grant.replica}: {err}"
                log.error("%s %s", self.prefix, message)
                with contextlib.suppress(CoordinatorError):
                    self.transport.fail(message)
                if not self.serve_forever:
                    raise
                continue
            except CoordinatorError as err:
                if err.code not in REJOIN_CODES:
                    raise
                log.warning("%s lost its place (%s: %s): joining again", self.prefix, err.code, err)
                metrics.REJOINS.labels(grant.job_id).inc()
                with contextlib.suppress(CoordinatorError):
                    self.transport.leave()
                resume = self._resume_point if self.offer_on_rejoin else None
                continue
            with contextlib.suppress(CoordinatorError):
                self.transport.leave()
            if not self.serve_forever:
                return

    def _join(self, resume: tuple[int, dict[str, Tensor]] | None = None) -> JoinGrant | None:
        """Join with exponential backoff while the coordinator is unreachable or has no work.
        None: the job is over (after a first successful join) or the loop was stopped. ``resume``: the
        round and state this worker holds; it asks for its replica back with them."""
        delay, give_up = 0.1, time.monotonic() + self.reconnect_s
        want = self.replica_index if resume is not None else self.want_replica
        while not self._stop.is_set():
            try:
                round_ = None if resume is None else resume[0]
                grant = self.transport.join(self.name, str(self.device), want, round_)
                self.joins += 1
                return grant
            except CoordinatorError as err:
                over = err.code in ("FAILED_PRECONDITION", "NOT_FOUND") and self.joins > 0
                if over and not self.serve_forever:
                    log.info("%s: the job is over (%s)", self.name, err)
                    return None
                if over and resume is not None:  # a pool worker's job is gone: it asks for any job instead
                    log.info("%s: not taken back (%s): joining as a newcomer", self.name, err)
                    resume, want = None, self.want_replica
                    continue
                # UNAVAILABLE: no coordinator or no job yet; RESOURCE_EXHAUSTED: the job is full until a dead
                # member's lease lapses (a replacement started right after a crash).
                retry = err.code in ("UNAVAILABLE", "RESOURCE_EXHAUSTED") or over
                if not retry or (time.monotonic() >= give_up and not self.serve_forever):
                    raise
                log.info("%s: cannot join yet (%s); retrying in %.1fs", self.name, err, delay)
                self._stop.wait(delay)
                delay = min(delay * 2, 5.0)
        return None

    def _resume(self, grant: JoinGrant, round: int, state: dict[str, Tensor]) -> None:
        """Taken back with this replica's own state at the start of ``round``: put it back (the chain of an
        interrupted round runs again from its start, drawing the same numbers), offer it, then do what the
        round before still owes."""
        self.load_state(state)
        self.prefix = f"[job {grant.job_id} replica {grant.replica} {grant.worker_id}]"
        log.info("%s taken back at round %d with its own state", self.prefix, round)
        self.transport.offer_state(round, state)
        duties = grant.resume_duties
        if duties.evaluate:
            model = self.transport.fetch_model(round - 1)
            report = self.evaluate_model(round - 1, grant.values.epoch, duties.export, to_device(model, self.device))
            self.transport.report_eval(report)

    def _keep_resume_point(self, round: int) -> None:
        if self.offer_on_rejoin and self.spec.optim.mode == "sync":
            self._resume_point = (round, self.state())

    def _setup(self, grant: JoinGrant) -> None:
        spec = grant.spec
        self.spec, self.replica_index = spec, grant.replica
        self.trust.check(spec)  # before any of the job's code is imported or its data read
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)  # this thread's current GPU: what a model allocates lands on it
        self.work = Workload.build(spec, grant.replica, self.device)
        self.replica = ReplicaState(
            self.work.flat.data, self.work.flat.grad, spec.optim.L, spec.optim.inner_momentum_reset
        )
        self.rng = ReplicaRng(spec.seed, grant.replica, self.device)
        if grant.replica_state is not None:
            self.load_state(grant.replica_state)
        elif grant.start is not None:
            self.replica.load_weights(to_device(grant.start, self.device))
        self.prefix = f"[job {grant.job_id} replica {grant.replica} {grant.worker_id}]"
        if grant.seed_center:  # async: the shared start becomes the center
            self.transport.report_state(0, to_host({"x": self.replica.x}))

    def _train(self, grant: JoinGrant) -> None:
        values = grant.values
        if grant.resume_duties.stop:  # taken back after the last round: its duties were all that was left
            return
        self._keep_resume_point(values.round)
        is_async = self.spec.optim.mode == "async"
        while True:
            with self.turns(self.replica_index), self.rng.scope():
                upload, stats = self._chain(values)
                if is_async:  # x takes its local step and the exchange sends x, within the turn: replicas
                    # sharing a process then reach the center in a fixed order, so async runs repeat too
                    # (across devices too: replicas on other devices exchange in that order as well)
                    with torch.no_grad():
                        upload = self.replica.local_step(self._outer(values))
                    with self.exchange_turns(self.replica_index):
                        reply = self._exchange(grant.job_id, values, upload, stats)
            if not is_async:  # a sync exchange waits for every replica: never while holding the turn
                reply = self._exchange(grant.job_id, values, upload, stats)
            self._step(values, reply)
            if not reply.directives.stop:
                self._keep_resume_point(reply.next_values.round)  # before the duties: they may be what fails
            self._duties(reply)
            self.rounds_done += 1
            if reply.directives.stop or self._stop.is_set():
                log.info("%s stopping after round %d", self.prefix, values.round)
                return
            values = reply.next_values

    def _exchange(self, job_id: str, values: RoundValues, upload: Tensor, stats: RoundStats) -> ExchangeReply:
        upload = to_host({"upload": upload})["upload"]  # from a GPU: pinned, non-blocking, waited for
        started = time.perf_counter()
        delay = 0.05
        while True:
            try:
                reply = self.transport.exchange(values.round, upload, stats)
                break
            except CoordinatorError as err:
                # RESOURCE_EXHAUSTED: the coordinator's bytes in flight are spoken for (other uploads are
                # arriving); the round stays open for this upload, so send it again a little later. A round
                # that closes without it answers otherwise (and the loop rejoins).
                if err.code != "RESOURCE_EXHAUSTED" or self._stop.is_set():
                    raise
                log.info("%s round %d: %s; sending again in %.2fs", self.prefix, values.round, err, delay)
                metrics.EXCHANGE_RETRIES.labels(job_id).inc()
                time.sleep(delay)
                delay = min(2 * delay, 2.0)
        self._record(job_id, stats, time.perf_counter() - started)
        return reply

    @staticmethod
    def _record(job_id: str, stats: RoundStats, exchange_seconds: float) -> None:
        metrics.ROUNDS.labels(job_id).inc()
        metrics.INNER_STEPS.labels(job_id).inc(stats.inner_steps)
        metrics.SAMPLES.labels(job_id).inc(stats.samples)
        metrics.SAMPLES_PER_SECOND.labels(job_id).set(stats.samples / max(stats.chain_seconds, 1e-9))
        metrics.CHAIN_SECONDS.labels(job_id).observe(stats.chain_seconds)
        metrics.EXCHANGE_SECONDS.labels(job_id).observe(exchange_seconds)
        metrics.TRAIN_LOSS.labels(job_id).set(stats.train_loss)

    def _chain(self, values: RoundValues) -> tuple[Tensor, RoundStats]:
        optim = self.spec.optim
        hp = ChainHyper(
            values.gamma,
            optim.inner_lr,
            optim.inner_momentum,
            optim.noise,
            optim.beta1,
            optim.decay,
            momentum_on_gradient_only=optim.inner_momentum_scope == "gradient",
        )
        self.work.model.train()
        started = time.perf_counter()
        mu, loss_sum = self.replica.begin_round(self._grad_at_live, hp, self.rng.noise)
        steps = max(optim.L, 1)
        mean_loss = float(loss_sum) / steps  # one device sync per round, not per step
        if not math.isfinite(mean_loss):
            raise NonFiniteLoss(
                f"{self.prefix} round {values.round}: training loss is {mean_loss} "
                f"(lr {values.lr}, inner_lr {optim.inner_lr}); stopping, the last good checkpoint is kept"
            )
        elapsed = time.perf_counter() - started
        samples = steps * self.spec.data.batch_size
        return mu, RoundStats(mean_loss, steps, samples, elapsed, train_size=int(self.work.train_x.shape[0]))

    def _grad_at_live(self) -> Tensor:
        xb, yb = self.work.sampler.next_batch()
        self.work.flat.zero_grad()
        with torch.enable_grad():
            loss = F.cross_entropy(self.work.model(xb), yb)
            loss.backward()
        return loss

    def _outer(self, values: RoundValues) -> OuterHyper:
        optim = self.spec.optim
        return OuterHyper(values.lr, values.rho, optim.momentum, optim.nesterov)

    def _step(self, values: RoundValues, reply: ExchangeReply) -> None:
        reference = to_device(reply.reference, self.device)
        with torch.no_grad():
            if self.spec.optim.mode == "async":
                self.replica.easgd_exchange(reference, self.spec.optim.alpha)
            else:
                self.replica.finish_round(reference, self._outer(values))

    def _duties(self, reply: ExchangeReply) -> None:
        duties = reply.directives
        if duties.checkpoint:
            self.transport.report_state(reply.closed_round, self.state())
        elif duties.model:
            self.transport.report_state(reply.closed_round, to_host({"x": self.replica.x}))
        if duties.evaluate:
            model = self.transport.fetch_model(reply.closed_round)
            epoch, device_model = reply.next_values.epoch, to_device(model, self.device)
            self.transport.report_eval(self.evaluate_model(reply.closed_round, epoch, duties.export, device_model))

    def evaluate_model(self, round: int, epoch: float, export: bool, model: Tensor) -> EvalReport:
        """Evaluate the job's model in this replica's network (BN re-estimated first), then put the
        replica's own weights back."""
        work, data = self.work, self.spec.data
        with torch.no_grad():
            work.flat.load_(model)
            reestimate_batchnorm(work.model, work.train_x, data.batch_size, data.bn_batches)
            results = {"test": evaluate(work.model, work.test_x, work.test_y, data.test_batch_size)}
            subset = self.spec.eval.train_subset
            if subset > 0:
                results["train"] = evaluate(
                    work.model, work.train_x[:subset], work.train_y[:subset], data.test_batch_size
                )
            exported = None
            if export:
                exported = {k: v.detach().cpu().clone() for k, v in work.model.state_dict().items()}
            work.flat.load_(self.replica.x)
        log.info("%s eval after round %d: test error %.4f", self.prefix, round, results["test"][1])
        return EvalReport(round, epoch, results, exported)

    def state(self) -> dict[str, Tensor]:
        sampler = self.work.sampler.state()
        return {
            **to_host(self.replica.state()),
            **self.rng.state(),
            "sampler": torch.tensor([sampler["epoch"], sampler["position"]], dtype=torch.int64),
        }

    def load_state(self, state: dict[str, Tensor]) -> None:
        self.replica.load_state(state)
        self.rng.load_state(state)
        epoch, position = (int(v) for v in state["sampler"])
        self.work.sampler.load_state({"epoch": epoch, "position": position})
