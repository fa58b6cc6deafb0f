import copy
import math

import pytest
import torch
import torch.nn.functional as F

from helpers import make_mlp, requires_cuda
from nbbatch import Trainer
from nbbatch.batching import epoch_permutation
from nbbatch.optim import LAMB, LARS, add_gradient_noise, gradient_noise_std


def param(*values):
    return torch.nn.Parameter(torch.tensor(values, dtype=torch.float64))


def step_with(opt, p, *grad):
    p.grad = torch.tensor(grad, dtype=p.dtype)
    opt.step()


# ---------------------------------------------------------------------------- LARS
def test_lars_one_step_by_hand():
    w = param(3.0, 4.0)                                        # |w| = 5
    opt = LARS([w], lr=1.0, momentum=0.0, trust_coefficient=0.1)
    step_with(opt, w, 0.0, 1.0)                                # |g| = 1, ratio 0.1 * 5 / 1 = 0.5
    torch.testing.assert_close(w.detach(), torch.tensor([3.0, 3.5], dtype=torch.float64))


def test_lars_weight_decay_enters_the_ratio_and_the_direction():
    w = param(3.0, 4.0)
    opt = LARS([w], lr=2.0, momentum=0.0, weight_decay=0.2, trust_coefficient=0.1)
    step_with(opt, w, 0.0, 1.0)
    # ratio = 0.1 * 5 / (1 + 0.2 * 5) = 0.25; d = g + 0.2 w = (0.6, 1.8); step = 2 * 0.25 * d
    torch.testing.assert_close(w.detach(), torch.tensor([3.0 - 0.3, 4.0 - 0.9], dtype=torch.float64))


def test_lars_momentum_keeps_lr_times_ratio_in_the_buffer():
    w = param(3.0, 4.0)
    opt = LARS([w], lr=1.0, momentum=0.5, trust_coefficient=0.1)
    step_with(opt, w, 0.0, 1.0)                                # v1 = 0.5 * (0, 1); w = (3, 3.5)
    step_with(opt, w, 1.0, 0.0)
    ratio2 = 0.1 * math.hypot(3.0, 3.5) / 1.0
    v2 = (0.5 * 0.0 + ratio2 * 1.0, 0.5 * 0.5 + ratio2 * 0.0)
    torch.testing.assert_close(w.detach(), torch.tensor([3.0 - v2[0], 3.5 - v2[1]], dtype=torch.float64))
    torch.testing.assert_close(opt.state[w]["momentum_buffer"], torch.tensor(v2, dtype=torch.float64))


@pytest.mark.parametrize("w0,g", [((0.0, 0.0), (1.0, 2.0)), ((3.0, 4.0), (0.0, 0.0))])
def test_lars_ratio_is_one_when_a_norm_is_zero(w0, g):
    w = param(*w0)
    opt = LARS([w], lr=0.1, momentum=0.0, weight_decay=0.5, trust_coefficient=0.001)
    step_with(opt, w, *g)
    d = torch.tensor(g, dtype=torch.float64) + 0.5 * torch.tensor(w0, dtype=torch.float64)
    torch.testing.assert_close(w.detach(), torch.tensor(w0, dtype=torch.float64) - 0.1 * d)


def test_lars_ratios_are_per_layer_over_several_steps():
    """Two tensors of very different scale, five steps, against the formula written out."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 3, generator=g) * 10, torch.randn(3, generator=g) * 0.01
    pa, pb = torch.nn.Parameter(a.clone()), torch.nn.Parameter(b.clone())
    opt = LARS([pa, pb], lr=0.5, momentum=0.9, weight_decay=1e-3, trust_coefficient=0.02)
    ref = [a.clone(), b.clone()]
    bufs = [None, None]
    for _ in range(5):
        grads = [torch.randn(4, 3, generator=g), torch.randn(3, generator=g)]
        pa.grad, pb.grad = grads[0].clone(), grads[1].clone()
        opt.step()
        for i, (w, gr) in enumerate(zip(ref, grads)):
            ratio = 0.02 * w.norm() / (gr.norm() + 1e-3 * w.norm())
            d = 0.5 * ratio * (gr + 1e-3 * w)
            bufs[i] = d if bufs[i] is None else 0.9 * bufs[i] + d
            ref[i] = w - bufs[i]
    torch.testing.assert_close(pa.detach(), ref[0])
    torch.testing.assert_close(pb.detach(), ref[1])


def test_lars_without_adaptation_is_torch_sgd():
    model = make_mlp()
    ref = copy.deepcopy(model)
    opt = LARS([{"params": model.parameters(), "adapt": False}], lr=0.05, momentum=0.9, weight_decay=1e-2)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-2)
    x, y = torch.randn(32, 8, generator=torch.Generator().manual_seed(1)), torch.arange(32) % 3
    for _ in range(4):
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------- LAMB
def test_lamb_first_step_is_the_layer_norm_along_the_sign():
    w = param(3.0, 4.0)
    opt = LAMB([w], lr=0.1, eps=1e-12)
    step_with(opt, w, 1.0, -1.0)                               # m_hat = g, v_hat = g^2: r = sign(g)
    s = 0.1 * 5.0 / math.sqrt(2.0)
    torch.testing.assert_close(w.detach(), torch.tensor([3.0 - s, 4.0 + s], dtype=torch.float64))


def test_lamb_weight_decay_and_trust_clamp():
    w = param(3.0, 4.0)
    opt = LAMB([w], lr=0.1, eps=1e-12, weight_decay=0.1, max_trust=2.0)
    step_with(opt, w, 1.0, -1.0)
    u = torch.tensor([1.0 + 0.3, -1.0 + 0.4], dtype=torch.float64)   # r + lambda * w
    expected = torch.tensor([3.0, 4.0], dtype=torch.float64) - 0.1 * min(5.0, 2.0) / u.norm() * u
    torch.testing.assert_close(w.detach(), expected)


def test_lamb_zero_weights_take_the_plain_step():
    w = param(0.0, 0.0)
    opt = LAMB([w], lr=0.1, eps=1e-12)
    step_with(opt, w, 2.0, -0.5)
    torch.testing.assert_close(w.detach(), torch.tensor([-0.1, 0.1], dtype=torch.float64))


@pytest.mark.parametrize("bias_correction", [True, False])
def test_lamb_several_steps_against_the_formula(bias_correction):
    g = torch.Generator().manual_seed(2)
    ws = [torch.randn(5, 2, generator=g), torch.randn(2, generator=g) * 0.1]
    params = [torch.nn.Parameter(w.clone()) for w in ws]
    b1, b2, eps, lam, lr = 0.8, 0.95, 1e-6, 0.01, 0.02
    opt = LAMB(params, lr=lr, betas=(b1, b2), eps=eps, weight_decay=lam, bias_correction=bias_correction)
    ms = [torch.zeros_like(w) for w in ws]
    vs = [torch.zeros_like(w) for w in ws]
    for t in range(1, 7):
        grads = [torch.randn(w.shape, generator=g) for w in ws]
        for p, gr in zip(params, grads):
            p.grad = gr.clone()
        opt.step()
        for i, gr in enumerate(grads):
            ms[i] = b1 * ms[i] + (1 - b1) * gr
            vs[i] = b2 * vs[i] + (1 - b2) * gr ** 2
            m_hat = ms[i] / (1 - b1 ** t) if bias_correction else ms[i]
            v_hat = vs[i] / (1 - b2 ** t) if bias_correction else vs[i]
            u = m_hat / (v_hat.sqrt() + eps) + lam * ws[i]
            ws[i] = ws[i] - lr * ws[i].norm() / u.norm() * u
    for p, w in zip(params, ws):
        torch.testing.assert_close(p.detach(), w, rtol=1e-5, atol=1e-6)


def test_lamb_without_adaptation_is_torch_adamw():
    model = make_mlp()
    ref = copy.deepcopy(model)
    opt = LAMB([{"params": model.parameters(), "adapt": False}], lr=0.01, eps=1e-8, weight_decay=0.1)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=0.01, eps=1e-8, weight_decay=0.1)
    x, y = torch.randn(32, 8, generator=torch.Generator().manual_seed(1)), torch.arange(32) % 3
    for _ in range(5):
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- bad hyperparameters
@pytest.mark.parametrize("cls,kwargs,name", [
    (LARS, {"lr": -0.1}, "lr"),
    (LARS, {"momentum": 1.0}, "momentum"),
    (LARS, {"weight_decay": -1e-4}, "weight_decay"),
    (LARS, {"trust_coefficient": 0.0}, "trust_coefficient"),
    (LARS, {"eps": float("nan")}, "eps"),
    (LARS, {"lr": True}, "lr"),
    (LAMB, {"lr": float("inf")}, "lr"),
    (LAMB, {"betas": (0.9, 1.0)}, r"betas\[1\]"),
    (LAMB, {"betas": (-0.1, 0.9)}, r"betas\[0\]"),
    (LAMB, {"betas": 0.9}, "betas"),
    (LAMB, {"eps": 0.0}, "eps"),
    (LAMB, {"weight_decay": -1.0}, "weight_decay"),
    (LAMB, {"max_trust": 0.0}, "max_trust"),
])
def test_invalid_hyperparameters_name_the_parameter(cls, kwargs, name):
    with pytest.raises(ValueError, match=name):
        cls([torch.nn.Parameter(torch.zeros(2))], **kwargs)


def test_lamb_bias_correction_must_be_bool():
    with pytest.raises(TypeError, match="bias_correction"):
        LAMB([torch.nn.Parameter(torch.zeros(2))], bias_correction="yes")


# ---------------------------------------------------------------------------- in the Trainer
@pytest.mark.parametrize("name,cls", [("lars", LARS), ("lamb", LAMB)])
def test_trainer_builds_them_by_name_and_steps_like_the_optimizer(toy, name, cls):
    x, y = toy
    model = make_mlp()
    ref = copy.deepcopy(model)
    t = Trainer(model, (x, y), batch_size=32, lr=0.5 if name == "lars" else 0.01, optimizer=name,
                weight_decay=1e-3, seed=4, adapt_all=True, **({} if name == "lars" else {"eps": 1e-8}))
    assert isinstance(t.optimizer, cls)
    ref_opt = cls(ref.parameters(), lr=t.peak_lr, weight_decay=1e-3,
                  **({"momentum": 0.9} if name == "lars" else {"eps": 1e-8}))
    perm = epoch_permutation(len(x), 4, 0)
    for i in range(3):
        t.step()
        idx = perm[32 * i:32 * (i + 1)]
        ref_opt.zero_grad()
        F.cross_entropy(ref(x[idx]), y[idx]).backward()
        ref_opt.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["lars", "lamb"])
def test_trainer_resume_with_lars_and_lamb_is_exact(toy, tmp_path, name):
    x, y = toy
    lr = 2.0 if name == "lars" else 0.01
    full = Trainer(make_mlp(), (x, y), batch_size=32, lr=lr, optimizer=name, seed=1)
    full.fit(steps=8)
    first = Trainer(make_mlp(), (x, y), batch_size=32, lr=lr, optimizer=name, seed=1)
    first.fit(steps=4)
    first.save(tmp_path / "ck.pt")
    resumed = Trainer.load(tmp_path / "ck.pt", make_mlp(), (x, y))
    resumed.fit(steps=4)
    assert resumed.history.steps["loss"] == full.history.steps["loss"]
    for p, q in zip(resumed.model.parameters(), full.model.parameters()):
        assert torch.equal(p, q)


# ---------------------------------------------------------------------------- gradient noise
def test_gradient_noise_std_formula_and_errors():
    assert gradient_noise_std(0, 0.3) == pytest.approx(math.sqrt(0.3))
    assert gradient_noise_std(9, 1.0, 0.55) == pytest.approx(math.sqrt(1.0 / 10 ** 0.55))
    assert gradient_noise_std(5, 0.0) == 0.0
    for kwargs, name in (({"step": -1, "eta": 1.0}, "step"), ({"step": 1.5, "eta": 1.0}, "step"),
                         ({"step": 0, "eta": -1.0}, "eta"), ({"step": 0, "eta": 1.0, "gamma": -0.1}, "gamma")):
        with pytest.raises(ValueError, match=name):
            gradient_noise_std(**kwargs)


def test_add_gradient_noise_has_the_requested_variance():
    p = torch.nn.Parameter(torch.zeros(200, 100))
    p.grad = torch.full((200, 100), 3.0)
    q = torch.nn.Parameter(torch.zeros(3))                      # no grad: left alone
    add_gradient_noise([p, q], 0.2, torch.Generator().manual_seed(0))
    noise = p.grad - 3.0
    assert noise.mean().item() == pytest.approx(0.0, abs=0.01)
    assert noise.var().item() == pytest.approx(0.04, rel=0.03)   # 20000 draws: sd of the estimate ~1%
    assert q.grad is None
    with pytest.raises(ValueError, match="std"):
        add_gradient_noise([p], -1.0)


class RecordingSGD(torch.optim.SGD):
    """SGD that keeps a copy of the gradients it is given."""

    def __init__(self, params, lr):
        super().__init__(params, lr=lr)
        self.seen = []

    def step(self, closure=None):
        self.seen.append(torch.cat([p.grad.flatten().clone() for g in self.param_groups for p in g["params"]]))
        return super().step(closure)


def test_trainer_injects_noise_of_variance_eta_over_1_plus_t_to_the_gamma(toy):
    """lr = 0 keeps the weights fixed, so both runs compute the same gradients: the difference is the noise."""
    x, y = toy
    runs = []
    for eta in (0.0, 0.5):
        model = make_mlp(hidden=400)                              # ~5000 parameters
        t = Trainer(model, (x, y), batch_size=50, lr=0.0, optimizer=RecordingSGD, grad_noise=eta,
                    grad_noise_gamma=0.55, seed=0)
        t.fit(steps=8)
        runs.append(t.optimizer.seen)
    n = runs[0][0].numel()
    for step, (plain, noisy) in enumerate(zip(*runs)):
        noise = noisy - plain
        expected = 0.5 / (1 + step) ** 0.55
        assert noise.var().item() == pytest.approx(expected, rel=6 / math.sqrt(n))
        assert abs(noise.mean().item()) < 6 * math.sqrt(expected / n)


def test_noise_off_by_default_changes_nothing(toy):
    x, y = toy
    a, b = make_mlp(), make_mlp()
    ta = Trainer(a, (x, y), batch_size=32, lr=0.1, optimizer="momentum", seed=2)
    tb = Trainer(b, (x, y), batch_size=32, lr=0.1, optimizer="momentum", seed=2, grad_noise=0.0)
    assert ta.config.grad_noise == 0.0
    rng = torch.get_rng_state()
    ta.fit(steps=6)
    assert torch.equal(torch.get_rng_state(), rng)             # no random draws when off
    tb.fit(steps=6)
    assert ta.history.steps["loss"] == tb.history.steps["loss"]
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("options,match", [
    ({"grad_noise": -0.1}, "grad_noise"), ({"grad_noise": float("nan")}, "grad_noise"),
    ({"grad_noise_gamma": -1.0}, "grad_noise_gamma"), ({"optimizer": "lbfgs"}, "optimizer"),
])
def test_bad_noise_and_optimizer_options_are_refused_before_any_change(toy, options, match):
    model = make_mlp()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=match):
        Trainer(model, toy, batch_size=32, **options)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


# ---------------------------------------------------------------------------- GPU
@requires_cuda
@pytest.mark.parametrize("cls,kwargs", [(LARS, {"lr": 0.5, "weight_decay": 1e-3}), (LAMB, {"lr": 0.01, "weight_decay": 0.01})])
def test_cuda_steps_match_the_cpu(cls, kwargs):
    cpu = make_mlp()
    gpu = copy.deepcopy(cpu).cuda()
    opts = cls(cpu.parameters(), **kwargs), cls(gpu.parameters(), **kwargs)
    x, y = torch.randn(32, 8, generator=torch.Generator().manual_seed(1)), torch.arange(32) % 3
    for _ in range(3):
        for m, o, dev in ((cpu, opts[0], "cpu"), (gpu, opts[1], "cuda")):
            o.zero_grad()
            F.cross_entropy(m(x.to(dev)), y.to(dev)).backward()
            o.step()
    for p, q in zip(cpu.parameters(), gpu.parameters()):
        torch.testing.assert_close(p, q.cpu(), rtol=1e-4, atol=1e-5)


@requires_cuda
def test_cuda_trainer_with_gradient_noise_trains(toy):
    x, y = toy
    t = Trainer(make_mlp(), (x, y), batch_size=32, lr=0.01, optimizer="lamb", grad_noise=0.01, device="cuda",
                precision="fp32", seed=0)
    t.fit(epochs=3)
    assert t.history.steps["loss"][-1] < t.history.steps["loss"][0]


def test_resume_with_gradient_noise_is_exact(toy, tmp_path):
    """The noise comes from torch's global generator, whose state the checkpoint keeps."""
    x, y = toy
    options = dict(batch_size=32, lr=0.1, optimizer="momentum", grad_noise=0.05, seed=3)
    full = Trainer(make_mlp(), (x, y), **options)
    full.fit(steps=10)
    first = Trainer(make_mlp(), (x, y), **options)
    first.fit(steps=4)
    first.save(tmp_path / "ck.pt")
    torch.manual_seed(123)                                    # disturb the global generator in between
    resumed = Trainer.load(tmp_path / "ck.pt", make_mlp(), (x, y))
    resumed.fit(steps=6)
    assert resumed.history.steps["loss"] == full.history.steps["loss"]
    for p, q in zip(resumed.model.parameters(), full.model.parameters()):
        assert torch.equal(p, q)
