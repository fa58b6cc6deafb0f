"""The repository keeps its promises: two README commands, CI runs the test one, Binder, no import work."""
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_commands_exist_and_ci_runs_the_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "scripts/workshop" in readme and "scripts/test" in readme
    for script in ("scripts/workshop", "scripts/test", ".ci/run"):
        path = ROOT / script
        assert path.exists() and path.stat().st_mode & 0o111, f"{script} must exist and be executable"
    ci = [line for line in (ROOT / ".ci/run").read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert ci[-1].strip() == "exec scripts/test"
    assert "--nbval" in (ROOT / "scripts/test").read_text()


def test_torch_lower_bound_stays_at_or_below_2_13():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_dep = next(d for d in deps if d.startswith("torch"))
    lower = re.search(r">=\s*([\d.]+)", torch_dep)
    assert lower, f"torch needs a lower bound: {torch_dep}"
    assert tuple(int(p) for p in lower.group(1).split(".")[:2]) <= (2, 13)
    assert "==" not in torch_dep and "<" not in torch_dep.replace("<=", "")


def test_binder_builds_a_cpu_image_with_nbbatch():
    req = (ROOT / "binder/requirements.txt").read_text()
    assert "whl/cpu" in req and "torch" in req
    assert "-e" in (ROOT / "binder/postBuild").read_text()
    assert "mybinder.org" in (ROOT / "README.md").read_text()


def test_notebooks_are_numbered_and_executed():
    import json
    notebooks = sorted((ROOT / "notebooks").glob("*.ipynb"))
    assert notebooks, "the series has notebooks"
    for nb_path in notebooks:
        assert re.fullmatch(r"\d\d[a-z]?_[a-z0-9_]+\.ipynb", nb_path.name), nb_path.name
        nb = json.loads(nb_path.read_text())
        code = [c for c in nb["cells"] if c["cell_type"] == "code" and "".join(c["source"]).strip()]
        assert all(c.get("execution_count") for c in code), f"{nb_path.name} has unexecuted cells"


def test_import_does_no_work(tmp_path):
    code = ("import sys, torch; import nbbatch, nbbatch.trainer, nbbatch.data, nbbatch.cli; "
            "assert not torch.cuda.is_initialized(); "
            "assert 'sklearn' not in sys.modules and 'mnist1d' not in sys.modules and 'pandas' not in sys.modules")
    env = {"NBBATCH_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "" and out.stderr == ""
    assert not (tmp_path / "cache").exists()


def test_every_notebook_is_workshop_ready():
    """Objectives and a time up front, exercises with revealable solutions, the checks marked as skippable."""
    import json
    guide = (ROOT / "docs" / "INSTRUCTORS.md").read_text()
    for nb_path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = json.loads(nb_path.read_text())["cells"]
        markdown = ["".join(c["source"]) for c in cells if c["cell_type"] == "markdown"]
        head = markdown[0]
        assert "**Time:**" in head and "**Learning objectives.**" in head, f"{nb_path.name}: time and objectives first"
        assert any(re.search(r"<summary>[^<]*Solution", m) for m in markdown), f"{nb_path.name}: an exercise's solution"
        code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
        if any(re.search(r"^\s*assert ", c, re.M) for c in code):
            assert any(m.startswith("## Checks (for the course's tests; skip)") for m in markdown), nb_path.name
        assert f"`{nb_path.stem}`" in guide, f"{nb_path.name} is missing from the instructor guide"
