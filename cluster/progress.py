"""A progress bar fed by job events: round, data passes, train loss, test error, gamma and rho."""

from __future__ import annotations

import threading
from typing import Any

from tqdm import tqdm


class ProgressBar:
    def __init__(self, total_rounds: int, start_round: int = 0, desc: str = "parle", enabled: bool = True) -> None:
        self._bar = tqdm(
            total=total_rounds,
            initial=start_round,
            desc=desc,
            unit="round",
            disable=not enabled,
            dynamic_ncols=True,
        )
        self._lock = threading.Lock()
        self._fields: dict[str, str] = {}
        self.last_eval: dict[str, dict[str, float]] = {}

    def __call__(self, event: dict[str, Any]) -> None:
        with self._lock:
            kind = event.get("kind")
            if kind == "round":
                self._fields.update(
                    epoch=f"{event['epoch']:.2f}",
                    loss=f"{event['train_loss']:.4f}",
                    gamma=f"{event['gamma']:.3g}",
                    rho=f"{event['rho']:.3g}",
                )
                self._bar.update(1)
            elif kind == "eval":
                self.last_eval[event["split"]] = {
                    "loss": event["loss"],
                    "error": event["error"],
                    "epoch": event["epoch"],
                }
                if event["split"] == "test":
                    self._fields["test_err"] = f"{100 * event['error']:.2f}%"
            else:
                return
            self._bar.set_postfix(self._fields, refresh=False)

    def close(self) -> None:
        self._bar.close()


class LineProgress:
    """For logs (no terminal, e.g. `ray job logs`): one line per eval and about every 10% of rounds."""

    def __init__(self, total_rounds: int, desc: str = "parle") -> None:
        self.total, self.desc = total_rounds, desc
        self.every = max(1, total_rounds // 10)
        self.last_eval: dict[str, dict[str, float]] = {}

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event.get("kind")
        if kind == "round" and ((event["round"] + 1) % self.every == 0 or event["round"] + 1 == self.total):
            print(
                f"{self.desc}: round {event['round'] + 1}/{self.total} epoch {event['epoch']:.2f} "
                f"loss {event['train_loss']:.4f} gamma {event['gamma']:.3g} rho {event['rho']:.3g}",
                flush=True,
            )
        elif kind == "eval":
            self.last_eval[event["split"]] = {"loss": event["loss"], "error": event["error"], "epoch": event["epoch"]}
            print(
                f"{self.desc}: eval {event['split']} after epoch {event['epoch']:.2f}: "
                f"error {100 * event['error']:.2f}% loss {event['loss']:.4f}",
                flush=True,
            )
        elif kind == "state":
            print(f"{self.desc}: {event['state']} {event.get('message', '')}".rstrip(), flush=True)

    def close(self) -> None:
        pass
