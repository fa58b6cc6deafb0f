"""Side-by-side runs: several configurations trained interleaved, on shared axes, one Stop/Pause."""

from __future__ import annotations

import html
import time
from typing import Any, Mapping, Sequence

import ipywidgets as widgets

from ..config import check_length
from ..data import mnist1d
from ..models import make_model
from ..trainer import Trainer
from .controller import INTERLEAVE, RunController
from .plots import LiveFigure, Refresher, snapshot


def build_trainer(data, *, seed: int = 0, model: str = "mlp", norm: str = "none", warmup_steps: int = 0,
                  device: str = "auto", **options):
    """A Trainer for a reference model (``model``, ``norm``) on ``data``, weights seeded by ``seed``.

    ``warmup_steps`` > 0 means a linear warm-up of that many steps; other keywords are
    ``TrainConfig`` fields (batch_size, lr, scale_rule, base_batch_size, optimizer, ...).

    Example:
        >>> from nbbatch import data
        >>> t = build_trainer(data.mnist1d(num_samples=200), batch_size=32, lr=0.05,
        ...                   base_batch_size=16, scale_rule="linear")
        >>> round(t.peak_lr, 3)
        0.1
    """
    import torch

    if warmup_steps:
        options.setdefault("warmup", "linear")
        options["warmup_steps"] = warmup_steps
    torch.manual_seed(seed)
    net = make_model(model, data, norm=norm)
    return Trainer(net, data, device=device, seed=seed, **options)


class RunComparison:
    """Several runs trained interleaved (one optimizer step per turn), plotted on shared axes.

    Args:
        configs: one dict of ``build_trainer`` options per run (``batch_size``, ``lr``, ...), or
            Trainers.
        data: the dataset for dict configs (default mnist1d).
        labels: a label per run (default ``B=<batch size>``).
        epochs: training length of one Train press, per run (or ``steps``).
        interleave: ``"time"`` (the run with the least training time steps next: a race on wall
            time) or ``"steps"`` (round robin, deterministic order).
        headless: Train blocks until every run ends; no live redraws.
        refresh: seconds between live-figure frames.
        x: the figure's x axis, ``"step"``, ``"examples"`` or ``"time"`` (default: ``"time"`` for a
            race on wall time, else ``"step"``).

    Example:
        >>> from nbbatch import data
        >>> rc = RunComparison([{"batch_size": 20}, {"batch_size": 100}], data=data.mnist1d(num_samples=500),
        ...                    epochs=1, headless=True, interleave="steps")
        >>> rc.train(); [t.step_count for t in rc.trainers]
        [20, 4]
    """

    def __init__(self, configs: Sequence[Mapping[str, Any] | Any], *, data=None, labels: Sequence[str] | None = None,
                 epochs: float | None = 5, steps: int | None = None, interleave: str = "time",
                 headless: bool = False, refresh: float = 1.0, seed: int = 0, x: str | None = None):
        if isinstance(configs, (str, bytes)) or not isinstance(configs, Sequence) or not configs:
            raise ValueError("configs: give a non-empty list of option dicts or Trainers")
        if interleave not in INTERLEAVE:
            raise ValueError(f"interleave={interleave!r} is not known; use one of {INTERLEAVE}")
        if steps is not None:
            epochs = None
        if epochs is None and steps is None:
            raise ValueError("give epochs=... or steps=...")
        if x is None:
            x = "time" if interleave == "time" else "step"
        if x not in ("step", "examples", "time"):
            raise ValueError(f"x={x!r} is not known; use 'step', 'examples' or 'time'")
        self.x = x
        check_length(epochs, steps)   # now, not as a message at the first Train (a headless compare() would not train)
        if not isinstance(headless, bool):
            raise TypeError(f"headless must be True or False, got {headless!r}")
        trainers = []
        if any(isinstance(c, Mapping) for c in configs) and data is None:
            data = mnist1d()
        for i, c in enumerate(configs):
            if isinstance(c, Mapping):
                try:
                    trainers.append(build_trainer(data, seed=seed, **c))
                except (ValueError, TypeError) as err:
                    raise type(err)(f"configs[{i}]: {err}") from err
            elif hasattr(c, "fit"):
                trainers.append(c)
            else:
                raise TypeError(f"configs[{i}] must be a dict of options or a Trainer, got {type(c).__name__}")
        labels = [f"B={t.config.batch_size}" for t in trainers] if labels is None else list(labels)
        self.trainers = trainers
        self.labels = labels
        self.epochs, self.steps = epochs, steps
        self.headless = headless
        self.controller = RunController(trainers, labels=labels, interleave=interleave)
        self.controller.on_change(self._on_run_change)
        self._figure = LiveFigure(labels, x=x)
        self._refresher = Refresher(self._draw, interval=refresh, tick=self._tick)
        W = widgets
        self.train_button = W.Button(description="Train", button_style="success", icon="play")
        self.pause_button = W.Button(description="Pause", icon="pause")
        self.stop_button = W.Button(description="Stop", button_style="danger", icon="stop")
        self.train_button.on_click(lambda _: self.train())
        self.pause_button.on_click(lambda _: self.toggle_pause())
        self.stop_button.on_click(lambda _: self.stop())
        self.status = W.HTML(value="idle")
        self.message = W.HTML(value="")
        self.image = W.Image(format="png", layout=W.Layout(width="100%", max_width="1000px", margin="0"))
        self.widget = W.VBox([W.HBox([self.train_button, self.pause_button, self.stop_button]),
                              self.status, self.message, self.image], layout=W.Layout(max_width="1000px"))
        t0 = time.perf_counter()     # the empty figure now: it shows at once and sets the redraw throttle
        self.image.value = self._figure.png([snapshot(t.history) for t in self.trainers])
        self._refresher.cost = time.perf_counter() - t0

    def _repr_mimebundle_(self, **kwargs):
        data = self.widget._repr_mimebundle_(**kwargs)
        data["text/plain"] = repr(self)
        return data

    def __repr__(self) -> str:
        return (f"nbbatch RunComparison of {', '.join(self.labels)} (interactive: run this cell in Jupyter "
                f"to show and use it; a saved notebook shows only this text)")

    @property
    def errors(self) -> list:
        """Errors raised in the training threads (``RunError`` with run, label, error, traceback)."""
        return self.controller.errors

    def train(self) -> None:
        """Train every run (or continue stopped ones); blocks when headless."""
        c = self.controller
        if c.running:
            if c.paused:
                self.toggle_pause()
            return
        c.wait()   # the last runs' thread may still be drawing its final frame
        try:
            c.start_live(self._refresher, live=not self.headless, epochs=self.epochs, steps=self.steps)
        except (ValueError, RuntimeError) as err:
            self.message.value = f'<span style="color:#b00020">{html.escape(str(err))}</span>'
            return
        self._figure.set_x_end(c.ends, [t.config.batch_size for t in self.trainers])
        if self.headless:
            c.wait()
            self._draw()

    def toggle_pause(self) -> None:
        c = self.controller
        if not c.running:
            return
        if c.paused:
            c.resume()
            self.pause_button.description = "Pause"
        else:
            c.pause()
            self.pause_button.description = "Resume"

    def stop(self) -> None:
        self.controller.stop()
        self.pause_button.description = "Pause"

    def wait(self, timeout: float | None = None) -> bool:
        done = self.controller.wait(timeout)
        if done:
            self._draw()
        return done

    def _on_run_change(self) -> None:
        if not self.controller.active and not self.headless:
            self._refresher.final()

    def _draw(self) -> None:
        self.image.value = self._figure.png([snapshot(t.history) for t in self.trainers])
        self._tick()

    def _tick(self) -> None:
        rows = []
        for label, t in zip(self.labels, self.trainers):
            ev = t.history.evals.last() or {}
            acc = ", ".join(f"test {k[5:].replace('_', ' ')} {v:.3f}" for k, v in sorted(ev.items())
                            if k.startswith("eval_") and isinstance(v, float))
            end = self.controller.ends[self.labels.index(label)] if self.controller.ends else None
            of = f" / {end:,}" if end is not None else ""
            rows.append(f"{html.escape(label)}: step {t.step_count:,}{of}, {t.train_time:.1f} s{', ' + acc if acc else ''}")
        self.status.value = f"<b>{self.controller.state}</b><br>" + "<br>".join(rows)
        errs = self.controller.errors
        if errs:
            self.message.value = "<br>".join(f'<span style="color:#b00020">{html.escape(e.message())}</span>' for e in errs)

    def figure(self):
        """A static matplotlib Figure of all runs (display it to keep it in a saved notebook)."""
        fig = LiveFigure(self.labels, x=self.x, live=False)
        fig.update([t.history for t in self.trainers])
        return fig.figure

    def table(self) -> list[dict]:
        """Per run: label, steps, examples, training seconds and the last evaluation (rounded)."""
        out = []
        for label, t in zip(self.labels, self.trainers):
            row = {"run": label, "steps": t.step_count, "examples": t.examples_seen, "seconds": round(t.train_time, 2)}
            ev = t.history.evals.last() or {}
            row.update({k: round(v, 3) for k, v in sorted(ev.items()) if k.startswith("eval_") and isinstance(v, float)})
            out.append(row)
        return out

    def close(self) -> None:
        self.controller.close()
        self._refresher.stop()
        self.widget.close()


def compare(batch_sizes: Sequence[int] = (16, 128, 1024), *, lr: float = 0.05, base_batch_size: int = 64,
            scale_rule: str = "linear", data=None, epochs: float | None = 5, steps: int | None = None,
            interleave: str = "time", headless: bool = False, seed: int = 0, **options) -> RunComparison:
    """A ``RunComparison`` of batch sizes with the learning rate scaled from ``base_batch_size``.

    Headless: trains at once (blocking) and returns the finished comparison. Otherwise returns the
    widget, ready for its Train button. ``options`` go to every run (model, norm, optimizer, ...);
    every run starts from the same ``seed`` (initial weights and data order).

    Example:
        >>> from nbbatch import data
        >>> rc = compare((20, 100), data=data.mnist1d(num_samples=500), epochs=1, headless=True)
        >>> [round(t.peak_lr, 4) for t in rc.trainers]
        [0.0156, 0.0781]
    """
    if isinstance(batch_sizes, (str, bytes)) or not isinstance(batch_sizes, Sequence) or not batch_sizes:
        raise ValueError(f"batch_sizes must be a non-empty sequence of ints, got {batch_sizes!r}")
    configs = [dict(options, batch_size=b, lr=lr, base_batch_size=base_batch_size, scale_rule=scale_rule)
               for b in batch_sizes]
    rc = RunComparison(configs, data=data, epochs=epochs, steps=steps, interleave=interleave, headless=headless,
                       seed=seed)
    if headless:
        rc.train()
    return rc
