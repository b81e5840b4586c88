"""Loss, optimizers (short names, import paths, k=v args, Adafactor relative_step), schedulers (closed forms)."""

import math

import pytest
import torch

from engine.errors import MusubiInputError
from engine.training.loss import flow_matching_loss, noisy_latents, velocity_target
from engine.training.optimizers import OptimizerConfig, build_optimizer, parse_kwargs
from engine.training.schedulers import SCHEDULERS, build_scheduler, resolve_steps


def params(n=2):
    torch.manual_seed(0)
    return [(f"lora_up.{i}", torch.nn.Parameter(torch.randn(4, 3))) for i in range(n)]


def one_step(opt, named):
    loss = sum((p ** 2).sum() for _, p in named)
    loss.backward()
    opt.step()
    opt.zero_grad()


# --- loss -------------------------------------------------------------------------------------------------------

def test_noisy_latents_and_target():
    x0, eps = torch.randn(2, 4, 1, 2, 2), torch.randn(2, 4, 1, 2, 2)
    t = torch.tensor([0.0, 1.0])
    xt = noisy_latents(x0, eps, t)
    assert torch.equal(xt[0], x0[0]) and torch.equal(xt[1], eps[1])
    mid = noisy_latents(x0, eps, torch.tensor([0.25, 0.25]))
    assert torch.allclose(mid, 0.75 * x0 + 0.25 * eps)
    assert torch.equal(velocity_target(x0, eps), eps - x0)


def test_loss_mean_and_weights():
    pred, target = torch.zeros(2, 3, 1, 1, 1), torch.ones(2, 3, 1, 1, 1)
    target[1] *= 2
    assert flow_matching_loss(pred, target).item() == pytest.approx((3 * 1 + 3 * 4) / 6)
    w = torch.tensor([2.0, 0.5])
    assert flow_matching_loss(pred, target, w).item() == pytest.approx((3 * 2 + 3 * 4 * 0.5) / 6)


# --- optimizers ----------------------------------------------------------------------------------------------

def test_parse_kwargs():
    assert parse_kwargs(["weight_decay=0.01", "betas=(0.9,0.99)", "decouple=True", "mode=fast"]) == {
        "weight_decay": 0.01, "betas": (0.9, 0.99), "decouple": True, "mode": "fast"}
    assert parse_kwargs("weight_decay=0.1 eps=1e-6") == {"weight_decay": 0.1, "eps": 1e-6}
    assert parse_kwargs({"a": 1}) == {"a": 1}
    with pytest.raises(MusubiInputError, match="optimizer_args"):
        parse_kwargs(["weight_decay"])


@pytest.mark.parametrize("name,cls", [("AdamW", "torch.optim.adamw.AdamW"), ("adamw", "torch.optim.adamw.AdamW"),
                                      ("torch.optim.SGD", "torch.optim.sgd.SGD"), ("SGD", "torch.optim.sgd.SGD"),
                                      ("Prodigy", "prodigyopt.prodigy.Prodigy")])
def test_optimizers_construct_and_step(name, cls):
    named = params()
    before = named[0][1].detach().clone()
    built = build_optimizer(named, OptimizerConfig(optimizer_type=name, learning_rate=0.1,
                                                   optimizer_args=["weight_decay=0.0"]))
    assert built.name == cls
    one_step(built.optimizer, named)
    assert not torch.equal(before, named[0][1])


def test_adamw_args_reach_the_optimizer():
    built = build_optimizer(params(), OptimizerConfig(learning_rate=1e-3, optimizer_args=["betas=(0.8,0.9)"]))
    assert built.optimizer.param_groups[0]["betas"] == (0.8, 0.9)
    assert built.optimizer.param_groups[0]["lr"] == 1e-3


def test_adafactor_relative_step_forces_adafactor_scheduler():
    named = params()
    built = build_optimizer(named, OptimizerConfig(optimizer_type="Adafactor", learning_rate=1e-4))
    assert built.forced_scheduler == "adafactor:0.0001"
    sched = build_scheduler(built.optimizer, OptimizerConfig(learning_rate=1e-4), 10, built.forced_scheduler)
    assert type(sched).__name__ == "AdafactorSchedule"
    one_step(built.optimizer, named)
    sched.step()
    assert sched.get_last_lr()[0] > 0
    fixed = build_optimizer(params(), OptimizerConfig(optimizer_type="Adafactor", learning_rate=1e-4,
                                                      optimizer_args=["relative_step=False", "scale_parameter=False"]))
    assert fixed.forced_scheduler is None and fixed.optimizer.param_groups[0]["lr"] == 1e-4


def test_adamw8bit_missing_bitsandbytes_is_a_clear_error():
    try:
        import bitsandbytes  # noqa: F401
        pytest.skip("bitsandbytes installed: the missing-package message cannot be exercised")
    except ImportError:
        pass
    with pytest.raises(MusubiInputError, match="bitsandbytes"):
        build_optimizer(params(), OptimizerConfig(optimizer_type="AdamW8bit", learning_rate=1e-4))


def test_loraplus_groups():
    named = [("a.lora_down.weight", torch.nn.Parameter(torch.zeros(2))),
             ("a.lora_up.weight", torch.nn.Parameter(torch.zeros(2)))]
    built = build_optimizer(named, OptimizerConfig(learning_rate=1e-4, loraplus_lr_ratio=16))
    assert [g["lr"] for g in built.optimizer.param_groups] == [1e-4, 1e-4 * 16]


@pytest.mark.parametrize("cfg,field", [
    (OptimizerConfig(learning_rate=0), "learning_rate"),
    (OptimizerConfig(learning_rate=-1e-4), "learning_rate"),
    (OptimizerConfig(optimizer_type="NoSuchOpt"), "optimizer_type"),
    (OptimizerConfig(optimizer_type="nosuchpackage.Opt"), "optimizer_type"),
    (OptimizerConfig(optimizer_args=["nonsense_arg=3"]), "optimizer_args"),
    (OptimizerConfig(optimizer_type="torch.nn.Linear"), "optimizer_type"),
])
def test_bad_optimizer_inputs(cfg, field):
    with pytest.raises(MusubiInputError, match=field):
        build_optimizer(params(), cfg)


# --- schedulers ----------------------------------------------------------------------------------------------

def lrs(name, total=100, **kw):
    named = params(1)
    cfg = OptimizerConfig(learning_rate=1.0, lr_scheduler=name, **kw)
    opt = build_optimizer(named, cfg).optimizer
    sched = build_scheduler(opt, cfg, total)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_resolve_steps():
    assert resolve_steps(10, 100, "w") == 10
    assert resolve_steps(0.1, 100, "w") == 10
    assert resolve_steps("25%", 200, "w") == 50
    with pytest.raises(MusubiInputError, match="lr_warmup_steps"):
        resolve_steps("abc", 100, "lr_warmup_steps")


def test_constant_and_warmup():
    assert set(lrs("constant")) == {1.0}
    w = lrs("constant_with_warmup", lr_warmup_steps=10)
    assert w[:10] == pytest.approx([i / 10 for i in range(10)]) and set(w[10:]) == {1.0}


def test_linear_cosine_polynomial():
    lin = lrs("linear", lr_warmup_steps=10)
    assert lin[10] == pytest.approx(1.0) and lin[55] == pytest.approx(0.5)
    cos = lrs("cosine")
    assert cos[50] == pytest.approx(0.5) and cos[25] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))
    poly = lrs("polynomial", lr_scheduler_power=2.0)
    assert poly[50] == pytest.approx((1 - 1e-7) * 0.25 + 1e-7)


def test_cosine_with_restarts_and_min_lr():
    r = lrs("cosine_with_restarts", lr_scheduler_num_cycles=2)
    assert r[0] == pytest.approx(1.0) and r[50] == pytest.approx(1.0) and r[25] == pytest.approx(0.5)
    m = lrs("cosine_with_min_lr", lr_scheduler_min_lr_ratio=0.1)
    assert m[50] == pytest.approx(0.1 + 0.9 * 0.5) and min(m) >= 0.1 - 1e-9


def test_inverse_sqrt_wsd_piecewise_rex():
    inv = lrs("inverse_sqrt", lr_warmup_steps=10)
    assert inv[10] == pytest.approx(1.0) and inv[40] == pytest.approx(1 / math.sqrt(4))
    wsd = lrs("warmup_stable_decay", lr_warmup_steps=10, lr_decay_steps=20, lr_scheduler_min_lr_ratio=0.0)
    assert wsd[50] == 1.0 and wsd[90] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    pw = lrs("piecewise_constant", lr_scheduler_args=['step_rules="1:10,0.1:20,0.01"'])
    assert pw[5] == 1 and pw[15] == pytest.approx(0.1) and pw[50] == pytest.approx(0.01)
    rex = lrs("rex")
    z = 0.5
    assert rex[50] == pytest.approx(0.01 + 0.99 * z / (0.1 + 0.9 * z))


def test_every_listed_scheduler_builds():
    for name in SCHEDULERS:
        if name in ("adafactor", "piecewise_constant"):
            continue
        assert len(lrs(name, total=5)) == 5


def test_custom_scheduler_by_path():
    out = lrs("torch.optim.lr_scheduler.StepLR", total=6, lr_scheduler_args=["step_size=3", "gamma=0.5"])
    assert out == pytest.approx([1, 1, 1, 0.5, 0.5, 0.5])


def test_bad_scheduler_inputs():
    with pytest.raises(MusubiInputError, match="lr_scheduler"):
        lrs("nope")
    with pytest.raises(MusubiInputError, match="lr_scheduler_args"):
        lrs("piecewise_constant")
