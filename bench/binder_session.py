"""A simulated workshop participant on Binder: the notebook series, in order, in one memory box.

Each notebook is run top to bottom ("Run All") in its own Jupyter kernel, and the kernel is left
running afterwards, as JupyterLab leaves it when its tab is closed. Everything runs inside one
cgroup with Binder's free-tier limits (default 2 GiB of memory, 1 CPU), so the kernels compete for
memory as they would there. After each notebook the script records, per live kernel (and its
child processes), the resident (RSS), proportional (PSS, shared pages split between processes)
and anonymous memory from ``/proc/<pid>/smaps_rollup``, the cgroup's total and peak, whether the
kernel-out-of-memory killer ran, and how long the notebook took.

``--keep K`` keeps only the K most recent kernels alive (what the Binder image's idle culling
does for a participant who spends ten minutes per notebook: see ``binder/jupyter_server_config.py``).

Needs root on Linux with a writable cgroup v1 (``memory``, ``cpu``) or v2 hierarchy; elsewhere
(``--no-cgroup``) it runs without limits and still measures. The driving process (this script,
standing in for the Jupyter server) runs inside the cgroup too.

Run:  .venv/bin/python bench/binder_session.py [--memory 2G] [--cpus 1] [--keep 0] [--json out.json]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 2**20


def _size(text: str) -> int:
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    text = text.strip().upper().rstrip("IB").rstrip("B")
    return int(float(text[:-1]) * units[text[-1]]) if text[-1:] in units else int(text)


class Box:
    """A cgroup with a memory limit and a CPU quota that this process (and its children) join."""

    def __init__(self, memory: int, cpus: float, name: str):
        self.dirs: dict[str, str] = {}
        self.version = None
        v1_mem, v1_cpu = "/sys/fs/cgroup/memory", "/sys/fs/cgroup/cpu"
        if os.path.isdir(v1_mem) and os.access(v1_mem, os.W_OK):
            self.version = 1
            self.dirs["memory"] = os.path.join(v1_mem, name)
            self.dirs["cpu"] = os.path.join(v1_cpu, name) if os.path.isdir(v1_cpu) else None
            os.makedirs(self.dirs["memory"], exist_ok=True)
            self._write("memory", "memory.limit_in_bytes", memory)
            try:   # no swap: an over-limit box is killed, not slowed by swapping (as on Binder)
                self._write("memory", "memory.memsw.limit_in_bytes", memory)
            except OSError:
                pass
            if self.dirs["cpu"]:
                os.makedirs(self.dirs["cpu"], exist_ok=True)
                self._write("cpu", "cpu.cfs_period_us", 100_000)
                self._write("cpu", "cpu.cfs_quota_us", int(100_000 * cpus))
            for d in self.dirs.values():
                if d:
                    with open(os.path.join(d, "cgroup.procs"), "w") as f:
                        f.write(str(os.getpid()))
        elif os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
            self.version = 2
            d = os.path.join("/sys/fs/cgroup", name)
            os.makedirs(d, exist_ok=True)
            self.dirs = {"memory": d, "cpu": d}
            self._write("memory", "memory.max", memory)
            self._write("cpu", "cpu.max", f"{int(100_000 * cpus)} 100000")
            self._write("memory", "cgroup.procs", os.getpid())
        else:
            raise RuntimeError("no writable cgroup hierarchy (run as root on Linux, or pass --no-cgroup)")

    def _write(self, ctl: str, name: str, value) -> None:
        with open(os.path.join(self.dirs[ctl], name), "w") as f:
            f.write(str(value))

    def _read(self, name: str) -> str | None:
        try:
            with open(os.path.join(self.dirs["memory"], name)) as f:
                return f.read()
        except OSError:
            return None

    def usage(self) -> dict:
        if self.version == 1:
            cur, peak = self._read("memory.usage_in_bytes"), self._read("memory.max_usage_in_bytes")
            oom = self._read("memory.oom_control") or ""
            kills = next((int(line.split()[1]) for line in oom.splitlines() if line.startswith("oom_kill ")), None)
        else:
            cur, peak = self._read("memory.current"), self._read("memory.peak")
            ev = self._read("memory.events") or ""
            kills = next((int(line.split()[1]) for line in ev.splitlines() if line.startswith("oom_kill ")), None)
        return {"used": int(cur) if cur else None, "peak": int(peak) if peak else None, "oom_kills": kills}

    def close(self) -> None:
        # leave the box (back to the root cgroup), then remove it once its processes are gone
        for ctl, d in self.dirs.items():
            if not d:
                continue
            root = os.path.dirname(d)
            try:
                with open(os.path.join(root, "cgroup.procs"), "w") as f:
                    f.write(str(os.getpid()))
            except OSError:
                pass
        time.sleep(0.5)
        for d in set(v for v in self.dirs.values() if v):
            try:
                os.rmdir(d)
            except OSError:
                pass


def _children(pid: int) -> list[int]:
    out = []
    for task in glob.glob(f"/proc/{pid}/task/*/children"):
        try:
            with open(task) as f:
                out += [int(x) for x in f.read().split()]
        except OSError:
            pass
    return out


def process_memory(pid: int) -> dict:
    """RSS, PSS and anonymous bytes of ``pid`` and its descendants (``smaps_rollup``)."""
    total = {"rss": 0, "pss": 0, "anon": 0}
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.split()[1:2]
                          and line.split()[1].isdigit()}
        except OSError:
            continue
        total["rss"] += fields.get("Rss", 0)
        total["pss"] += fields.get("Pss", 0)
        total["anon"] += fields.get("Anonymous", 0)
        todo += _children(p)
    return total


def run_notebook(path: str, env: dict, timeout: float):
    """Start a kernel, run every code cell of ``path`` in it, leave it running. Returns (km, kc, record)."""
    import nbformat
    from jupyter_client import KernelManager

    nb = nbformat.read(path, as_version=4)
    km = KernelManager(kernel_name="python3")
    km.start_kernel(cwd=os.path.dirname(path), env=env)
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=120)
    t0 = time.perf_counter()
    error = None
    for cell in nb.cells:
        if cell.cell_type != "code" or not cell.source.strip():
            continue
        try:
            reply = kc.execute_interactive(cell.source, timeout=timeout, output_hook=lambda msg: None,
                                           stop_on_error=True)
        except Exception as err:     # a timeout or a dead kernel: recorded, the session goes on
            error = f"{type(err).__name__}: {err}"
            break
        if reply["content"]["status"] != "ok":
            error = f"{reply['content'].get('ename')}: {reply['content'].get('evalue')}"
            break
    return km, kc, {"notebook": os.path.basename(path), "seconds": time.perf_counter() - t0, "error": error,
                    "pid": km.provisioner.process.pid if km.provisioner is not None else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--memory", default="2G", help="memory limit of the box (default 2G)")
    ap.add_argument("--cpus", type=float, default=1.0, help="CPU quota of the box in cores (default 1)")
    ap.add_argument("--keep", type=int, default=0, help="kernels kept alive, most recent first (0: all)")
    ap.add_argument("--notebooks", default=os.path.join(ROOT, "notebooks", "[0-9]*.ipynb"), help="glob of notebooks")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per cell")
    ap.add_argument("--malloc-arena-max", default=None, help="MALLOC_ARENA_MAX for the kernels (default: unset)")
    ap.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                    help="an environment variable for the kernels (repeatable), e.g. what binder/start exports")
    ap.add_argument("--no-cgroup", action="store_true", help="run without a memory box (measure only)")
    ap.add_argument("--json", default=None, help="write the records here")
    args = ap.parse_args(argv)
    if args.keep < 0:
        ap.error("--keep must be >= 0")
    notebooks = sorted(glob.glob(args.notebooks))
    if not notebooks:
        ap.error(f"--notebooks {args.notebooks!r} matches no file")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               NBBATCH_PROGRESS="0")
    env.pop("MPLBACKEND", None)
    if args.malloc_arena_max:
        env["MALLOC_ARENA_MAX"] = str(args.malloc_arena_max)
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            ap.error(f"--env {item!r}: give NAME=VALUE")
        env[name] = value
    box = None if args.no_cgroup else Box(_size(args.memory), args.cpus, f"nbbatch-session-{os.getpid()}")
    print(f"# simulated participant: {len(notebooks)} notebooks in order, kernels kept: "
          f"{args.keep or 'all'}; box: {'none' if box is None else f'{args.memory}, {args.cpus:g} CPU, cgroup v{box.version}'}; "
          f"{platform.machine()}, python {platform.python_version()}", flush=True)
    print("| after | seconds | error | live kernels | per kernel RSS / PSS / anon MiB | sum PSS MiB | box used MiB "
          "| box peak MiB | OOM kills |")
    print("|---|---|---|---|---|---|---|---|---|", flush=True)
    live, records = [], []
    try:
        for path in notebooks:
            km, kc, rec = run_notebook(path, env, args.timeout)
            live.append((rec["notebook"], km, kc))
            time.sleep(2.0)    # let the kernel settle (its last output, garbage collection)
            if args.keep:
                while len(live) > args.keep:
                    _, old_km, old_kc = live.pop(0)
                    old_kc.stop_channels()
                    old_km.shutdown_kernel(now=True)
            kernels = []
            for name, k, _ in live:
                alive = k.is_alive()
                mem = process_memory(k.provisioner.process.pid) if alive else {"rss": 0, "pss": 0, "anon": 0}
                kernels.append({"notebook": name, "alive": alive, **mem})
            use = box.usage() if box else {"used": None, "peak": None, "oom_kills": None}
            rec.update(kernels=kernels, box=use, driver=process_memory(os.getpid()) if box is None else None)
            records.append(rec)
            per = "; ".join(f"{k['notebook'][:2]}: {k['rss'] / MIB:.0f}/{k['pss'] / MIB:.0f}/{k['anon'] / MIB:.0f}"
                            + ("" if k["alive"] else " DEAD") for k in kernels)
            mib = (lambda v: "-" if v is None else f"{v / MIB:.0f}")
            print(f"| {rec['notebook']} | {rec['seconds']:.1f} | {rec['error'] or ''} | {sum(k['alive'] for k in kernels)} "
                  f"| {per} | {sum(k['pss'] for k in kernels) / MIB:.0f} | {mib(use['used'])} | {mib(use['peak'])} "
                  f"| {use['oom_kills'] if use['oom_kills'] is not None else '-'} |", flush=True)
    finally:
        for _, k, c in live:
            try:
                c.stop_channels()
                k.shutdown_kernel(now=True)
            except Exception:   # already dead (killed by the box): nothing to stop
                pass
        if box is not None:
            box.close()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
