"""The job's model, gathered from its workers.

Sync, the model of closed round k is the mean of the replicas' weights x after that round's elastic step,
which only the workers hold: on the rounds that need it (evaluation, checkpoint, the end) every replica
uploads its x (its whole state on checkpoint rounds) and the mean is kept until its evaluator has fetched it.
A replica whose worker is gone owes nothing: the model is then the mean over the others'. Async, the model is
a snapshot of the center (``adopt``).

Bookkeeping only, no lock: the job calls it under its lock, and does what a completed model asks for
(its checkpoint, its round state).
"""

from __future__ import annotations

from torch import Tensor

from coordinator.job_records import PendingModel


class ModelGather:
    def __init__(self) -> None:
        self.model: Tensor | None = None
        self.round = -1  # the closed round whose gathered model ``model`` is; -1: none gathered yet
        self.pending: PendingModel | None = None
        self._kept: dict[int, Tensor] = {}  # closed round -> its model, for evaluators still fetching

    def adopt(self, model: Tensor, round: int = -1, *, keep: bool = False) -> None:
        """A model known without gathering (a checkpoint's, a round state's, async's snapshot of the center);
        ``keep``: evaluators of ``round`` may fetch it (async keeps only the latest)."""
        self.model = model
        if round >= 0:
            self.round = round
        if keep:
            self._kept = {round: model}

    def open(self, round: int, center: Tensor, replicas: set[int], checkpoint: bool) -> bool:
        """Start gathering the model of closed ``round`` from ``replicas``; True when none is left to ask."""
        self.pending = PendingModel(round, center, replicas, checkpoint)
        return self.pending.complete

    def gathering(self, round: int) -> bool:
        return self.pending is not None and self.pending.round == round

    def owes(self, round: int, replica: int | None) -> bool:
        """``replica`` still has to upload its x for the model of ``round``."""
        pending = self.pending
        return pending is not None and pending.round == round and replica in pending.expected - pending.reported

    def excuse(self, replica: int, before_round: int | None = None) -> bool:
        """``replica`` cannot upload (its worker left, or came back without its state); with ``before_round``,
        only a model of an earlier round is excused. True when the model is now complete."""
        pending = self.pending
        if pending is None or replica in pending.reported:
            return False
        if before_round is not None and pending.round >= before_round:
            return False
        pending.expected.discard(replica)
        return pending.complete

    def add(self, replica: int, state: dict[str, Tensor]) -> bool:
        """One replica's x (its whole state on checkpoint rounds); True when the model is complete."""
        pending = self.pending
        assert pending is not None, "an upload with no model being gathered"
        if pending.checkpoint:
            pending.states[replica] = state
        pending.total.add(state["x"])
        pending.reported.add(replica)
        return pending.complete

    def finish(self) -> PendingModel:
        """The model being gathered is complete: it becomes the model (kept for its evaluators, and the one
        before it, still being fetched); returns what was gathered (the replicas' states, the center)."""
        pending = self.pending
        assert pending is not None and pending.complete
        if pending.total.count:
            model, _ = pending.total.finish()
        else:  # every replica left before uploading: the last model we had, or the center
            model = self.model if self.model is not None else pending.center
        self.model, self.round = model, pending.round
        self._kept[pending.round] = model
        self._kept.pop(pending.round - 2, None)
        self.pending = None
        return pending

    def kept(self, round: int) -> Tensor | None:
        return self._kept.get(round)
