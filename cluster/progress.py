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
