"""The progress bar of ``Trainer.fit``: a tqdm bar labelled with the run and its live numbers."""

from __future__ import annotations

import os
import sys
import threading
import time


def progress_bar(progress: bool | None, total: int):
    """A labelled tqdm bar for ``fit``, or None (see ``fit``'s ``progress``).

    The bar (named after the run by ``LabelledBar.label``: batch size, optimizer, lr) counts steps of this fit against its
    total, shows tqdm's time remaining and, twice a second, the last step's loss and examples/s.
    In a terminal a bar is transient (cleared when the fit ends, so a printed table stays
    intact; lines printed with ``tqdm.write`` pass above it); in a notebook the widget stays,
    and a fit that ends before its total says at which step it ended.
    """
    if progress is None:
        setting = os.environ.get("NBBATCH_PROGRESS", "").strip().lower()
        if setting in ("0", "false", "off", "no") or threading.current_thread() is not threading.main_thread():
            return None
        progress = setting in ("1", "true", "on", "yes") or sys.stderr.isatty()
    if not progress:
        return None
    try:
        from tqdm.auto import tqdm
        from tqdm.std import tqdm as text_tqdm
    except ImportError:   # tqdm is a dependency; a broken install only loses the bar
        return None
    terminal = tqdm is text_tqdm
    bar = tqdm(total=total, desc="fit", unit="step", mininterval=0.5, dynamic_ncols=True, leave=not terminal)
    return LabelledBar(bar, None, terminal)


class LabelledBar:
    """The few calls ``fit`` makes on a bar (``update``, ``set_postfix``, ``close``), with live numbers."""

    def __init__(self, bar, trainer, terminal: bool):
        self.bar, self.trainer, self.terminal = bar, trainer, terminal
        self._next = 0.0

    def label(self, trainer) -> None:
        """Name the bar after ``trainer``'s run and show its numbers from now on."""
        c = trainer.config
        opt = c.optimizer if isinstance(c.optimizer, str) else type(c.optimizer).__name__
        self.trainer = trainer
        self.bar.set_description(f"B={c.batch_size} {opt} lr={trainer.peak_lr:.3g}", refresh=True)

    def update(self, n: int = 1) -> None:
        now = time.monotonic()
        if self.trainer is not None and now >= self._next:
            self._next = now + 0.5
            row = self.trainer.history.steps.last() or {}
            parts = []
            if row.get("loss") is not None:
                parts.append(f"loss {row['loss']:.4g}")
            if row.get("examples_per_s"):
                parts.append(f"{row['examples_per_s']:,.0f} ex/s")
            self.bar.set_postfix_str(", ".join(parts), refresh=False)
        self.bar.update(n)

    def set_postfix(self, **kwargs) -> None:
        pass   # update() shows the loss (and more) itself

    def close(self) -> None:
        if not self.terminal and self.bar.total and self.bar.n < self.bar.total:
            self.bar.set_description(f"{self.bar.desc} (ended at step {self.bar.n})", refresh=False)
        self.bar.close()
