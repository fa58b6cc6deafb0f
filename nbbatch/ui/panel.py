"""``TrainingPanel``: an ipywidgets panel that trains in a background thread and stays responsive.

The panel holds no training logic: its buttons and sliders call a ``RunController`` (pause,
stop, reschedule, checkpoint between optimizer steps) and build Trainers from their values.
"""

from __future__ import annotations

import html
import importlib
import math
import os
import sys
import threading
import time
from typing import Any, Callable, Mapping

import ipywidgets as widgets

from .. import data as data_mod
from ..config import OPTIONS, RESCHEDULE_OPTIONS, TrainConfig
from ..device import describe_device, process_peak_rss_bytes
from ..models import MODELS, NORMS
from .compare import build_trainer
from .controller import RunController
from .plots import LiveFigure, Refresher, snapshot

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
ACCUMULATE = (1, 2, 4, 8, 16)
# the learning-rate slider's stops: 1-1.5-2-3-5-7 per decade, exact decimals (any other value is typed)
LR_GRID = tuple(float(f"{m}e{e}") for e in range(-5, 1) for m in (1, 1.5, 2, 3, 5, 7)) + (10.0,)
DEFAULT_EPOCHS = 15   # one Train: long enough to see the loss fall, short of overfitting mnist1d
TEXT_REPR = ("nbbatch TrainingPanel (interactive controls: run this cell in Jupyter to show and use "
             "the panel; a saved notebook shows only this text)")
DEFAULTS = {"model": "mlp", "norm": "none", "batch_size": 64, "lr": 0.05, "warmup_steps": 0,
            "optimizer": "momentum", "accumulate": 1, "precision": "auto"}
# The controls of options that may change while a run is live (TrainConfig declares which) apply
# to the running trainer at its next step; the others start a new run.
LIVE = tuple(name for name in DEFAULTS if name in RESCHEDULE_OPTIONS)
STRUCTURAL = tuple(name for name in DEFAULTS if name not in LIVE)


def _duration(seconds: float) -> str:
    """``75.2`` -> ``'1 min 15 s'``; short, for the progress line."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def _metric_text(ev: dict | None) -> str:
    """``{'eval_accuracy': 0.63, 'eval_loss': 1.2}`` -> ``'test accuracy 0.630, test loss 1.200'``."""
    if not ev:
        return ""
    return ", ".join(f"test {k[5:].replace('_', ' ')} {v:.3f}" for k, v in sorted(ev.items())
                     if k.startswith("eval_") and isinstance(v, float))


def _warmup_options(steps: int) -> dict:
    return {"warmup": "linear", "warmup_steps": int(steps), "warmup_epochs": None} if steps else \
        {"warmup": "none", "warmup_steps": None, "warmup_epochs": None}


def default_builder(data=None, seed: int = 0, device: str = "auto", log_dir: str | os.PathLike | None = None,
                    **options) -> Callable[..., Any]:
    """A builder ``values -> Trainer`` for the reference models on ``data`` (default mnist1d).

    The model is rebuilt from ``seed`` each time, so two runs with the same values start from
    the same weights. ``options`` are further ``TrainConfig`` fields (``eval_every``, ...).
    With ``log_dir``, each run built keeps an on-disk run log (``Trainer(log_dir=...)``) in its
    own folder ``<log_dir>/run-001``, ``run-002``, ...: a run survives a kernel that dies
    (``History.read``).

    Example:
        >>> from nbbatch import data
        >>> build = default_builder(data.mnist1d(num_samples=200))
        >>> build(model="mlp", norm="none", batch_size=32, lr=0.1, warmup_steps=0,
        ...       optimizer="sgd", accumulate=1, precision="fp32").config.batch_size
        32
    """
    cache = {}

    def build(**values):
        unknown = set(values) - set(DEFAULTS)
        if unknown:
            raise TypeError(f"build: unknown control(s) {sorted(unknown)}; known: {sorted(DEFAULTS)}")
        if "data" not in cache:
            cache["data"] = data if data is not None else data_mod.mnist1d()
        extra = dict(options)
        if log_dir is not None:
            extra["log_dir"] = _next_run_dir(log_dir)
        return build_trainer(cache["data"], seed=seed, device=device, **{**DEFAULTS, **values}, **extra)

    return build


def _next_run_dir(log_dir: str | os.PathLike) -> str:
    """The first ``<log_dir>/run-NNN`` not yet there (runs of earlier sessions are kept)."""
    root = os.fspath(log_dir)
    k = 1
    while os.path.exists(os.path.join(root, f"run-{k:03d}")):
        k += 1
    return os.path.join(root, f"run-{k:03d}")


_PREFETCH = "torch._dynamo"
_prefetch_lock = threading.Lock()
_prefetch_thread: threading.Thread | None = None


def prefetch_optimizer_imports() -> threading.Thread | None:
    """Import ``torch._dynamo`` in a background thread, once per process; return that thread.

    The first ``torch.optim`` optimizer of a process imports it (about 1.1-1.3 s on one core of
    the reference machine, mostly ``torch._dynamo``'s compiler modules), and the panel builds
    its Trainer, with its optimizer, when Train is clicked: without this, the first Train
    waited that long before its first step. The panel starts the import as it is displayed,
    while the participant reads it; a Train clicked sooner waits for the import as before.
    Nothing new is loaded: every training run of the process imports the same module.
    """
    global _prefetch_thread
    with _prefetch_lock:
        if _PREFETCH in sys.modules or _prefetch_thread is not None:
            return _prefetch_thread
        _prefetch_thread = threading.Thread(target=_import_quietly, args=(_PREFETCH,),
                                            name="nbbatch-prefetch", daemon=True)
        _prefetch_thread.start()
        return _prefetch_thread


def _import_quietly(name: str) -> None:
    try:
        importlib.import_module(name)
    except Exception:   # a torch without it: the optimizer's own import says what is wrong, in its thread
        pass


class TrainingPanel:
    """Controls, live figure, progress and status for training a Trainer from a notebook.

    Training runs in a background thread; Pause, Stop, Checkpoint and the learning-rate and
    warm-up sliders act between optimizer steps (an lr change applies to the very next step).
    The structural settings (model, norm, batch size, optimizer, accumulation, precision) start
    a new run at the next Train or at Reset; the previous runs stay in ``runs``. A setting the
    trainer rejects is shown in the panel and the current run is kept as it was.

    Args:
        trainer: a Trainer to drive (its structural settings are then fixed), or None.
        build: ``build(**values) -> Trainer`` called with the panel's values (keys of
            ``DEFAULTS``); default: the reference models on ``data`` (``default_builder``).
        data: the dataset of the default builder (default mnist1d).
        log_dir: with the default builder, keep an on-disk run log of every run in
            ``<log_dir>/run-NNN`` (see ``default_builder``); None: none.
        epochs: training length of one Train press (also a control of the panel; default 15).
        headless: True for scripts and nbval: Train blocks until the run ends, no live redraws.
        refresh: seconds between live-figure frames (coalesced; see ``Refresher``).
        checkpoint_path: where Checkpoint saves.
        values: initial control values (overrides ``DEFAULTS``).
        x: the live figure's x axis: ``"step"``, ``"examples"`` or ``"time"``.

    Example:
        >>> from nbbatch import data
        >>> p = TrainingPanel(data=data.mnist1d(num_samples=500), epochs=1, headless=True,
        ...                   values={"batch_size": 100})
        >>> p.train_button.click(); p.trainer.step_count
        4
    """

    def __init__(self, trainer=None, *, build: Callable[..., Any] | None = None, data=None,
                 epochs: float = DEFAULT_EPOCHS, headless: bool = False, refresh: float = 1.0,
                 checkpoint_path: str | os.PathLike = "nbbatch_checkpoint.pt", log_dir: str | os.PathLike | None = None,
                 values: Mapping[str, Any] | None = None, x: str = "step"):
        if trainer is not None and not hasattr(trainer, "fit"):
            raise TypeError(f"trainer must be an nbbatch Trainer or None, got {type(trainer).__name__}")
        if trainer is not None and build is not None:
            raise ValueError("give trainer= or build=, not both")
        if build is not None and not callable(build):
            raise TypeError("build must be a callable returning a Trainer")
        if log_dir is not None and (trainer is not None or build is not None):
            raise ValueError("log_dir is for the default builder: give a Trainer its own log_dir, or pass "
                             "log_dir to your build function's Trainer")
        if log_dir is not None and not isinstance(log_dir, (str, os.PathLike)):
            raise TypeError(f"log_dir must be a path or None, got {type(log_dir).__name__}")
        if isinstance(epochs, bool) or not isinstance(epochs, (int, float)) or not epochs > 0:
            raise ValueError(f"epochs must be a number > 0, got {epochs!r}")
        if not isinstance(headless, bool):
            raise TypeError(f"headless must be True or False, got {headless!r}")
        if not isinstance(refresh, (int, float)) or not refresh > 0:
            raise ValueError(f"refresh must be a number of seconds > 0, got {refresh!r}")
        if x not in ("step", "examples", "time"):
            raise ValueError(f"x={x!r} is not known; use 'step', 'examples' or 'time'")
        self.x = x
        vals = dict(DEFAULTS)
        if trainer is not None:
            c = trainer.config
            vals.update(batch_size=c.batch_size, lr=c.lr, optimizer=c.optimizer if isinstance(c.optimizer, str) else "sgd",
                        accumulate=c.accumulate, precision=c.precision,
                        warmup_steps=c.warmup_steps or 0)
        unknown = set(values or {}) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"values: unknown control(s) {sorted(unknown)}; known: {sorted(DEFAULTS)}")
        vals.update(values or {})
        self.build = build if build is not None else (None if trainer is not None else default_builder(data, log_dir=log_dir))
        # the training set's size, where the panel knows it: settings are checked against it as they change
        self._n_train = len(data.x_train) if hasattr(data, "x_train") else None
        self.headless = headless
        self.epochs = epochs
        self.checkpoint_path = os.fspath(checkpoint_path)
        self.errors: list[BaseException] = []    # every error shown by the panel, kept
        self.runs: list = []                      # earlier trainers (Reset / new settings), kept
        self.trainer = None
        self.controller: RunController | None = None
        self._built_values: dict | None = None
        self._seen_errors = 0
        self._seen_messages = 0
        self._sync_lock = threading.Lock()        # the refresh thread and widget callbacks both sync errors
        self._segment_start: tuple[float | None, int] = (None, 0)   # (wall time, steps done) of this Train
        self._make_widgets(vals, fixed=trainer is not None)
        self._figure: LiveFigure | None = None
        if not headless and trainer is None:
            # Empty axes at once: the panel shows what it will draw, and the first render (font
            # loading) is paid here rather than after the first Train.
            self._figure = LiveFigure([f"B={vals['batch_size']}"], x=x)
            self.image.value = self._figure.png([{"steps": {}, "evals": {}}])
            self.image.layout.display = None
        self._refresher = Refresher(self._draw, interval=refresh, tick=self._tick)
        if not headless:
            prefetch_optimizer_imports()
        self._structural_change()          # a starting combination the trainer would refuse is shown now
        if trainer is not None:
            self._adopt(trainer, self.values())

    # ------------------------------------------------------------------ widgets
    def _make_widgets(self, v: dict, fixed: bool) -> None:
        W = widgets
        style = {"description_width": "110px"}
        lay = W.Layout(width="320px")
        self.model_w = W.Dropdown(options=MODELS, value=v["model"], description="model", style=style, layout=lay)
        self.norm_w = W.Dropdown(options=NORMS, value=v["norm"], description="norm", style=style, layout=lay)
        sizes = sorted(set(BATCH_SIZES) | {v["batch_size"]})
        self.batch_size_w = W.SelectionSlider(options=sizes, value=v["batch_size"], description="batch size",
                                              style=style, layout=lay)
        lr = v["lr"]
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < math.inf:
            raise ValueError(f"values['lr'] must be a number > 0, got {lr!r}")
        # Exact lr: the text box holds the value trained with; the slider moves on a logarithmic
        # grid of round values (and the typed value, added to its stops), never snapping it.
        self.lr_w = W.FloatText(value=lr, description="learning rate", style=style,
                                layout=W.Layout(width="210px"))
        self.lr_w.add_class("nbbatch-lr-text")
        self.lr_slider = W.SelectionSlider(options=self._lr_options(lr), value=lr, readout=False,
                                           continuous_update=False, layout=W.Layout(width="110px"))
        self._lr_ok = lr
        self._syncing = False
        self.warmup_w = W.IntSlider(value=v["warmup_steps"], min=0, max=max(500, v["warmup_steps"]), step=10,
                                    description="warm-up steps", style=style, layout=lay)
        # the choices TrainConfig declares, so the panel offers nothing the trainer refuses
        self.optimizer_w = W.Dropdown(options=OPTIONS["optimizer"].choices, value=v["optimizer"], description="optimizer", style=style, layout=lay)
        self.accumulate_w = W.Dropdown(options=self._accumulate_options(v["batch_size"], v["accumulate"]),
                                       value=v["accumulate"], description="accumulate", style=style, layout=lay)
        self.precision_w = W.Dropdown(options=OPTIONS["precision"].choices, value=v["precision"], description="precision", style=style, layout=lay)
        self.controls = {"model": self.model_w, "norm": self.norm_w, "batch_size": self.batch_size_w, "lr": self.lr_w,
                         "warmup_steps": self.warmup_w, "optimizer": self.optimizer_w,
                         "accumulate": self.accumulate_w, "precision": self.precision_w}
        if fixed:
            for name in STRUCTURAL:
                self.controls[name].disabled = True
        self.train_button = W.Button(description="Train", button_style="success", icon="play")
        self.pause_button = W.Button(description="Pause", icon="pause")
        self.stop_button = W.Button(description="Stop", button_style="danger", icon="stop")
        self.checkpoint_button = W.Button(description="Checkpoint", icon="save")
        self.reset_button = W.Button(description="Reset", button_style="warning", icon="refresh")
        for b, cls in ((self.train_button, "train"), (self.pause_button, "pause"), (self.stop_button, "stop"),
                       (self.checkpoint_button, "checkpoint"), (self.reset_button, "reset")):
            b.layout = W.Layout(width="110px")
            b.add_class(f"nbbatch-{cls}")
        self.lr_slider.add_class("nbbatch-lr")
        self.epochs_w = W.BoundedFloatText(value=self.epochs, min=0.01, max=100_000, description="epochs / Train",
                                           style=style, layout=lay)
        self.epochs_w.add_class("nbbatch-epochs")
        self.epochs_w.observe(lambda ch: setattr(self, "epochs", ch["new"]), names="value")
        self.train_button.on_click(lambda _: self.train())
        self.pause_button.on_click(lambda _: self.toggle_pause())
        self.stop_button.on_click(lambda _: self.stop())
        self.checkpoint_button.on_click(lambda _: self.checkpoint())
        self.reset_button.on_click(lambda _: self.reset())
        self.lr_w.observe(self._lr_typed, names="value")
        self.lr_slider.observe(self._lr_slid, names="value")
        self.warmup_w.observe(lambda ch: self._live_change(**_warmup_options(ch["new"])), names="value")
        self.batch_size_w.observe(self._batch_size_changed, names="value")   # first: it may clamp accumulate
        for name in STRUCTURAL:
            self.controls[name].observe(lambda ch: self._structural_change(), names="value")
        self.progress = W.IntProgress(value=0, min=0, max=1, description="progress", style=style,
                                      layout=W.Layout(width="420px"))
        self.progress_text = W.HTML(value="")
        self.progress_text.add_class("nbbatch-progress")
        self.status = W.HTML(value="idle")
        self.status.add_class("nbbatch-status")
        self.message = W.HTML(value="")
        self.message.add_class("nbbatch-message")
        # shown at the PNG's own size (1000 px) where there is room, scaled down where not
        # no margin: with the widgets' default 2 px a 100%-wide image overflows a narrow notebook;
        # hidden until the first frame (an empty Image shows a broken-image icon)
        self.image = W.Image(format="png", layout=W.Layout(width="100%", max_width="1000px", margin="0",
                                                           display="none"))
        self.image.add_class("nbbatch-figure")
        lr_row = W.HBox([self.lr_w, self.lr_slider], layout=W.Layout(width="330px"))
        left = W.VBox([self.model_w, self.norm_w, self.batch_size_w, lr_row])
        right = W.VBox([self.warmup_w, self.optimizer_w, self.accumulate_w, self.precision_w, self.epochs_w])
        buttons = W.HBox([self.train_button, self.pause_button, self.stop_button, self.checkpoint_button,
                          self.reset_button])
        controls = W.HBox([left, right], layout=W.Layout(flex_flow="row wrap"))
        self.widget = W.VBox([controls, buttons, W.HBox([self.progress, self.progress_text]), self.status,
                              self.message, self.image], layout=W.Layout(max_width="1000px"))
        self.widget.add_class("nbbatch-panel")

    def _repr_mimebundle_(self, **kwargs):
        # the widget for a live kernel; for a notebook read without one, a line that says what to do
        data = self.widget._repr_mimebundle_(**kwargs)
        data["text/plain"] = TEXT_REPR
        return data

    def __repr__(self) -> str:
        return TEXT_REPR

    # ------------------------------------------------------------------ the learning rate
    @staticmethod
    def _lr_options(lr: float) -> list:
        return [(f"{v:g}", v) for v in sorted(set(LR_GRID) | {lr})]

    @staticmethod
    def _accumulate_options(batch_size: int, current: int | None = None) -> list:
        # accumulate splits the batch into micro-batches: more micro-batches than examples is refused
        return sorted({a for a in ACCUMULATE if a <= batch_size} | ({current} if current else set()))

    def _lr_typed(self, change) -> None:
        if self._syncing:
            return
        lr = change["new"]
        if not (isinstance(lr, (int, float)) and 0 < lr < math.inf):
            self._record_error(ValueError(f"learning rate must be a number > 0, got {lr!r}"),
                               "setting rejected, the learning rate stays " + f"{self._lr_ok:g}")
            self._syncing = True
            try:
                self.lr_w.value = self._lr_ok
            finally:
                self._syncing = False
            return
        self._lr_ok = lr
        self._syncing = True
        try:
            if lr not in self.lr_slider.options and all(lr != v for _, v in self.lr_slider.options):
                self.lr_slider.options = self._lr_options(lr)
            self.lr_slider.value = lr
        finally:
            self._syncing = False
        self._live_change(lr=lr)

    def _lr_slid(self, change) -> None:
        if self._syncing:
            return
        self.lr_w.value = change["new"]      # the text box is the source of truth: it applies the change

    def values(self) -> dict:
        """The controls' current values (the keys of ``DEFAULTS``)."""
        return {name: w.value for name, w in self.controls.items()}

    # ------------------------------------------------------------------ messages and status
    def _show(self, text: str, error: bool = False) -> None:
        color = "#b00020" if error else "#555"
        self.message.value = f'<span style="color:{color}">{html.escape(text)}</span>'

    def _record_error(self, err: BaseException, context: str) -> None:
        self.errors.append(err)
        self._show(f"{context}: {type(err).__name__}: {err}", error=True)

    @property
    def error(self) -> BaseException | None:
        """The latest error: a rejected setting, or an exception raised in the training thread."""
        return self.errors[-1] if self.errors else None

    def _sync_controller_errors(self) -> None:
        c = self.controller
        if c is None:
            return
        with self._sync_lock:   # each error recorded once, whichever thread sees it first
            for e in c.errors[self._seen_errors:]:
                self._record_error(e.error, "training stopped with an error")
                self._seen_errors += 1
            for e in c.rejected[self._seen_messages:]:
                self._record_error(e.error, "refused, the old setting stays")
                self._seen_messages += 1

    def _update_status(self) -> None:
        t = self.trainer
        if t is None:
            self.status.value = "no run yet: press Train"
            return
        st = t.history.steps
        n = len(st)
        rate = ""
        if n:
            recent = [x for x in st["examples_per_s"][-20:] if x is not None]
            if recent:
                rate = f"{sorted(recent)[len(recent) // 2]:,.0f}"
        peaks = [m for m in st["peak_memory"][-50:] if m is not None] if n else []
        mem = (f"peak {max(peaks) / 2**20:.0f} MiB on device" if peaks
               else f"process peak RSS {process_peak_rss_bytes() / 2**20:.0f} MiB")
        state = self.controller.state if self.controller is not None else "idle"
        metric = _metric_text(t.history.evals.last())
        metric = f" | {metric}" if metric else ""
        self.status.value = (f"<b>{state}</b> | {html.escape(describe_device(t.device))} | "
                             f"step <b class='nbbatch-step'>{t.step_count}</b> | epoch {t.epoch} | "
                             f"lr {t.lr:.4g} | {rate or '-'} examples/s | {mem}{metric}")
        c = self.controller
        if c is not None and c.ends[0] is not None and c.starts[0] is not None:
            total = max(c.ends[0] - c.starts[0], 1)
            done = min(max(t.step_count - c.starts[0], 0), total)
            self.progress.max = total
            self.progress.value = done
            self.progress_text.value = self.progress_line(done, total, c.running)

    def progress_line(self, done: int, total: int, running: bool) -> str:
        """``'step 340 / 1,875 (18%) | about 12 s left'`` from the steps and seconds of this segment."""
        line = f"step {done:,} / {total:,} ({100 * done / total:.0f}%)"
        t0, s0 = self._segment_start
        elapsed = time.perf_counter() - t0 if t0 is not None else 0.0
        steps = done - s0
        if running and steps > 0 and elapsed > 0:
            line += f" | about {_duration((total - done) * elapsed / steps)} left"
        elif done >= total:
            line += " | done"
        return html.escape(line)

    def _tick(self) -> None:
        self._update_status()
        self._sync_controller_errors()

    def _draw(self) -> None:
        if self.trainer is None:
            return
        self.image.value = self._figure.png([snapshot(self.trainer.history)])
        self._tick()

    def figure(self):
        """The current figure (a matplotlib Figure, static: display it to keep it in the notebook)."""
        if self.trainer is None:
            raise RuntimeError("no run yet: press Train first")
        fig = LiveFigure([f"B={self.trainer.config.batch_size}"], x=self.x, live=False)
        fig.update([self.trainer.history])
        return fig.figure

    # ------------------------------------------------------------------ run management
    def _adopt(self, trainer, values: dict) -> None:
        if self.controller is not None:
            self.controller.close()
        if self.trainer is not None:
            self.runs.append(self.trainer)
        self.trainer = trainer
        self._built_values = {k: values[k] for k in STRUCTURAL}
        self.controller = RunController(trainer, labels=[f"B={trainer.config.batch_size}"])
        self.controller.on_change(self._on_run_change)
        self._seen_errors = self._seen_messages = 0
        # Build the figure and draw it empty now, outside any run: the panel shows its axes at
        # once, and the first frame's cost sets the redraw throttle before training starts.
        self._figure = LiveFigure([f"B={trainer.config.batch_size}"], x=self.x)
        t0 = time.perf_counter()
        self.image.value = self._figure.png([snapshot(trainer.history)])
        self.image.layout.display = None
        self._refresher.cost = time.perf_counter() - t0
        self._update_status()

    def _build(self) -> bool:
        """A new trainer from the controls; on error show it and keep the current run."""
        if self.build is None:
            self._show("this panel drives a given Trainer: its structural settings are fixed", error=True)
            return False
        values = self.values()
        try:
            trainer = self.build(**values)
            if not (hasattr(trainer, "fit") and hasattr(trainer, "config")):   # checked before the run is replaced
                raise TypeError(f"build must return an nbbatch Trainer, got {type(trainer).__name__}")
        except Exception as err:
            self._record_error(err, "settings rejected, the current run is kept")
            return False
        self._adopt(trainer, values)
        return True

    def check_settings(self) -> str | None:
        """The reason the trainer would refuse the controls' values, or None when they are valid."""
        v = self.values()
        try:
            TrainConfig(batch_size=v["batch_size"], lr=v["lr"], optimizer=v["optimizer"], accumulate=v["accumulate"],
                        precision=v["precision"], **_warmup_options(v["warmup_steps"]))
        except (ValueError, TypeError) as err:
            return str(err)
        n = self._n_train
        if n is not None and v["batch_size"] > n:
            return f"batch_size={v['batch_size']} is larger than the training set ({n} examples)"
        return None

    def _batch_size_changed(self, change) -> None:
        b = change["new"]
        self._clamp_note = ""
        acc = self.accumulate_w.value
        options = self._accumulate_options(b)
        if acc > b:   # the old value would be refused: take the largest that is not, and say so
            self.accumulate_w.options = options
            self._clamp_note = (f"accumulate set to {options[-1]}: batch size {b} cannot be split into more "
                                f"micro-batches than examples")
            self.accumulate_w.value = options[-1]
        else:
            self.accumulate_w.options = options
            self.accumulate_w.value = acc

    def _structural_change(self) -> None:
        problem = self.check_settings()
        shown, self._settings_problem = getattr(self, "_settings_problem", False), problem is not None
        note = getattr(self, "_clamp_note", "")
        if problem is not None:
            self._show(f"these settings would be refused: {problem}", error=True)
        elif self._built_values is not None and {k: self.controls[k].value for k in STRUCTURAL} != self._built_values:
            self._show((note + "; " if note else "") + "new settings: the next Train (or Reset) starts a new run")
        elif note or shown:
            self._show(note or "settings valid again")

    def _live_change(self, **changes) -> None:
        if self.controller is None:
            return
        try:
            self.controller.reschedule(**changes)
        except (ValueError, TypeError) as err:
            self._record_error(err, "setting rejected, the schedule is kept")
            return
        self._sync_controller_errors()
        if not self.controller.running:
            self._update_status()

    def _on_run_change(self) -> None:
        # from the training thread when a run starts or ends: the last frame is drawn here
        if self.controller is not None and not self.controller.active and not self.headless:
            self._refresher.final()

    # ------------------------------------------------------------------ buttons
    def train(self) -> None:
        """Train (``epochs`` more, or continue a stopped segment); a new run if settings changed."""
        if self.controller is not None and self.controller.running:
            if self.controller.paused:
                self.resume()
            else:
                self._show("already training")
            return
        if self.controller is not None:
            self.controller.wait()   # the last run's thread may still be drawing its final frame
        if self.trainer is None or (self.build is not None and
                                    {k: self.controls[k].value for k in STRUCTURAL} != self._built_values):
            if not self._build():
                return
        cfg = self.trainer.config
        changes = {}   # only what the sliders change: a given Trainer's warm-up (by epochs, constant) stays
        if self.lr_w.value != cfg.lr:
            changes["lr"] = self.lr_w.value
        if self.warmup_w.value != ((cfg.warmup_steps or 0) if cfg.warmup != "none" else 0):
            changes.update(_warmup_options(self.warmup_w.value))
        try:
            if changes:
                self.controller.reschedule(**changes)
        except (ValueError, TypeError) as err:
            self._record_error(err, "setting rejected")
            return
        self._sync_controller_errors()
        c = self.controller
        resuming = c.resumable
        prior = max(self.trainer.step_count - (c.starts[0] or 0), 0) if resuming else 0
        self._segment_start = (time.perf_counter(), prior)
        try:
            c.start_live(self._refresher, live=not self.headless, epochs=self.epochs)
        except (ValueError, RuntimeError) as err:
            self._record_error(err, "cannot start")
            return
        self._figure.set_x_end(c.ends, [self.trainer.config.batch_size])
        self.pause_button.description = "Pause"
        self._show("")
        if self.headless:
            c.wait()
            self._draw()
        else:
            self._update_status()

    def toggle_pause(self) -> None:
        """Pause after the current step, or resume."""
        c = self.controller
        if c is None or not c.running:
            self._show("not training")
            return
        if c.paused:
            self.resume()
        else:
            c.pause()
            self.pause_button.description = "Resume"
            self._update_status()

    def resume(self) -> None:
        if self.controller is not None:
            self.controller.resume()
        self.pause_button.description = "Pause"

    def stop(self) -> None:
        """Stop after the current step (the run stays resumable: Train continues it)."""
        if self.controller is not None:
            self.controller.stop()
        self.pause_button.description = "Pause"

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the training thread halts (for scripts and tests)."""
        done = self.controller.wait(timeout) if self.controller is not None else True
        if done:
            self._sync_controller_errors()
            self._update_status()
        return done

    def checkpoint(self) -> None:
        """Save the current run to ``checkpoint_path`` (between steps when training)."""
        if self.controller is None:
            self._show("no run to save yet")
            return
        try:
            self.controller.checkpoint(self.checkpoint_path)
        except OSError as err:
            self._record_error(err, "checkpoint failed")
            return
        self._show(f"checkpoint {'queued' if self.controller.running else 'saved'}: {os.path.basename(self.checkpoint_path)}")

    def reset(self) -> None:
        """Stop, keep the current run in ``runs``, and start a fresh one from the controls."""
        self.stop()   # also releases a pause (and its button)
        if self.controller is not None:
            self.controller.wait()
        if self.build is None:
            self._show("this panel drives a given Trainer: Reset needs build=...", error=True)
            return
        if self._build():
            self.progress.value = 0
            self._show("new run ready: press Train")

    def close(self) -> None:
        """Stop training and the live figure, and close the widgets."""
        if self.controller is not None:
            self.controller.close()
        self._refresher.stop()
        self.widget.close()

    def summary(self) -> dict:
        """Rounded, stable numbers of the current run (for printing in notebooks)."""
        t = self.trainer
        if t is None:
            return {}
        out = {"batch_size": t.config.batch_size, "steps": t.step_count, "examples": t.examples_seen,
               "lr": round(t.lr, 6)}
        ev = t.history.evals.last()
        if ev:
            out.update({k: round(v, 3) for k, v in sorted(ev.items()) if k.startswith("eval_") and isinstance(v, float)})
        return out
