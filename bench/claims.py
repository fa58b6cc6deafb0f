"""Re-run the notebook series over seeds and kernel settings; report every asserted claim.

Each notebook has one cell tagged ``parameters`` that sets ``SEED``; all of its randomness derives
from it. For every (notebook, seed, kernel setting) this script executes the notebook with
nbclient, with a cell ``SEED = <seed>`` inserted after the parameters cell, in a kernel started
with the setting's environment variables:

* ``default``: the CPU's own kernels;
* ``emulated``: ATen, MKL and oneDNN limited to older instruction sets, which changes the last
  bits of floating-point results the way another CPU does.

Before execution the ``assert`` statements of the notebook are rewritten (in the executed copy
only) so that each comparison records its operands and does not stop the notebook: a chained
comparison ``a < b < c`` becomes two claims, ``assert p and q`` two claims, anything else one
pass/fail claim. The margin of ``x > t`` is ``x - t``, of ``x < t`` it is ``t - x`` (positive:
holds). An assert inside a loop is one claim whose margin is the worst over the iterations.

Usage::

    python bench/claims.py run notebooks/01_minibatch_sgd.ipynb --seeds 0 1 2 3 4 --out bench/claims.jsonl
    python bench/claims.py report bench/claims.jsonl            # markdown table per claim

``run`` appends one JSON line per execution to ``--out``; ``report`` aggregates them.
Run it with one thread (``OMP_NUM_THREADS=1``); a notebook takes up to 90 s per execution.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]

SETTINGS = {
    "default": {},
    "emulated": {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
                 "ONEDNN_MAX_CPU_ISA": "SSE41"},
}

# Defined in the kernel before the first cell. Records (cell, line, part) -> outcome; never raises.
RECORDER = r'''
import json as _claims_json, math as _claims_math
_CLAIMS = {}
def _claims_float(v):
    try:
        f = float(v)
        return f if _claims_math.isfinite(f) else None
    except Exception:
        return None
def _claims_put(key, text, ok, value=None, threshold=None, margin=None, error=None):
    old = _CLAIMS.get(key)
    rec = {"text": text, "ok": bool(ok), "value": value, "threshold": threshold, "margin": margin,
           "error": error, "count": 1}
    if old is not None:
        rec["count"] = old["count"] + 1
        if old["ok"] and not ok:
            pass
        elif not old["ok"] and ok:
            rec.update({k: old[k] for k in ("ok", "value", "threshold", "margin", "error")})
        elif old["margin"] is not None and (margin is None or old["margin"] < margin):
            rec.update({k: old[k] for k in ("ok", "value", "threshold", "margin", "error")})
    _CLAIMS[key] = rec
def _claims_cmp(key, text, left, op, right):
    try:
        a, b = left(), right()
        ok = {"<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b, "==": a == b, "!=": a != b}[op]
        ok = bool(ok.all()) if hasattr(ok, "all") else bool(ok)
        fa, fb = _claims_float(a), _claims_float(b)
        margin = None
        if fa is not None and fb is not None and op in ("<", "<=", ">", ">="):
            margin = fa - fb if op in (">", ">=") else fb - fa
        _claims_put(key, text, ok, fa, fb, margin)
    except Exception as err:
        _claims_put(key, text, False, error=repr(err)[:200])
def _claims_bool(key, text, test):
    try:
        _claims_put(key, text, bool(test()))
    except Exception as err:
        _claims_put(key, text, False, error=repr(err)[:200])
'''

_OPS = {ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!="}
_FLIP = {ast.Lt: ast.Gt, ast.LtE: ast.GtE, ast.Gt: ast.Lt, ast.GtE: ast.LtE}


def _is_constant(node: ast.expr) -> bool:
    """A literal number (the threshold of a comparison), possibly negated or a simple expression of them."""
    return all(isinstance(n, (ast.Constant, ast.UnaryOp, ast.BinOp, ast.operator, ast.unaryop))
               for n in ast.walk(node))


class _Rewrite(ast.NodeTransformer):
    """Turn each ``assert`` into calls of the recorder, one per comparison."""

    def __init__(self, cell: int):
        self.cell = cell

    def _lambda(self, expr: ast.expr) -> ast.Lambda:
        return ast.Lambda(args=ast.arguments(posonlyargs=[], args=[], kwonlyargs=[], kw_defaults=[], defaults=[]),
                          body=expr)

    def _calls(self, test: ast.expr, line: int, parts: list) -> None:
        if isinstance(test, ast.BoolOp) and isinstance(test.op, ast.And):
            for value in test.values:
                self._calls(value, line, parts)
            return
        if isinstance(test, ast.Compare) and all(type(op) in _OPS for op in test.ops):
            operands = [test.left, *test.comparators]
            for i, op in enumerate(test.ops):
                left, right, op = operands[i], operands[i + 1], type(op)
                if _is_constant(left) and not _is_constant(right) and op in _FLIP:
                    left, right, op = right, left, _FLIP[op]     # "t < x" is recorded as "x > t"
                text = f"{ast.unparse(left)} {_OPS[op]} {ast.unparse(right)}"
                key = f"{self.cell}:{line}:{len(parts)}"
                parts.append(ast.Expr(ast.Call(ast.Name("_claims_cmp", ast.Load()),
                                               [ast.Constant(key), ast.Constant(text), self._lambda(left),
                                                ast.Constant(_OPS[op]), self._lambda(right)], [])))
            return
        key = f"{self.cell}:{line}:{len(parts)}"
        parts.append(ast.Expr(ast.Call(ast.Name("_claims_bool", ast.Load()),
                                       [ast.Constant(key), ast.Constant(ast.unparse(test)), self._lambda(test)], [])))

    def visit_Assert(self, node: ast.Assert):
        parts: list = []
        self._calls(node.test, node.lineno, parts)
        return parts


def rewrite_asserts(source: str, cell: int) -> str:
    """The cell's source with its asserts turned into recorder calls (IPython magics left alone)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:                  # a cell with IPython magics: its asserts are left as they are
        return source
    if not any(isinstance(n, ast.Assert) for n in ast.walk(tree)):
        return source
    tree = ast.fix_missing_locations(_Rewrite(cell).visit(tree))
    return ast.unparse(tree)


def prepare(nb, seed: int):
    """A copy of ``nb`` with the recorder, ``SEED = seed`` after the parameters cell, asserts rewritten."""
    nb = nbformat.from_dict(json.loads(json.dumps(nb)))
    cells = []
    injected = False
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            cell.source = rewrite_asserts(cell.source, i)
        cells.append(cell)
        if "parameters" in cell.metadata.get("tags", []):
            cells.append(nbformat.v4.new_code_cell(f"SEED = {seed}"))
            injected = True
    if not injected:
        raise ValueError("the notebook has no cell tagged 'parameters'; add one that sets SEED")
    first_code = next(i for i, c in enumerate(cells) if c.cell_type == "code")
    cells.insert(first_code, nbformat.v4.new_code_cell(RECORDER))
    cells.append(nbformat.v4.new_code_cell("print(_claims_json.dumps(_CLAIMS))"))
    nb.cells = cells
    return nb


def run_one(path: Path, seed: int, setting: str, timeout: int = 900) -> dict:
    nb = prepare(nbformat.read(path, as_version=4), seed)
    saved = dict(os.environ)
    os.environ.update(SETTINGS[setting])
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), saved.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.pop("MPLBACKEND", None)
    start = time.perf_counter()
    try:
        client = NotebookClient(nb, timeout=timeout, kernel_name="python3", allow_errors=True,
                                resources={"metadata": {"path": str(path.parent)}})
        client.execute()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    seconds = time.perf_counter() - start
    errors, claims = [], {}
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            if out.output_type == "error":
                errors.append(f"cell {i}: {out.ename}: {out.evalue}"[:300])
    for out in nb.cells[-1].get("outputs", []):
        if out.output_type == "stream" and out.name == "stdout":
            # the claims are one JSON line; anything else a background thread printed is kept as an error
            for line in out.text.splitlines():
                if line.startswith("{"):
                    claims = json.loads(line)
                elif line.strip():
                    errors.append(f"last cell printed: {line}"[:300])
    return {"notebook": path.name, "seed": seed, "setting": setting, "seconds": round(seconds, 1),
            "errors": errors, "claims": claims}


def report(rows: list[dict]) -> str:
    """A markdown table: per claim, pass rate over runs and value/margin spread."""
    by_claim: dict = {}
    runs: dict = {}
    for row in rows:
        runs.setdefault(row["notebook"], []).append(row)
        for key, c in row["claims"].items():
            by_claim.setdefault((row["notebook"], key), []).append((row, c))
    out = []
    for nb in sorted(runs):
        nb_runs = runs[nb]
        settings = sorted({r["setting"] for r in nb_runs})
        seeds = sorted({r["seed"] for r in nb_runs})
        secs = [r["seconds"] for r in nb_runs]
        errs = sum(bool(r["errors"]) for r in nb_runs)
        out.append(f"\n**{nb}**: {len(nb_runs)} runs (seeds {seeds[0]}..{seeds[-1]}, {len(seeds)} seeds; "
                   f"settings {', '.join(settings)}); {min(secs):.0f}-{max(secs):.0f} s per run; "
                   f"runs with a cell error: {errs}\n")
        out.append("| claim (cell:line) | pass | value mean [min, max] | threshold | margin min (mean) |")
        out.append("|---|---:|---|---|---|")
        keys = sorted((k for (n, k) in by_claim if n == nb),
                      key=lambda k: tuple(int(x) for x in k.split(":")))
        for key in keys:
            recs = by_claim[nb, key]
            text = recs[0][1]["text"].replace("|", "\\|")
            if len(text) > 90:
                text = text[:87] + "..."
            passed = sum(c["ok"] for _, c in recs)
            missing = len(nb_runs) - len(recs)
            vals = [c["value"] for _, c in recs if c["value"] is not None]
            thr = sorted({round(c["threshold"], 4) for _, c in recs if c["threshold"] is not None})
            margins = [c["margin"] for _, c in recs if c["margin"] is not None]
            v = f"{sum(vals) / len(vals):.4g} [{min(vals):.4g}, {max(vals):.4g}]" if vals else ""
            t = (f"{thr[0]:.4g}" if len(thr) == 1 else f"{thr[0]:.4g}..{thr[-1]:.4g}") if thr else ""
            m = f"{min(margins):.3g} ({sum(margins) / len(margins):.3g})" if margins else ""
            rate = f"{passed}/{len(recs) + missing}"
            out.append(f"| `{text}` ({key.rsplit(':', 1)[0]}) | {rate} | {v} | {t} | {m} |")
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="execute notebooks over seeds and settings")
    p_run.add_argument("notebooks", nargs="+", type=Path)
    p_run.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p_run.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=["default", "emulated"])
    p_run.add_argument("--out", type=Path, default=ROOT / "bench" / "claims.jsonl")
    p_rep = sub.add_parser("report", help="aggregate a results file into a markdown table")
    p_rep.add_argument("results", type=Path)
    p_rep.add_argument("--notebooks", nargs="*", help="only these notebook file names")
    args = parser.parse_args(argv)
    if args.command == "run":
        for path in args.notebooks:
            if not path.is_file():
                parser.error(f"notebooks: {path} is not a file")
        for path in args.notebooks:
            for setting in args.settings:
                for seed in args.seeds:
                    row = run_one(path.resolve(), seed, setting)
                    failed = [c["text"] for c in row["claims"].values() if not c["ok"]]
                    print(f"{path.name} seed={seed} {setting}: {row['seconds']} s, "
                          f"{len(row['claims'])} claims, failed {failed}, errors {row['errors']}", flush=True)
                    with open(args.out, "a") as f:
                        f.write(json.dumps(row) + "\n")
    else:
        rows = [json.loads(line) for line in args.results.read_text().splitlines() if line.strip()]
        if args.notebooks:
            rows = [r for r in rows if r["notebook"] in args.notebooks]
        print(report(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
