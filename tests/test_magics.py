"""The IPython extension, in a real InteractiveShell."""
import pytest
import torch

IPython = pytest.importorskip("IPython")

from nbbatch import magics  # noqa: E402
from helpers import requires_cuda  # noqa: E402


@pytest.fixture
def shell():
    from IPython.core.interactiveshell import InteractiveShell

    sh = InteractiveShell.instance()
    yield sh
    sh.run_line_magic("unload_ext", "nbbatch")
    InteractiveShell.clear_instance()


def test_load_registers_and_unload_removes_the_magics(shell):
    shell.run_line_magic("load_ext", "nbbatch")
    assert "nbbatch_env" in shell.magics_manager.magics["line"]
    assert "peakmem" in shell.magics_manager.magics["cell"]
    shell.run_line_magic("unload_ext", "nbbatch")
    assert "nbbatch_env" not in shell.magics_manager.magics["line"]
    assert "peakmem" not in shell.magics_manager.magics["cell"]
    shell.run_line_magic("load_ext", "nbbatch")          # loads again after an unload
    assert "peakmem" in shell.magics_manager.magics["cell"]


def test_nbbatch_env_prints_device_torch_threads_memory(shell, capsys):
    shell.run_line_magic("load_ext", "nbbatch")
    shell.run_line_magic("nbbatch_env", "")
    out = capsys.readouterr().out
    assert f"torch:   {torch.__version__}" in out
    assert f"{torch.get_num_threads()} torch threads" in out
    assert "device:  cpu" in out or "device:  cuda" in out
    report = magics.env_report()
    assert report["memory_total"] is None or report["memory_total"] > report["process_rss"] > 0


def test_peakmem_measures_a_known_allocation(shell, capsys):
    shell.run_line_magic("load_ext", "nbbatch")
    shell.run_cell_magic("peakmem", "cpu", "x = b'1' * (256 * 2**20)\ndel x\n")
    meter = shell.user_ns["_peakmem"]
    # 256 MiB of bytes were written and freed again: the peak sees them, the end does not
    assert 240 * 2**20 <= meter.peak_bytes <= 400 * 2**20, meter.peak_bytes
    assert "peak memory:" in capsys.readouterr().out


def test_peakmem_reports_a_bad_device_without_running_the_cell(shell):
    from IPython.core.error import UsageError

    shell.run_line_magic("load_ext", "nbbatch")
    with pytest.raises(UsageError, match="device='tpu'"):
        shell.run_cell_magic("peakmem", "tpu", "ran = True\n")
    assert "ran" not in shell.user_ns


def test_sampled_fallback_sees_a_peak(monkeypatch):
    monkeypatch.setattr(magics, "_reset_peak_rss", lambda: False)
    with magics.PeakMemory(device="cpu", interval=0.001) as m:
        x = torch.ones(64 * 2**20 // 4)      # 64 MiB, written
        import time
        time.sleep(0.05)
        del x
    assert m.method == "sampled" and m.peak_bytes >= 48 * 2**20


@requires_cuda
def test_peakmem_on_cuda_reads_the_allocator_peak():
    with magics.PeakMemory(device="cuda") as m:
        x = torch.ones(64 * 2**20 // 4, device="cuda")      # 64 MiB
        del x
    assert m.method == "cuda allocator" and 64 * 2**20 <= m.peak_bytes < 80 * 2**20


def test_peakmem_cell_errors_fail_the_cell_and_values_are_its_result(shell, capsys):
    shell.run_line_magic("load_ext", "nbbatch")
    r = shell.run_cell("%%peakmem cpu\nx = 1\n1/0\n")
    assert not r.success and isinstance(r.error_in_exec, ZeroDivisionError)   # Run All stops here
    assert shell.user_ns["x"] == 1 and "peak memory:" in capsys.readouterr().out
    r = shell.run_cell("%%peakmem cpu\ny = 20\n%time z = 2\ny + z\n")   # magics inside still work
    assert r.success and r.result == 22 and shell.user_ns["z"] == 2
    r = shell.run_cell("%%peakmem cpu\nran = True\n1 +\n")
    assert not r.success and "ran" not in shell.user_ns
    r = shell.run_cell("%%peakmem tpu\nran = True\n")
    assert not r.success and "ran" not in shell.user_ns
    assert "%%peakmem" in capsys.readouterr().err


# ---------------------------------------------------------------------- container limits
def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def test_container_limits_read_cgroup_v2(tmp_path):
    _write(tmp_path / "memory.max", str(2 * 2**30))
    _write(tmp_path / "memory.current", str(300 * 2**20))
    _write(tmp_path / "cpu.max", "150000 100000")
    limits = magics.container_limits(root=str(tmp_path), proc_cgroup="0::/\n")
    assert limits == {"memory_limit": 2 * 2**30, "memory_used": 300 * 2**20, "cpu_quota": 1.5, "source": "cgroup v2"}
    # a process in a nested cgroup reads its own directory first
    _write(tmp_path / "user" / "k1" / "memory.max", "max")
    _write(tmp_path / "user" / "k1" / "cpu.max", "max 100000")
    limits = magics.container_limits(root=str(tmp_path), proc_cgroup="0::/user/k1\n")
    assert limits["memory_limit"] is None and limits["cpu_quota"] is None and limits["source"] == "cgroup v2"


def test_container_limits_read_cgroup_v1(tmp_path):
    _write(tmp_path / "memory" / "job" / "memory.limit_in_bytes", str(2 * 2**30))
    _write(tmp_path / "memory" / "job" / "memory.usage_in_bytes", str(2**30))
    _write(tmp_path / "cpu,cpuacct" / "job" / "cpu.cfs_quota_us", "100000")
    _write(tmp_path / "cpu,cpuacct" / "job" / "cpu.cfs_period_us", "100000")
    proc = "5:memory:/job\n3:cpu,cpuacct:/job\n0::/\n"
    limits = magics.container_limits(root=str(tmp_path), proc_cgroup=proc)
    assert limits == {"memory_limit": 2 * 2**30, "memory_used": 2**30, "cpu_quota": 1.0, "source": "cgroup v1"}
    # "no limit": v1's huge number and a quota of -1
    _write(tmp_path / "memory" / "job" / "memory.limit_in_bytes", "9223372036854771712")
    _write(tmp_path / "cpu,cpuacct" / "job" / "cpu.cfs_quota_us", "-1")
    limits = magics.container_limits(root=str(tmp_path), proc_cgroup=proc)
    assert limits["memory_limit"] is None and limits["cpu_quota"] is None
    assert magics.container_limits(root=str(tmp_path / "none"), proc_cgroup="")["source"] is None


def test_nbbatch_env_reports_the_container_limit_not_the_host(monkeypatch, shell, capsys):
    monkeypatch.setattr(magics, "container_limits", lambda: {"memory_limit": 2 * 2**30, "memory_used": 2**29,
                                                             "cpu_quota": 1.0, "source": "cgroup v2"})
    shell.run_line_magic("load_ext", "nbbatch")
    shell.run_line_magic("nbbatch_env", "")
    out = capsys.readouterr().out
    assert "2,048 MiB container limit (cgroup v2), 512 MiB used, 1,536 MiB left" in out
    assert "(container quota: 1 core)" in out


def test_peakmem_reports_the_cells_own_peak_not_an_earlier_one(shell, capsys):
    """An earlier, larger peak of the process does not count: the peak is reset for each cell."""
    if not magics._reset_peak_rss():
        pytest.skip("this system does not let the peak RSS be reset")
    shell.run_line_magic("load_ext", "nbbatch")
    shell.run_cell("big = b'1' * (300 * 2**20)\ndel big\n")
    # 48 MiB of fresh pages straight from the kernel (an anonymous mmap, written 1 MiB at a time):
    # memory the allocator already holds (freed earlier in this process) cannot serve them
    shell.run_cell_magic("peakmem", "cpu", "import mmap\nx = mmap.mmap(-1, 48 * 2**20)\n"
                                           "for i in range(48):\n    x[i * 2**20:(i + 1) * 2**20] = b'1' * 2**20\n")
    meter = shell.user_ns["_peakmem"]
    assert 46 * 2**20 <= meter.peak_bytes <= 100 * 2**20, meter.peak_bytes
    out = capsys.readouterr().out
    assert "reset for this cell" in out and "still held after it" in out
    assert meter.end_bytes - meter.start_bytes >= 46 * 2**20        # x is still alive


def test_sampled_peakmem_says_it_could_not_reset(monkeypatch):
    monkeypatch.setattr(magics, "_reset_peak_rss", lambda: False)
    with magics.PeakMemory(device="cpu") as m:
        pass
    assert "does not let the peak be reset" in m.describe()


# ---------------------------------------------------------------------- the Binder image's memory settings
def test_binder_configuration_culls_idle_kernels():
    """The Jupyter config the Binder image installs shuts idle kernels down (never busy ones)."""
    from pathlib import Path

    from traitlets.config import Config

    root = Path(__file__).resolve().parents[1]
    c = Config()
    exec(compile((root / "binder" / "jupyter_server_config.py").read_text(), "jupyter_server_config.py", "exec"),
         {"get_config": lambda: c})
    mkm = c.MappingKernelManager
    assert 5 * 60 <= mkm.cull_idle_timeout <= 30 * 60 and mkm.cull_interval <= 120
    assert mkm.cull_connected is True and mkm.cull_busy is False
    post = (root / "binder" / "postBuild").read_text()
    assert "binder/jupyter_server_config.py" in post and ".jupyter/jupyter_server_config.py" in post
    start = (root / "binder" / "start").read_text()
    assert "OMP_NUM_THREADS=1" in start and 'exec "$@"' in start


def test_session_script_measures_a_process_tree():
    import importlib.util
    import os
    import subprocess
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "binder_session.py"
    spec = importlib.util.spec_from_file_location("binder_session", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    alone = mod.process_memory(os.getpid())
    assert 0 < alone["anon"] <= alone["rss"] and 0 < alone["pss"] <= alone["rss"]
    child = subprocess.Popen([sys.executable, "-c", "import time; x = b'1' * (64 * 2**20); time.sleep(30)"])
    try:
        deadline = __import__("time").monotonic() + 20
        while mod.process_memory(os.getpid())["anon"] < alone["anon"] + 60 * 2**20:
            assert __import__("time").monotonic() < deadline, "the child's 64 MiB never showed"
            __import__("time").sleep(0.1)
    finally:
        child.kill()
        child.wait()
    assert mod._size("2G") == 2 * 2**30 and mod._size("512MiB") == 512 * 2**20
