"""The live figure's frame machinery: limits that change rarely, kept pixels, the PNG encoder,
the smoothing without scipy, and the refresh schedule."""

import io
import time

import numpy as np
import pytest

pytest.importorskip("ipywidgets")

from PIL import Image  # noqa: E402

from nbbatch.history import History  # noqa: E402
from nbbatch.ui import LiveFigure, Refresher  # noqa: E402
from nbbatch.ui.plots import png_rgb, smooth, x_limits  # noqa: E402


def _history(n, seed=0):
    rng = np.random.default_rng(seed)
    h = History()
    for s in range(1, n + 1):
        h.steps.append({"step": s, "epoch": s / 100, "examples": 32 * s, "time": 0.01 * s,
                        "loss": 2.3 * s ** -0.3 * float(rng.uniform(0.6, 1.4)), "lr": 0.05,
                        "examples_per_s": 3000.0 + float(rng.normal(0, 50))})
        if s % 100 == 0:
            h.evals.append({"step": s, "epoch": s / 100, "examples": 32 * s, "time": 0.01 * s,
                            "eval_loss": 2.3 * s ** -0.25, "eval_accuracy": 1 - s ** -0.2})
    return h


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=int)


def test_png_rgb_decodes_to_the_buffer():
    rng = np.random.default_rng(1)
    rgba = rng.integers(0, 256, size=(7, 5, 4), dtype=np.uint8)
    img = Image.open(io.BytesIO(png_rgb(rgba.tobytes(), 5, 7)))
    assert img.mode == "RGB" and img.size == (5, 7)
    np.testing.assert_array_equal(np.asarray(img), rgba[:, :, :3])


def test_smooth_is_the_bias_corrected_ema():
    rng = np.random.default_rng(2)
    for n, span in ((1, 5), (40, 5), (3000, 60), (20_000, 400)):
        y = rng.random(n) + np.linspace(3, 1, n)
        alpha = 2 / (span + 1)
        ref, num, den = np.empty(n), 0.0, 0.0        # the recursion, written out
        for t in range(n):
            num = (1 - alpha) * num + alpha * y[t]
            den = (1 - alpha) * den + alpha
            ref[t] = num / den
        np.testing.assert_allclose(smooth(y, span), ref, rtol=1e-9)
    assert smooth(np.array([4.0, 8.0]), 1).tolist() == [4.0, 8.0]     # span 1: alpha 1, no smoothing
    assert len(smooth(np.array([]), 5)) == 0


def test_x_limits_grow_by_quarters_of_the_planned_end():
    assert x_limits(0, 30, 1000) == (0.0, 62.5)
    assert x_limits(0, 62.5, 1000) == (0.0, 62.5)        # the data at the edge: still shown
    assert x_limits(0, 63, 1000) == (0.0, 250.0)
    assert x_limits(0, 251, 1000) == (0.0, 1000.0)
    assert x_limits(0, 1200, 1000) == (0.0, 2500.0)       # past the end (more epochs): round, with room
    assert x_limits(0, 30, 1000, whole=True) == (0.0, 1000.0)   # a run of seconds: its whole range at once
    assert x_limits(0, 3.2, None)[0] == 0.0 and 6.4 <= x_limits(0, 3.2, None)[1] <= 8.0
    # over a run the right limit changes about log4(end / first) times
    seen = {x_limits(0, x, 10_000)[1] for x in np.linspace(10, 10_000, 500)}
    assert seen == {10_000 / 4 ** k for k in range(5)}


def test_a_run_renders_the_axes_a_few_times_and_frames_show_its_data():
    h = _history(6000)
    fig = LiveFigure(["B=32"])
    fig.x_end = 6000
    frames = []
    for n in range(200, 6001, 200):                       # 30 frames as the run goes
        part = {"steps": {k: v[:n] for k, v in _snap(h)["steps"].items()},
                "evals": {k: v[: n // 100] for k, v in _snap(h)["evals"].items()}}
        frames.append(fig.png([part]))
    assert fig.renders == 30 and fig.full_draws <= 8       # before: nearly every early frame
    # the last frame equals a static figure with the same limits (legend, titles and lines in place)
    static = LiveFigure(["B=32"], live=False)
    static.update([h])
    for name, ax in static.axes.items():
        ax.set_autoscale_on(False)
        ax.set_xlim(fig.axes[name].get_xlim())
        ax.set_ylim(fig.axes[name].get_ylim())
    a, b = _pixels(frames[-1]), _pixels(static.png())
    assert a.shape == b.shape == (560, 1000, 3)
    assert np.mean(np.abs(a - b).max(axis=2) > 8) < 0.002
    # a frame differs from the one before (the lines moved), and the legend box stays the same
    assert np.any(_pixels(frames[-2]) != a)


def _snap(h):
    from nbbatch.ui.plots import snapshot
    return snapshot(h)


def test_a_short_run_shows_its_whole_x_range_from_the_first_frame():
    h = _history(300)                                      # 3 s of training for 300 steps
    fig = LiveFigure(["a"])
    fig.x_end = 3000                                       # 30 s at this pace: the axis grows
    fig.png([h])
    assert fig.axes["loss"].get_xlim() == (0.0, 3000 / 4)
    fig = LiveFigure(["a"])
    fig.x_end = 1200                                       # 12 s: the whole run at once
    fig.png([h])
    assert fig.axes["loss"].get_xlim() == (0.0, 1200.0)


def test_kept_titles_are_redrawn_when_a_title_changes():
    fig = LiveFigure(["B=32"])
    h = _history(500)
    fig.png([h])
    fig._key = None
    fig.png([h])
    assert fig._titles is not None
    first = fig._fixed_pixels
    fig._key = None
    fig.png([h])
    assert fig._fixed_pixels is first                     # same titles: pixels reused
    fig.axes["examples/s"].set_title("examples/s  (peak memory 12 MiB)", fontsize=10)
    fig._key = None
    fig.png()
    assert fig._fixed_pixels is not first                 # a new title: laid out again


def test_loss_axis_grows_at_most_a_decade_below_new_data():
    fig = LiveFigure(["a"])
    h = _history(1000)
    fig.png([h])
    lo, hi = fig.axes["loss"].get_ylim()
    low = lo / 2                                          # one batch below the axis
    h.steps.append({"step": 1001, "epoch": 10.01, "examples": 32032, "time": 10.01, "loss": low, "lr": 0.05,
                    "examples_per_s": 3000.0})
    fig.png([h])
    lo2, hi2 = fig.axes["loss"].get_ylim()
    # twice the former span would put the bottom 1.7 decades below the new data (rounded: 0.001);
    # it is at most a decade (and a margin, and a rounding step) below them, and never above them
    assert low / 10 ** 1.5 <= lo2 <= low and hi2 >= hi


# ---------------------------------------------------------------------------
# the refresh schedule
# ---------------------------------------------------------------------------


def test_refresher_gap_follows_the_frame_cost_within_its_bounds():
    r = Refresher(lambda: None, interval=1.0, budget=0.08, max_gap=1.8)
    for cost, gap in ((0.01, 1.0), (0.08, 1.0), (0.12, 1.5), (0.5, 1.8)):
        r.cost = cost
        assert r.gap() == pytest.approx(gap)
    assert Refresher(lambda: None).budget == 0.08
    with pytest.raises(ValueError, match="budget"):
        Refresher(lambda: None, budget=0)


def test_refresher_draws_first_frame_soon_then_at_the_gap():
    stamps = []

    def draw():
        stamps.append(time.perf_counter())
        time.sleep(0.02)                                  # a frame of 20 ms: gap = max(0.15, 0.02 / 0.1)
    r = Refresher(draw, interval=0.15, budget=0.1, first=0.05, max_gap=0.5)
    t0 = time.perf_counter()
    r.start()
    time.sleep(0.9)
    r.final()
    assert r.final_frames == 1 and r.errors == []
    during = [s - t0 for s in stamps[:-1]]
    assert 0.04 <= during[0] < 0.5                        # the first frame soon after start
    gaps = np.diff(during)
    assert len(gaps) >= 2 and np.all(gaps > 0.1) and np.all(gaps < 0.8)


def test_the_panel_prefetches_the_optimizers_import_once_in_the_background():
    """torch._dynamo (imported by the first torch optimizer, about a second) is loaded while the panel is read."""
    import subprocess
    import sys
    code = ("import sys, threading\n"
            "from nbbatch.ui import panel\n"
            "assert 'torch._dynamo' not in sys.modules\n"
            "t = panel.prefetch_optimizer_imports()\n"
            "assert isinstance(t, threading.Thread) and t.daemon and panel.prefetch_optimizer_imports() is t\n"
            "t.join(60)\n"
            "print('torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"
