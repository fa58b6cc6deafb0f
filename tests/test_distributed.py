"""Data parallelism: two gloo processes on the CPU against one process at the same global batch.

Every multi-process test goes through ``launch`` (workers bound to 127.0.0.1 on a free port,
a bounded timeout, all workers stopped at the end) or a bounded ``torchrun`` subprocess.
"""
import multiprocessing
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from helpers import PairDataset, make_mlp, weights
from nbbatch import Trainer
from nbbatch import distributed as nbdist
from nbbatch.batching import TensorBatches, epoch_permutation
from nbbatch.distributed import Distributed, LaunchError, ShardedTensorBatches, launch

TIMEOUT = 240   # seconds for any one launch: generous for a loaded machine, never a hang


def toy_data(n=200):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    w = torch.randn(8, 3, generator=g)
    return x, (x @ w).argmax(dim=1)


def run(batch_size, steps, accumulate=1, n=200, as_dataset=False, optimizer="momentum", new_group=False, **options):
    """One run; in a worker it is data-parallel over the launched group (or a group made for it)."""
    torch.set_num_threads(1)
    if new_group and nbdist.world_size() > 1:
        import torch.distributed as dist
        options["distributed"] = dist.new_group(list(range(dist.get_world_size())))
    x, y = toy_data(n)
    model = make_mlp()
    data = PairDataset(x, y) if as_dataset else (x, y)
    t = Trainer(model, data, batch_size=batch_size, lr=0.2, optimizer=optimizer, accumulate=accumulate,
                seed=3, **options)
    t.fit(steps=steps)
    return {"weights": weights(model), "loss": t.history.steps["loss"], "batch_size": t.history.steps["batch_size"],
            "examples": t.examples_seen, "world": t.world_size, "rank": t.rank}


def assert_same_run(a, b, atol=1e-6):
    assert a["batch_size"] == b["batch_size"] and a["examples"] == b["examples"]
    for p, q in zip(a["weights"], b["weights"]):
        torch.testing.assert_close(p, q, rtol=0, atol=atol)
    torch.testing.assert_close(torch.tensor(a["loss"]), torch.tensor(b["loss"]), rtol=0, atol=atol)


# ---------------------------------------------------------------------------- equivalence
CASES = [
    dict(batch_size=32, steps=9),                                  # 200 % 32 = 8: an uneven last batch (4 + 4)
    dict(batch_size=40, steps=7, accumulate=2),                    # accumulation: no_sync on the first micro-batch
    dict(batch_size=48, steps=6, as_dataset=True, n=150),          # the map-style Dataset path; last batch 6 -> 3 + 3
    dict(batch_size=64, steps=5, data_on_device=False, new_group=True),   # a ProcessGroup object given explicitly
    dict(batch_size=40, steps=6, checkpoint_segments=2, noise_scale_every=2),   # checkpointed forward under DDP;
                                                                   # measured steps split in two halves
]


def run_cases(cases):
    return [run(**case) for case in cases]


def test_two_processes_equal_one_process_at_the_same_global_batch():
    """2 gloo processes with batch_size 2B reach the weights of one process with batch_size 2B (no BN)."""
    two = launch(run_cases, nprocs=2, args=(CASES,), timeout=TIMEOUT)     # [rank][case]
    for i, case in enumerate(CASES):
        one = run(**case)
        assert one["world"] == 1
        assert [two[r][i]["rank"] for r in (0, 1)] == [0, 1] and all(two[r][i]["world"] == 2 for r in (0, 1))
        for r in (0, 1):
            assert_same_run(two[r][i], one)
        for p, q in zip(two[0][i]["weights"], two[1][i]["weights"]):
            assert torch.equal(p, q)          # the ranks never drift apart: identical all-reduced gradients
        assert sum(one["batch_size"]) == one["examples"]
        uneven = case.get("n", 200) % case["batch_size"] > 0
        assert (min(one["batch_size"]) < case["batch_size"]) == uneven    # the short last batch was split too


def test_shares_are_disjoint_and_cover_each_global_batch():
    x, y = torch.arange(23.0).unsqueeze(1), torch.arange(23)
    inner = TensorBatches(x, y, torch.device("cpu"), batch_size=8, drop_last=False, seed=5)
    for world in (1, 2, 3):
        shards = [ShardedTensorBatches(TensorBatches(x, y, torch.device("cpu"), 8, False, 5), r, world)
                  for r in range(world)]
        for epoch in (0, 1):
            whole = [yb for _, yb in inner.batches(epoch)]
            parts = [[yb for _, yb in s.batches(epoch)] for s in shards]
            for i, global_batch in enumerate(whole):
                pieces = [p[i] for p in parts]
                assert torch.equal(torch.cat(pieces), global_batch)          # disjoint, complete, in order
                assert max(len(p) for p in pieces) - min(len(p) for p in pieces) <= 1
            assert torch.equal(torch.cat(whole), y[epoch_permutation(23, 5, epoch)])
        assert shards[0].last_global_n == 23 % 8


# ---------------------------------------------------------------------------- checkpoints and resume
def resume_part(path, steps, save_at=None, save_on_all=True):
    """Uninterrupted (save_at=None, path=None), or train to save_at, save, and resume to steps."""
    torch.set_num_threads(1)
    x, y = toy_data()
    model = make_mlp(seed=1)
    t = Trainer(model, (x, y), batch_size=32, lr=0.2, optimizer="momentum", seed=3)
    out = {}
    if save_at is not None:
        t.fit(steps=save_at)
        if nbdist.rank() == 0 or save_on_all:
            t.save(path)                           # rank 0 writes; elsewhere save() returns at once
        model = make_mlp(seed=2)                   # other weights: everything must come from the file
        t = Trainer.load(path, model, (x, y))      # waits for every rank, so the file is complete
        out["written"] = os.path.exists(path)
    elif path is not None:
        t = Trainer.load(path, model, (x, y))
    t.fit(steps=steps - t.step_count)
    out.update({"weights": weights(model), "loss": t.history.steps["loss"], "batch_size": t.history.steps["batch_size"],
                "examples": t.examples_seen, "step": t.step_count, "world": t.world_size})
    return out


def test_checkpoint_written_by_rank_0_resumes_on_another_world_size(tmp_path):
    """A distributed run saved and resumed (on 2 and on 1 processes) matches an uninterrupted one."""
    ck = str(tmp_path / "run.pt")
    full = resume_part(None, 14)                                                 # one process, uninterrupted
    two = launch(resume_part, nprocs=2, args=(ck, 14), kwargs={"save_at": 5}, timeout=TIMEOUT)
    assert [r["written"] for r in two] == [True, True]
    guarded = launch(resume_part, nprocs=2, args=(str(tmp_path / "rank0.pt"), 14),
                     kwargs={"save_at": 5, "save_on_all": False}, timeout=TIMEOUT)   # `if rank == 0: save`
    os.unlink(tmp_path / "rank0.pt")
    assert os.listdir(tmp_path) == ["run.pt"]                                   # no temporary file left
    state = torch.load(ck, weights_only=True)
    assert not any(k.startswith("module.") for k in state["model"])             # the plain model, not DDP's
    assert state["progress"]["step"] == 5 and state["progress"]["examples"] == 160
    one = resume_part(ck, 14)                                                    # resumed on a different world size
    for r in (*two, *guarded, one):
        assert r["step"] == 14 and r["world"] in (1, 2)
        assert_same_run(r, full)


# ---------------------------------------------------------------------------- stopping, callbacks
def stop_from_rank0_callback():
    torch.set_num_threads(1)
    x, y = toy_data()
    model = make_mlp()
    t = Trainer(model, (x, y), batch_size=32, lr=0.2, optimizer="momentum", seed=3)
    calls = []

    def cb(trainer, row):
        calls.append(row["step"])
        print(f"step {row['step']}")
        if row["step"] == 3:
            trainer.request_stop()
    t.add_callback("step_end", cb)
    t.fit(steps=9)
    stopped = (t.step_count, len(calls), t.history.events[-1]["event"])
    t.remove_callback("step_end", cb)
    t.fit()                                  # a stop is a pause: continue to the planned end
    return stopped, {"weights": weights(model), "loss": t.history.steps["loss"],
                     "batch_size": t.history.steps["batch_size"], "examples": t.examples_seen}


def test_a_stop_from_rank_0_stops_every_rank_and_only_rank_0_runs_callbacks(capsys):
    res = launch(stop_from_rank0_callback, nprocs=2, timeout=TIMEOUT)
    assert [r[0] for r in res] == [(3, 3, "stopped"), (3, 0, "stopped")]
    assert capsys.readouterr().out == "step 1\nstep 2\nstep 3\n"     # rank 0's prints, once
    uninterrupted = run(batch_size=32, steps=9)
    for _, continued in res:                                          # the stopped step was not half applied
        assert_same_run(continued, uninterrupted)


# ---------------------------------------------------------------------------- bad input
def build(batch_size=32, rank_lr=False, drop_last=False, n=200, accumulate=1, loader=False, sync_bn=False,
          rank_data=False):
    torch.set_num_threads(1)
    x, y = toy_data(n)
    if rank_data:
        x = x + nbdist.rank()          # each rank loaded different data
    lr = 0.1 * (1 + nbdist.rank()) if rank_lr else 0.1
    data = DataLoader(TensorDataset(x, y), batch_size=batch_size) if loader else (x, y)
    model = nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)) if sync_bn else make_mlp()
    options = {"distributed": Distributed(sync_batchnorm=True)} if sync_bn else {}
    Trainer(model, data, batch_size=batch_size, lr=lr, drop_last=drop_last, accumulate=accumulate, **options)
    return "built"


BAD = [
    (dict(batch_size=1), "fewer than one example (per-process batch 1/2 < 1)"),
    (dict(batch_size=33), "batch_size=33 does not split evenly over world_size=2"),
    (dict(batch_size=32, n=193), "the last batch of each epoch holds 1 example(s)"),
    (dict(batch_size=8, accumulate=8), "accumulate=8 splits the per-process batch of 4 examples"),
    (dict(loader=True), "a DataLoader's batches cannot be split across processes"),
    (dict(rank_lr=True), "rank 1 has lr=0.2 where rank 0 has 0.1"),
    (dict(rank_data=True), "rank 1 has train_data_sums="),
    (dict(sync_bn=True), "sync_batchnorm=True needs CUDA devices"),
    (dict(batch_size=32, n=193, drop_last=True), None),            # the same run split sensibly is fine
]


def build_all(cases):
    """Each bad run raises on every rank (none waits for ever); returns (type name, message) per case."""
    out = []
    for kwargs, _ in cases:
        try:
            out.append(("built", build(**kwargs)))
        except ValueError as err:
            out.append((type(err).__name__, str(err)))
    return out


def test_bad_distributed_runs_fail_clearly_and_rank_0_reports():
    rank0, rank1 = launch(build_all, nprocs=2, args=(BAD,), timeout=TIMEOUT)
    for (kind0, text0), (kind1, text1), (_, message) in zip(rank0, rank1, BAD):
        if message is None:
            assert kind0 == kind1 == "built"
            continue
        assert kind0 == "ValueError" and message in text0
        assert kind1 == "ReportedByRank0"          # the others defer to rank 0's report
    with pytest.raises(LaunchError) as info:   # through the launcher: rank 0's full report is raised
        launch(build, nprocs=2, kwargs=dict(rank_lr=True), timeout=TIMEOUT)
    assert info.value.rank == 0 and "rank 1 has lr=0.2 where rank 0 has 0.1" in str(info.value)
    assert multiprocessing.active_children() == []


def test_single_process_modes():
    x, y = toy_data()
    assert Trainer(make_mlp(), (x, y), batch_size=32).world_size == 1            # 'auto' outside a group
    assert Trainer(make_mlp(), (x, y), batch_size=32, distributed=False).is_main_process
    with pytest.raises(ValueError, match="distributed='ddp' is not known"):
        Trainer(make_mlp(), (x, y), distributed="ddp")
    with pytest.raises(TypeError, match="distributed must be"):
        Trainer(make_mlp(), (x, y), distributed=3)
    with pytest.raises(ValueError, match="no process group is initialised and this is not a torchrun worker"):
        Trainer(make_mlp(), (x, y), distributed=True)
    with pytest.raises(ValueError, match="backend='mpx' is not known"):
        Distributed(backend="mpx")


# ---------------------------------------------------------------------------- the launcher
MAIN_SOURCE = '''
import torch.distributed as dist
SCALE = 10

def main_fn(offset):
    return dist.get_rank() * SCALE + offset, dist.get_world_size()
'''


def test_launch_ships_functions_defined_in_main():
    """A notebook cell's function lives in __main__, which a spawned worker cannot import."""
    namespace = {"__name__": "__main__"}
    exec(compile(MAIN_SOURCE, "<cell>", "exec"), namespace)
    fn = namespace["main_fn"]
    assert fn.__module__ == "__main__"
    assert launch(fn, nprocs=2, args=(1,), timeout=TIMEOUT) == [(1, 2), (11, 2)]
    assert multiprocessing.active_children() == []


def raise_on_rank_1():
    import torch.distributed as dist
    if dist.get_rank() == 1:
        raise RuntimeError("boom on rank 1")
    dist.barrier()          # rank 0 would wait here for ever
    return "never"


def die_on_rank_1():
    import torch.distributed as dist
    if dist.get_rank() == 1:
        os._exit(7)
    dist.barrier()
    return "never"


def sleep_long():
    time.sleep(120)


@pytest.mark.parametrize("fn,expected", [
    (raise_on_rank_1, "rank 1 of 2 raised"),
    (die_on_rank_1, "rank 1 of 2 died with exit code 7"),
])
def test_a_failing_worker_stops_the_others_and_raises(fn, expected):
    t0 = time.monotonic()
    with pytest.raises(LaunchError) as info:
        launch(fn, nprocs=2, timeout=TIMEOUT, grace=1.0)
    assert expected in str(info.value)
    assert info.value.rank == 1
    if fn is raise_on_rank_1:
        assert "boom on rank 1" in info.value.remote_traceback and "Traceback" in info.value.remote_traceback
    else:
        assert info.value.exitcode == 7
    assert multiprocessing.active_children() == []            # nothing left running
    assert time.monotonic() - t0 < TIMEOUT / 2                  # stopped, not waited out


def test_launch_timeout_stops_everything():
    with pytest.raises(TimeoutError, match="had not finished after timeout=3"):
        launch(sleep_long, nprocs=2, timeout=3)
    assert multiprocessing.active_children() == []


def test_launch_rejects_bad_arguments_and_a_busy_port(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(ValueError, match=f"port={port} on 127.0.0.1 is already in use"):
            launch(sleep_long, nprocs=2, port=port)
    for kwargs, message in [(dict(nprocs=0), "nprocs must be a positive int"),
                            (dict(backend="tcp"), "backend='tcp' is not known"),
                            (dict(print_output="some"), "print_output='some' is not known"),
                            (dict(port=70000), "port must be an int in 1..65535"),
                            (dict(threads=0), "threads must be a positive int"),
                            (dict(start_method="thread"), "start_method='thread' is not known"),
                            (dict(timeout=float("inf")), "timeout must be a finite number of seconds > 0"),
                            (dict(timeout=True), "timeout must be a finite number of seconds > 0"),
                            (dict(timeout="60"), "timeout must be a finite number of seconds > 0"),
                            (dict(grace=None), "grace must be a finite number of seconds >= 0"),
                            (dict(grace=-1.0), "grace must be a finite number of seconds >= 0"),
                            (dict(host=None), "host=None is not an address of this machine"),
                            (dict(host=None, port=29999), "host=None is not an address of this machine")]:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
            launch(sleep_long, **kwargs)
    with pytest.raises(TypeError, match="fn must be callable"):
        launch(3)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.raises(RuntimeError, match="CUDA is already initialised in this process"):
        launch(sleep_long, nprocs=2, start_method="fork")
    assert multiprocessing.active_children() == []


# ---------------------------------------------------------------------------- torchrun
def test_cli_train_runs_unchanged_under_torchrun(tmp_path):
    """`nbbatch train` under torchrun (2 CPU processes) trains like one process at the same batch."""
    env = {**os.environ, "NBBATCH_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
           **({"GLOO_SOCKET_IFNAME": nbdist._loopback_interface()} if nbdist._loopback_interface() else {}),
           "PYTHONPATH": os.pathsep.join([str(os.path.dirname(os.path.dirname(nbdist.__file__))),
                                          os.environ.get("PYTHONPATH", "")])}
    args = ["train", "--dataset", "digits", "--batch-size", "128", "--epochs", "1", "--lr", "0.1",
            "--device", "cpu", "--threads", "1"]
    rendezvous = ["--nnodes", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{nbdist.free_port()}"]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", *rendezvous, "--nproc-per-node", "2",
                          "-m", "nbbatch.cli", *args, "--save", str(tmp_path / "two.pt")],
                         capture_output=True, text=True, env=env, timeout=TIMEOUT)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "nbbatch.cli", *args, "--save", str(tmp_path / "one.pt")],
                         capture_output=True, text=True, env=env, timeout=TIMEOUT)
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.stdout.count("final test accuracy") == 1           # rank 0 prints, once
    assert two.stdout.count("checkpoint written") == 1
    table = [line for line in two.stdout.splitlines() if line.startswith(" 1.00")]
    assert len(table) == 1
    a = torch.load(tmp_path / "two.pt", weights_only=True)
    b = torch.load(tmp_path / "one.pt", weights_only=True)
    assert a["progress"]["examples"] == b["progress"]["examples"] == 1797 - 360   # digits' training split
    for k in b["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=1e-5)
    assert a["history"] is not None


# ---------------------------------------------------------------------------- one process
def test_single_process_has_the_data_parallel_interface_and_every_call_is_a_no_op():
    import inspect

    from nbbatch.distributed import DistContext, SingleProcess

    ctx = SingleProcess()
    for name, member in vars(DistContext).items():   # what a Trainer may call on either
        if name.startswith("_"):
            continue
        assert hasattr(ctx, name), name
        if inspect.isfunction(member):
            assert inspect.signature(getattr(SingleProcess, name)).parameters.keys() == \
                inspect.signature(member).parameters.keys(), name
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.data_parallel, DistContext.data_parallel) == (0, 1, True, False, True)
    model, source, cpu = nn.Linear(2, 2), object(), torch.device("cpu")
    assert ctx.convert_batchnorm(model) is model and ctx.wrap(model, cpu) is model and ctx.shard(source) is source
    assert ctx.pick_device("auto", cpu) is cpu and ctx.shared_seed(7) == 7 and ctx.shared_generator(7, 3, cpu) is None
    assert ctx.check(None, 10, model, cpu, "tensors") is None and ctx.barrier() is None
    assert ctx.global_batch_size(source, torch.zeros(5, 2)) == 5
    with ctx.sync_context(model, last=False):
        model(torch.ones(1, 2)).sum().backward()     # no DDP: the gradients are there at once
    assert model.weight.grad is not None
    loss = torch.tensor(0.25)
    ctx.attach(loss, stop=True)                      # one process stops between steps, never in one
    assert ctx.collect() == (loss, False) and ctx.collect() == (None, False)


def test_a_trainer_without_data_parallelism_is_rank_0_of_1():
    x, y = toy_data()
    t = Trainer(make_mlp(), (x, y), batch_size=20, distributed=False)
    assert (t.rank, t.world_size, t.is_main_process) == (0, 1, True)
