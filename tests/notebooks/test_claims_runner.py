"""bench/claims.py: the assert rewriting, the seed injection and the report (no kernel started)."""
import importlib.util
from pathlib import Path

import nbformat
import pytest

_PATH = Path(__file__).resolve().parents[2] / "bench" / "claims.py"
_spec = importlib.util.spec_from_file_location("claims_runner", _PATH)
claims = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(claims)


def _run(source: str, cell: int = 3, **names) -> dict:
    """Execute the recorder and the rewritten ``source``; return the recorded claims."""
    scope = dict(names)
    exec(claims.RECORDER, scope)
    exec(claims.rewrite_asserts(source, cell), scope)
    return scope["_CLAIMS"]


def test_chained_comparison_is_two_claims_with_signed_margins():
    rec = _run("assert -1.1 < slope < -0.9", slope=-1.0)
    lower, upper = rec["3:1:0"], rec["3:1:1"]
    # "t < x" is recorded as "x > t": the value is the measured quantity, the threshold the literal
    assert lower["text"] == "slope > -1.1" and lower["value"] == -1.0 and lower["threshold"] == -1.1
    assert lower["margin"] == pytest.approx(0.1) and upper["margin"] == pytest.approx(0.1)
    assert lower["ok"] and upper["ok"]


def test_failed_claim_is_recorded_and_execution_goes_on():
    rec = _run("assert x > 1, 'too small'\nafter = True\nassert after", x=0.25)
    first = rec["3:1:0"]
    assert not first["ok"] and first["margin"] == pytest.approx(-0.75)
    assert rec["3:3:0"]["ok"]                     # the statement after the failed assert ran


def test_and_is_split_and_non_comparisons_are_pass_fail():
    rec = _run("assert a < 2 and flags.all()", a=1.5, flags=type("F", (), {"all": lambda self: False})())
    assert rec["3:1:0"]["ok"] and rec["3:1:0"]["margin"] == pytest.approx(0.5)
    assert not rec["3:1:1"]["ok"] and rec["3:1:1"]["margin"] is None


def test_assert_in_a_loop_keeps_the_worst_iteration():
    rec = _run("for v in values:\n    assert v < 1.0", values=[0.2, 0.9, 0.5])
    worst = rec["3:2:0"]
    assert worst["count"] == 3 and worst["value"] == 0.9 and worst["margin"] == pytest.approx(0.1)
    rec = _run("for v in values:\n    assert v < 1.0", values=[0.2, 1.5, 0.5])
    assert not rec["3:2:0"]["ok"] and rec["3:2:0"]["value"] == 1.5


def test_an_error_inside_a_claim_is_a_failure_not_a_crash():
    rec = _run("assert undefined_name > 3")
    assert not rec["3:1:0"]["ok"] and "NameError" in rec["3:1:0"]["error"]


def test_cells_with_magics_or_without_asserts_are_left_alone():
    assert claims.rewrite_asserts("%matplotlib inline\nassert x", 1) == "%matplotlib inline\nassert x"
    assert claims.rewrite_asserts("y = 1", 1) == "y = 1"


def _notebook(tagged: bool):
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("SEED = 0")
    if tagged:
        params.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell("# t"), params, nbformat.v4.new_code_cell("assert SEED >= 0")]
    return nb


def test_prepare_injects_the_seed_after_the_parameters_cell():
    nb = claims.prepare(_notebook(tagged=True), seed=7)
    sources = [c.source for c in nb.cells]
    assert sources[1] == claims.RECORDER                       # before the first code cell
    assert sources[2] == "SEED = 0" and sources[3] == "SEED = 7"
    assert sources[4].startswith("_claims_cmp(") and "_CLAIMS" in sources[-1]


def test_prepare_without_a_parameters_cell_raises():
    with pytest.raises(ValueError, match="parameters"):
        claims.prepare(_notebook(tagged=False), seed=1)


def test_report_counts_passes_and_spreads_margins():
    rows = [{"notebook": "n.ipynb", "seed": s, "setting": "default", "seconds": 1.0, "errors": [],
             "claims": {"3:1:0": {"text": "x > 1", "ok": s != 2, "value": 1.0 + 0.5 * (1 - s),
                                  "threshold": 1.0, "margin": 0.5 * (1 - s), "error": None, "count": 1}}}
            for s in range(3)]
    table = claims.report(rows)
    line = next(l for l in table.splitlines() if "x > 1" in l)
    assert "| 2/3 |" in line and "-0.5 (0)" in line
