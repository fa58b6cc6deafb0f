"""The IPython extension: ``%load_ext nbbatch`` registers ``%nbbatch_env`` and ``%%peakmem``.

``%nbbatch_env`` prints the device nbbatch would train on, the torch version, threads and memory:
in a container (Binder, Docker, a batch job) the limits of its cgroup (v2 ``memory.max`` and
``cpu.max``, v1 ``memory.limit_in_bytes`` and ``cpu.cfs_quota_us``), which are what the kernel
can use, not the host's memory and cores.
``%%peakmem`` runs a cell and prints its own peak memory: on CUDA the peak of torch's allocator
(``torch.cuda.max_memory_allocated``) above what was allocated before the cell; on the CPU the
peak resident set size of the process during the cell, read from Linux's ``VmHWM`` after
resetting it for this cell (``/proc/self/clear_refs``), else sampled from the RSS every few
milliseconds (and the report says so). It also says how much the cell left resident.
"""

from __future__ import annotations

import ast
import os
import platform
import threading
from dataclasses import dataclass

import torch

from .device import describe_device, resolve_device

MIB = 2**20


def _read_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def current_rss_bytes() -> int | None:
    """The process's resident set size now (Linux ``VmRSS``), or None where unavailable."""
    kib = _read_status_kib("VmRSS")
    return None if kib is None else kib * 1024


def _reset_peak_rss() -> bool:
    # Writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0).
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _read_status_kib("VmHWM") is not None
    except OSError:
        return False


CGROUP_ROOT = "/sys/fs/cgroup"
_NO_LIMIT = 2**60      # cgroup v1 writes "no limit" as a huge page-rounded number


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _cgroup_dirs(root: str, controller: str | None, proc_cgroup: str | None, mount: str | None = None) -> list[str]:
    """Candidate directories of this process's cgroup for ``controller`` (None: the v2 hierarchy).

    A container usually sees its own cgroup mounted at the root (its /proc/self/cgroup path then
    means nothing inside it), so the root is tried after the path /proc/self/cgroup names.
    """
    text = proc_cgroup if proc_cgroup is not None else (_read("/proc/self/cgroup") or "")
    base = root if controller is None else os.path.join(root, mount or controller)
    dirs = []
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if (controller is None and parts[0] == "0" and controllers == "") or \
                (controller is not None and controller in controllers.split(",")):
            dirs.append(os.path.join(base, path.lstrip("/")))
    dirs.append(base)
    return dirs


def container_limits(root: str = CGROUP_ROOT, proc_cgroup: str | None = None) -> dict:
    """The memory limit, memory in use and CPU quota of this process's cgroup (v2, else v1).

    Returns a dict with ``memory_limit`` and ``memory_used`` in bytes, ``cpu_quota`` in cores
    (e.g. 1.0 for ``cpu.max`` = ``100000 100000``) and ``source`` (``"cgroup v2"``,
    ``"cgroup v1"``); a value is None where there is no limit or it cannot be read.

    Example:
        >>> sorted(container_limits(root="/nonexistent"))
        ['cpu_quota', 'memory_limit', 'memory_used', 'source']
    """
    out = {"memory_limit": None, "memory_used": None, "cpu_quota": None, "source": None}
    for d in _cgroup_dirs(root, None, proc_cgroup):                       # cgroup v2
        mem = _read(os.path.join(d, "memory.max"))
        cpu = _read(os.path.join(d, "cpu.max"))
        if mem is None and cpu is None:
            continue
        out["source"] = "cgroup v2"
        if mem and mem != "max":
            out["memory_limit"] = int(mem)
        used = _read(os.path.join(d, "memory.current"))
        out["memory_used"] = int(used) if used and used.isdigit() else None
        if cpu and cpu.split()[0] != "max":
            quota, period = cpu.split()[:2]
            out["cpu_quota"] = int(quota) / int(period)
        return out
    for d in _cgroup_dirs(root, "memory", proc_cgroup):                   # cgroup v1
        mem = _read(os.path.join(d, "memory.limit_in_bytes"))
        if mem is None:
            continue
        out["source"] = "cgroup v1"
        if mem.isdigit() and int(mem) < _NO_LIMIT:
            out["memory_limit"] = int(mem)
        used = _read(os.path.join(d, "memory.usage_in_bytes"))
        out["memory_used"] = int(used) if used and used.isdigit() else None
        break
    for mount in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):     # where distributions mount the v1 cpu controller
        for d in _cgroup_dirs(root, "cpu", proc_cgroup, mount):
            quota = _read(os.path.join(d, "cpu.cfs_quota_us"))
            period = _read(os.path.join(d, "cpu.cfs_period_us"))
            if quota is None or period is None:
                continue
            out["source"] = out["source"] or "cgroup v1"
            if int(quota) > 0:
                out["cpu_quota"] = int(quota) / int(period)
            return out
    return out


def memory_info() -> dict:
    """Total and available system memory in bytes (None where unknown).

    Example:
        >>> sorted(memory_info())
        ['available', 'total']
    """
    out = {"total": None, "available": None}
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.split()[1:2]}
        out = {"total": info.get("MemTotal"), "available": info.get("MemAvailable")}
    except (OSError, ValueError, IndexError):
        try:
            out["total"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            pass
    return out


def env_report() -> dict:
    """What ``%nbbatch_env`` prints: device, torch, threads, memory.

    Example:
        >>> r = env_report(); r["torch"] == torch.__version__ and r["threads"] >= 1
        True
    """
    device = resolve_device("auto")
    mem = memory_info()
    limits = container_limits()
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    report = {"device": describe_device(device), "torch": torch.__version__, "python": platform.python_version(),
              "threads": torch.get_num_threads(), "cpu_cores": os.cpu_count(), "cpus_usable": usable,
              "cpu_quota": limits["cpu_quota"], "memory_total": mem["total"], "memory_available": mem["available"],
              "memory_limit": limits["memory_limit"], "memory_used": limits["memory_used"],
              "limits_source": limits["source"], "process_rss": current_rss_bytes()}
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        report.update(device_memory_total=total, device_memory_free=free)
    return report


def format_env(report: dict) -> str:
    def mib(v):
        return "?" if v is None else f"{v / MIB:,.0f} MiB"

    cores = f"{report['threads']} torch threads, {report['cpu_cores']} CPU cores"
    if report.get("cpu_quota") is not None:
        cores += f" (container quota: {report['cpu_quota']:g} core{'s' if report['cpu_quota'] != 1 else ''})"
    elif report.get("cpus_usable") not in (None, report["cpu_cores"]):
        cores += f" ({report['cpus_usable']} usable by this process)"
    if report.get("memory_limit") is not None:
        limit, used = report["memory_limit"], report.get("memory_used")
        memory = (f"{mib(limit)} container limit ({report['limits_source']})"
                  + (f", {mib(used)} used, {mib(max(limit - used, 0))} left" if used is not None else "")
                  + f"; this process {mib(report['process_rss'])}")
    else:
        memory = (f"{mib(report['memory_available'])} available of {mib(report['memory_total'])} (no container "
                  f"limit found); this process {mib(report['process_rss'])}")
    lines = [f"device:  {report['device']}",
             f"torch:   {report['torch']} (python {report['python']})",
             f"threads: {cores}",
             f"memory:  {memory}"]
    if "device_memory_total" in report:
        lines.append(f"device memory: {mib(report['device_memory_free'])} free of {mib(report['device_memory_total'])}")
    return "\n".join(lines)


@dataclass
class PeakMemory:
    """Peak memory of a block of code: ``with PeakMemory() as m: ...`` then ``m.peak_bytes``.

    On CUDA (``device="cuda"``, or ``"auto"`` with a GPU) ``peak_bytes`` is the allocator's
    peak above the memory allocated at the start. On the CPU it is the peak RSS of the process
    during the block above the RSS at the start; ``method`` says how it was measured
    (``"VmHWM"`` or ``"sampled"``, the latter may miss peaks shorter than ``interval``).

    Example:
        >>> with PeakMemory(device="cpu") as m:
        ...     x = b"1" * (64 * 2**20)
        >>> m.peak_bytes > 32 * 2**20
        True
    """

    device: str = "auto"
    interval: float = 0.002
    peak_bytes: int = 0
    start_bytes: int = 0
    end_bytes: int = 0
    method: str = ""

    def __enter__(self) -> "PeakMemory":
        self._device = resolve_device(self.device)
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
            torch.cuda.reset_peak_memory_stats(self._device)
            self.start_bytes = torch.cuda.memory_allocated(self._device)
            self.method = "cuda allocator"
            return self
        self.start_bytes = current_rss_bytes() or 0
        if _reset_peak_rss():
            self.method = "VmHWM"
        else:
            self.method = "sampled"
            self._max = self.start_bytes
            self._done = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True, name="nbbatch-peakmem")
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._done.wait(self.interval):
            rss = current_rss_bytes()
            if rss is None:
                return
            self._max = max(self._max, rss)

    def __exit__(self, *exc) -> None:
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
            peak = torch.cuda.max_memory_allocated(self._device)
        elif self.method == "VmHWM":
            peak = (_read_status_kib("VmHWM") or 0) * 1024
        else:
            self._done.set()
            self._thread.join()
            peak = max(self._max, current_rss_bytes() or 0)
        self.peak_bytes = max(peak - self.start_bytes, 0)
        if self._device.type == "cuda":
            self.end_bytes = torch.cuda.memory_allocated(self._device)
        else:
            self.end_bytes = current_rss_bytes() or 0

    def describe(self) -> str:
        where = str(self._device) if self._device.type == "cuda" else "process RSS"
        how = {"VmHWM": "the peak RSS reset for this cell (VmHWM)",
               "sampled": f"RSS sampled every {self.interval * 1000:g} ms: this system does not let the peak "
                          "be reset, a shorter peak may be missed",
               "cuda allocator": "torch's allocator peak"}.get(self.method, self.method)
        kept = (self.end_bytes - self.start_bytes) / MIB
        return (f"peak memory: {self.peak_bytes / MIB:,.1f} MiB above the start of this cell "
                f"({where}, {self.start_bytes / MIB:,.0f} MiB before it; {kept:+,.1f} MiB still held after it; "
                f"measured by {how})")


def _magics_class():
    from IPython.core.error import UsageError
    from IPython.core.magic import Magics, cell_magic, line_magic, magics_class

    @magics_class
    class NbbatchMagics(Magics):
        """``%nbbatch_env`` and ``%%peakmem [device]``."""

        last_peak: PeakMemory | None = None

        @line_magic
        def nbbatch_env(self, line=""):
            """Print the training device, torch version, threads and memory."""
            print(format_env(env_report()))

        @cell_magic
        def peakmem(self, line, cell):
            """Run the cell and print its peak memory (``%%peakmem cpu`` or ``%%peakmem cuda`` to choose).

            The cell runs in the user namespace as ``%%time`` runs it: an error in it fails this
            cell (a nested ``run_cell`` would show it and report success), and the value of a last
            expression is the cell's result.
            """
            device = line.strip() or "auto"
            tree = self.shell.compile.ast_parse(self.shell.transform_cell(cell))   # a SyntaxError runs nothing
            last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
            try:
                meter = PeakMemory(device=device)
                meter.__enter__()
            except (ValueError, RuntimeError) as err:
                raise UsageError(f"%%peakmem: {err}") from None
            ns = self.shell.user_ns
            try:
                exec(self.shell.compile(tree, "<peakmem cell>", "exec"), ns)
                if last is not None:
                    return eval(self.shell.compile(ast.Expression(last.value), "<peakmem cell>", "eval"), ns)
            finally:
                meter.__exit__(None, None, None)
                self.last_peak = meter
                self.shell.user_ns["_peakmem"] = meter
                print(meter.describe())

    return NbbatchMagics


def load_ipython_extension(ipython) -> None:
    """Register the magics with ``ipython`` (``%load_ext nbbatch`` calls this)."""
    ipython.register_magics(_magics_class()(ipython))


def unload_ipython_extension(ipython) -> None:
    """Remove the magics again (``%unload_ext nbbatch``)."""
    manager = ipython.magics_manager
    magics = manager.registry.pop("NbbatchMagics", None)
    if magics is None:
        return
    for kind, names in magics.magics.items():
        for name in names:
            manager.magics[kind].pop(name, None)

