"""Run one or several Trainers in background threads, controlled between optimizer steps.

This is the widget-free core of the panels: buttons and sliders only call ``pause``, ``resume``,
``stop``, ``reschedule`` or ``checkpoint``, which set flags or queue changes; the training threads
apply them between optimizer steps, from the trainers' ``step_end`` callbacks. Several trainers
take turns (one optimizer step per turn), so side-by-side runs share one core fairly and never
run concurrently. Written by hand: no maintained library schedules torch training loops like this.
"""

from __future__ import annotations

import os
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from ..config import check_length
from ..schedules import length_in_steps

INTERLEAVE = ("steps", "time")


@dataclass
class RunError:
    """An exception raised in a training thread, kept with its run and its formatted traceback."""

    run: int
    label: str
    error: BaseException
    traceback: str = field(repr=False, default="")

    def message(self) -> str:
        return f"{self.label}: {type(self.error).__name__}: {self.error}"


class RunController:
    """Train ``trainers`` in background threads, taking turns, with pause/stop between steps.

    Args:
        trainers: one Trainer or a sequence of them (trained interleaved).
        labels: a name per trainer (default ``run 0``, ``run 1``, ...).
        interleave: ``"steps"`` (round robin: one step each, deterministic order) or ``"time"``
            (the run with the least training time so far goes next: a fair race on wall time).

    Example:
        >>> from nbbatch import Trainer, data, models
        >>> t = Trainer(models.MLP(), data.mnist1d(num_samples=200), batch_size=32, lr=0.1)
        >>> c = RunController(t)
        >>> c.start(steps=3, block=True)
        >>> t.step_count, c.state
        (3, 'finished')
    """

    def __init__(self, trainers, labels: Sequence[str] | None = None, interleave: str = "steps"):
        trainers = list(trainers) if isinstance(trainers, (list, tuple)) else [trainers]
        if not trainers:
            raise ValueError("trainers: give at least one Trainer")
        for t in trainers:
            if not (hasattr(t, "fit") and hasattr(t, "add_callback") and hasattr(t, "request_stop")):
                raise TypeError(f"trainers must be nbbatch Trainers, got {type(t).__name__}")
        if len({id(t) for t in trainers}) != len(trainers):
            raise ValueError("trainers: the same Trainer appears twice")
        if interleave not in INTERLEAVE:
            raise ValueError(f"interleave={interleave!r} is not known; use one of {INTERLEAVE}")
        labels = [f"run {i}" for i in range(len(trainers))] if labels is None else [str(x) for x in labels]
        if len(labels) != len(trainers):
            raise ValueError(f"labels: {len(labels)} labels for {len(trainers)} trainers")
        self.trainers = trainers
        self.labels = labels
        self.interleave = interleave
        self.errors: list[RunError] = []        # every error of every run, oldest first
        self.rejected: list[RunError] = []      # queued changes the trainer refused (kept, with the error)
        self.messages: list[str] = []           # failures of on_change listeners
        self._cond = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._active: set[int] = set()          # runs whose fit is still going
        self._turn: int | None = None
        self._paused = False
        self._stop = False
        self._pending: list[dict] = [{} for _ in trainers]      # queued reschedule changes per run
        self._pending_ckpt: list[tuple[int, Any]] = []          # queued (run, path) checkpoints
        self._ends: list[int | None] = [None] * len(trainers)   # step at which this segment ends
        self.starts: list[int | None] = [None] * len(trainers)  # step at which this segment began
        self._stop_time: float | None = None
        self.stop_latency: list[dict] = []      # per stop: seconds and steps from stop() to halt
        self._stop_steps: list[int] | None = None
        self._listeners: list[Callable[[], None]] = []
        self._last_errors: list[RunError] = []  # errors of the latest start()
        self._waiting: set[int] = set()         # runs blocked between two steps
        self._solo = False                      # one run in this segment: no turns to take
        self._thread_of: list = [None] * len(trainers)   # the thread training each run
        self._attention = False                 # a pause, stop or queued change awaits a step boundary
        self._stopped_last = False
        self._callbacks = [self._make_callback(i) for i in range(len(trainers))]
        for t, cb in zip(trainers, self._callbacks):
            t.add_callback("fit_start", cb)
            t.add_callback("step_end", cb)

    # ------------------------------------------------------------------ state
    @property
    def running(self) -> bool:
        """True from ``start()`` until every run of the segment has ended (its fit returned)."""
        return bool(self._active)

    @property
    def active(self) -> int:
        """How many runs of the current segment are still training (0 once all have ended)."""
        return len(self._active)

    @property
    def ends(self) -> list:
        """Per run, the step at which the current (or last) segment ends; None before any start."""
        return list(self._ends)

    @property
    def resumable(self) -> bool:
        """True when a stopped segment can be continued with ``start()``."""
        return not self.running and any(e is not None and e > t.step_count for e, t in zip(self._ends, self.trainers))

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def state(self) -> str:
        """``idle``, ``running``, ``paused``, ``stopping``, ``finished``, ``stopped`` or ``error``."""
        if self.running:
            if self._stop:
                return "stopping"
            return "paused" if self._paused else "running"
        if not self._threads:
            return "idle"
        if self._last_errors:
            return "error"
        return "stopped" if self._stopped_last else "finished"

    @property
    def error(self) -> BaseException | None:
        """The most recent error raised in a training thread (kept until the next one)."""
        return self.errors[-1].error if self.errors else None

    def on_change(self, fn: Callable[[], None]) -> None:
        """Call ``fn()`` (from the training thread) when a run starts, ends or fails."""
        self._listeners.append(fn)

    def _notify(self) -> None:
        for fn in self._listeners:
            try:
                fn()
            except Exception as err:  # a broken listener must not kill training
                self.messages.append(f"listener failed: {type(err).__name__}: {err}")

    # ------------------------------------------------------------------ controls
    def start_live(self, refresher, *, live: bool = True, epochs: float | None = None,
                   steps: int | None = None) -> None:
        """Continue a stopped segment, or ``start(epochs, steps)``, with ``refresher`` redrawing.

        The redraws start before the runs, so runs that end at once stop them again (with their
        final frame); a start that fails stops them and re-raises. ``live=False``: no redraws.
        """
        if live:
            refresher.start()
        try:
            if self.resumable:
                self.start()
            else:
                self.start(epochs=epochs, steps=steps)
        except (ValueError, RuntimeError):
            refresher.stop()
            raise

    def start(self, epochs: float | None = None, steps: int | None = None, *, block: bool = False,
              timeout: float | None = None) -> None:
        """Train every run for ``epochs`` or ``steps`` more (or continue a stopped segment).

        When the previous segment was stopped before its end, ``start()`` with no length
        continues it to that end. Returns at once unless ``block`` (then it waits, and a
        KeyboardInterrupt stops the runs cleanly before it is re-raised).
        """
        check_length(epochs, steps)
        with self._cond:
            if self.running:
                raise RuntimeError("training is already running; stop() or pause() it first")
            ends = []
            for i, t in enumerate(self.trainers):
                if epochs is None and steps is None:
                    end = self._ends[i]
                    if end is None or end <= t.step_count:
                        raise ValueError("start needs epochs=... or steps=... (nothing to continue)")
                else:
                    end = t.step_count + length_in_steps(steps, epochs, t.steps_per_epoch)
                ends.append(end)
            if epochs is not None or steps is not None:
                self.starts = [t.step_count for t in self.trainers]
            self._ends = ends
            self._stop = False
            self._paused = False
            self._stop_time = None
            self._last_errors = []
            self._stopped_last = False
            self._active = {i for i, t in enumerate(self.trainers) if t.step_count < ends[i]}
            self._solo = len(self._active) == 1
            self._attention = any(self._pending) or bool(self._pending_ckpt)
            self._turn = self._next_turn(None)
            self._threads = [threading.Thread(target=self._run, args=(i,), name=f"nbbatch-train-{i}", daemon=True)
                             for i in sorted(self._active)]
            self._thread_of = [None] * len(self.trainers)
            for i, th in zip(sorted(self._active), self._threads):
                self._thread_of[i] = th
            for th in self._threads:
                th.start()
        self._notify()
        if block:
            self.wait(timeout)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until training halts; True if it did. Ctrl-C/interrupt stops the runs, then re-raises."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            for th in list(self._threads):
                th.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        except KeyboardInterrupt:
            self.stop()
            for th in list(self._threads):
                th.join()
            raise
        return not any(th.is_alive() for th in self._threads)

    def wait_paused(self, timeout: float | None = None) -> bool:
        """After ``pause()``: wait until every run is held between two steps; True if so.

        From then on ``step_count`` does not change until ``resume()`` or ``stop()``.
        """
        with self._cond:
            return self._cond.wait_for(lambda: not self._paused or not self._active
                                       or self._active <= self._waiting, timeout)

    def pause(self) -> None:
        """Hold every run after its current step (resumable with ``resume``)."""
        with self._cond:
            self._paused = True
            self._attention = True
            self._cond.notify_all()

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    def stop(self) -> None:
        """Stop every run after its current step; the trainers stay consistent and resumable."""
        with self._cond:
            if not self.running or self._stop:
                return
            self._stop = True
            self._attention = True
            self._stop_time = time.perf_counter()
            self._stop_steps = [t.step_count for t in self.trainers]
            for t in self.trainers:
                t.request_stop()
            self._cond.notify_all()

    def reschedule(self, run: int | None = None, **changes) -> None:
        """Change lr / warm-up / decay of one run (or all): applied before the very next step.

        Changes are validated at once against each trainer's config (a bad value raises here and
        nothing is queued). While nothing trains they are applied at once, and a change the
        trainer refuses (a warm-up longer than the run) raises. While training they are queued;
        a change the trainer then refuses is kept in ``rejected`` and the old schedule stays.
        """
        runs = self._runs(run)
        for i in runs:
            self.trainers[i].config.replace(**changes)   # validate now: raises before queueing
        with self._cond:
            if self.running:
                for i in runs:
                    self._pending[i].update(changes)
                self._attention = True
                return
            done = []
            try:
                for i in runs:
                    old = {k: getattr(self.trainers[i].config, k) for k in changes}
                    self.trainers[i].reschedule(**changes)
                    done.append((i, old))
            except BaseException:
                for i, old in done:   # all or nothing across runs: the old values rebuild the old schedule
                    self.trainers[i].reschedule(**old)
                raise

    def checkpoint(self, path, run: int = 0) -> None:
        """Save run ``run`` to ``path`` between steps (at once when idle)."""
        (i,) = self._runs(run)
        try:   # checked now: a bad path must not reach the training thread, where it would end the run
            path = os.fspath(path)
        except TypeError:
            raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}") from None
        with self._cond:
            if self.running:
                self._pending_ckpt.append((i, path))
                self._attention = True
                return
        self.trainers[i].save(path)

    def close(self) -> None:
        """Stop, wait, and detach the controller's callbacks from the trainers."""
        self.stop()
        self.wait()
        for t, cb in zip(self.trainers, self._callbacks):
            for event in ("fit_start", "step_end"):
                try:
                    t.remove_callback(event, cb)
                except ValueError:
                    pass

    def _runs(self, run: int | None) -> list[int]:
        if run is None:
            return list(range(len(self.trainers)))
        if isinstance(run, bool) or not isinstance(run, int) or not 0 <= run < len(self.trainers):
            raise ValueError(f"run must be an index in [0, {len(self.trainers) - 1}], got {run!r}")
        return [run]

    # ------------------------------------------------------------------ inside the training threads
    def _next_turn(self, current: int | None) -> int | None:
        if not self._active:
            return None
        order = sorted(self._active)
        if self.interleave == "time":
            return min(order, key=lambda i: (self.trainers[i].train_time, i))
        if current is None:
            return order[0]
        later = [i for i in order if i > current]
        return later[0] if later else order[0]

    def _apply_pending(self, i: int) -> None:
        # Called with the lock held, between steps of run i (or while nothing runs).
        changes = self._pending[i]
        if changes:
            self._pending[i] = {}
            try:
                self.trainers[i].reschedule(**changes)
            except (ValueError, TypeError) as err:
                self.rejected.append(RunError(i, self.labels[i], err))
        keep = []
        for j, path in self._pending_ckpt:
            if j != i:
                keep.append((j, path))
                continue
            try:
                self.trainers[i].save(path)
            except Exception as err:   # a failed checkpoint is reported, it never ends the run
                self.rejected.append(RunError(i, self.labels[i], err))
        self._pending_ckpt = keep

    def _make_callback(self, i: int):
        def callback(trainer, row):
            if threading.current_thread() is not self._thread_of[i]:
                return      # a fit this controller did not start (e.g. trainer.fit() by hand): leave it alone
            # Fast path, no lock: a single run that nobody has paused, stopped or changed. A flag
            # set just after this check is seen at the next step boundary (as with the lock).
            if self._solo and not self._attention:
                return
            with self._cond:
                if row:   # step_end: this run's turn is over
                    self._turn = self._next_turn(i)
                    self._cond.notify_all()
                # wait for our turn (and for resume); a stop releases everyone at once
                self._waiting.add(i)
                self._cond.notify_all()
                try:
                    while not self._stop and (self._paused or self._turn != i):
                        self._cond.wait()
                finally:
                    self._waiting.discard(i)
                if self._stop:
                    trainer.request_stop()
                else:
                    self._apply_pending(i)
                self._attention = self._paused or self._stop or bool(self._pending[i]) or bool(self._pending_ckpt)
        return callback

    def _run(self, i: int) -> None:
        t = self.trainers[i]
        try:
            t.fit(steps=self._ends[i] - t.step_count)
        except BaseException as err:   # kept on the controller and shown by the panels, never lost
            with self._cond:
                e = RunError(i, self.labels[i], err, traceback.format_exc())
                self.errors.append(e)
                self._last_errors.append(e)
        finally:
            with self._cond:
                self._active.discard(i)
                if self._turn == i or self._turn is None:
                    self._turn = self._next_turn(i)
                self._apply_pending(i)
                if self._stop:
                    self._stopped_last = True
                last = not self._active
                if last and self._stop_time is not None and self._stop_steps is not None:
                    self.stop_latency.append({
                        "seconds": time.perf_counter() - self._stop_time,
                        "steps": max(t2.step_count - s for t2, s in zip(self.trainers, self._stop_steps))})
                self._cond.notify_all()
            if last:
                self._notify()
