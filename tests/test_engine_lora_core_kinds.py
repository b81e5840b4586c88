"""Every patch kind ComfyUI's loader applies, against a closed-form computation written here (float64):
LoRA with a LoCon/Tucker `lora_mid`, LoHa/LoKr with Tucker cores, DoRA on both axes and at strength != 1, `.diff`
(Linear, norm and bare-parameter targets), `.diff_b`, `.set_weight`, `w_norm`/`b_norm`, ComfyUI's precedence when a
module has several, and keys that match nothing (skipped and listed; refused when strict). Both application modes
(merge; adapter = hooks + merged remainder), the streaming checkpoint merge and the writer round trip are checked.
Also: a community speed LoRA (.diff/.diff_b + low rank) stacks under a freshly trained adapter on one view."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.errors import MusubiInputError
from engine.families.wan.presets import build_preset_state_dict
from engine.lora import (AdapterConfig, AdapterNetwork, apply_loras, match_lora, merge_into_model,
                         merge_loras_into_checkpoint, network_from_lora, read_lora, save_lora)
from engine.lora.views import add_network, make_lora_view, merge_into_view

from lora_fixtures import tiny_model

P = "diffusion_model."
G = torch.Generator().manual_seed(1234)


def rnd(*shape, scale=0.05):
    return torch.randn(*shape, generator=G) * scale


def params(model):
    return {k: v.detach().double().clone() for k, v in model.named_parameters()}


def dora_ref(w, delta, mag, s):
    """LyCORIS/ComfyUI weight decomposition as ComfyUI computes it: output-axis norm over the rows of the original
    W, input-axis norm over the columns of W + ΔW; strength blends W and the result."""
    merged = w + delta
    norm = w.norm(dim=1, keepdim=True) if mag.shape[0] == w.shape[0] else merged.norm(dim=0, keepdim=True)
    out = merged * (mag / (norm + torch.finfo(torch.float32).eps))
    return w + s * (out - w)


def community_lora():
    """A lightx2v-style speed LoRA: low-rank weights on block 0's attention, `.diff_b` on their biases, `.diff` on
    norm weights and on a modulation table; plus keys ComfyUI does not apply."""
    sd = {}
    for m in ("self_attn.q", "self_attn.k", "ffn.0"):
        o, i = (512, 256) if m == "ffn.0" else (256, 256)
        sd[f"{P}blocks.0.{m}.lora_down.weight"] = rnd(8, i)
        sd[f"{P}blocks.0.{m}.lora_up.weight"] = rnd(o, 8)
        sd[f"{P}blocks.0.{m}.alpha"] = torch.tensor(4.0)
        sd[f"{P}blocks.0.{m}.diff_b"] = rnd(o)
    for n in ("blocks.0.norm3", "blocks.0.self_attn.norm_q", "blocks.1.cross_attn.norm_k"):
        sd[f"{P}{n}.diff"] = rnd(256)
    sd[f"{P}blocks.0.norm3.diff_b"] = rnd(256)
    sd[f"{P}head.head.diff_b"] = rnd(64)
    sd[MODULATION] = rnd(1, 6, 256)      # lightx2v files have these; ComfyUI never writes them (see below)
    return sd


MODULATION = f"{P}blocks.1.modulation.diff"


def community_expected(base, sd, s):
    exp = {k: v.clone() for k, v in base.items()}
    for m in ("self_attn.q", "self_attn.k", "ffn.0"):
        k = f"{P}blocks.0.{m}"
        exp[f"blocks.0.{m}.weight"] += s * 0.5 * (sd[f"{k}.lora_up.weight"].double() @ sd[f"{k}.lora_down.weight"].double())
        exp[f"blocks.0.{m}.bias"] += s * sd[f"{k}.diff_b"].double()
    for n in ("blocks.0.norm3", "blocks.0.self_attn.norm_q", "blocks.1.cross_attn.norm_k"):
        exp[f"{n}.weight"] += s * sd[f"{P}{n}.diff"].double()
    exp["blocks.0.norm3.bias"] += s * sd[f"{P}blocks.0.norm3.diff_b"].double()
    exp["head.head.bias"] += s * sd[f"{P}head.head.diff_b"].double()
    return exp


def check_params(model, expected, atol=2e-6):
    got = params(model)
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=atol, msg=k)


# --- each kind, merged -------------------------------------------------------------------------------------------
def _kind_case(kind):
    """(state dict, function base params -> expected params at strength s)."""
    q, f0 = f"{P}blocks.0.self_attn.q", f"{P}blocks.1.ffn.0"
    if kind == "lora_mid":
        down, mid, up = rnd(4, 256), rnd(4, 4, 1, 1, scale=0.5), rnd(256, 4)
        sd = {f"{q}.lora_down.weight": down, f"{q}.lora_mid.weight": mid, f"{q}.lora_up.weight": up,
              f"{q}.alpha": torch.tensor(2.0)}
        ref = {"blocks.0.self_attn.q.weight": lambda w, s: w + s * 0.5 * (up.double() @ mid[:, :, 0, 0].double()
                                                                           @ down.double())}
    elif kind == "loha_tucker":
        # LyCORIS Tucker LoHa: w_a is [rank, out], w_b [rank, in], the core t [rank, rank]
        a1, b1, t1, a2, b2, t2 = rnd(3, 512, scale=0.3), rnd(3, 256, scale=0.3), rnd(3, 3, 1, 1, scale=0.5), \
            rnd(3, 512, scale=0.3), rnd(3, 256, scale=0.3), rnd(3, 3, 1, 1, scale=0.5)
        sd = {f"{f0}.hada_w1_a": a1, f"{f0}.hada_w1_b": b1, f"{f0}.hada_t1": t1,
              f"{f0}.hada_w2_a": a2, f"{f0}.hada_w2_b": b2, f"{f0}.hada_t2": t2, f"{f0}.alpha": torch.tensor(6.0)}
        m1 = a1.double().T @ t1[:, :, 0, 0].double() @ b1.double()
        m2 = a2.double().T @ t2[:, :, 0, 0].double() @ b2.double()
        ref = {"blocks.1.ffn.0.weight": lambda w, s: w + s * 2.0 * m1 * m2}
    elif kind == "lokr_tucker":
        w1, a2, b2, t2 = rnd(16, 16, scale=0.3), rnd(2, 32, scale=0.3), rnd(2, 16, scale=0.3), rnd(2, 2, scale=0.5)
        sd = {f"{f0}.lokr_w1": w1, f"{f0}.lokr_w2_a": a2, f"{f0}.lokr_w2_b": b2, f"{f0}.lokr_t2": t2,
              f"{f0}.alpha": torch.tensor(1.0)}
        kr = torch.kron(w1.double(), a2.double().T @ t2.double() @ b2.double())
        ref = {"blocks.1.ffn.0.weight": lambda w, s: w + s * 0.5 * kr}
    elif kind in ("dora_out", "dora_in"):
        down, up = rnd(4, 256), rnd(512, 4)
        mag = (rnd(512, 1, scale=1.0).abs() + 0.5) if kind == "dora_out" else (rnd(1, 256, scale=1.0).abs() + 0.5)
        sd = {f"{f0}.lora_down.weight": down, f"{f0}.lora_up.weight": up, f"{f0}.alpha": torch.tensor(8.0),
              f"{f0}.dora_scale": mag}
        ref = {"blocks.1.ffn.0.weight": lambda w, s: dora_ref(w, 2.0 * up.double() @ down.double(), mag.double(), s)}
    elif kind == "dora_loha":
        a1, b1, a2, b2 = rnd(512, 2, scale=0.3), rnd(2, 256, scale=0.3), rnd(512, 2, scale=0.3), rnd(2, 256, scale=0.3)
        mag = rnd(1, 256, scale=1.0).abs() + 0.5
        sd = {f"{f0}.hada_w1_a": a1, f"{f0}.hada_w1_b": b1, f"{f0}.hada_w2_a": a2, f"{f0}.hada_w2_b": b2,
              f"{f0}.dora_scale": mag}
        delta = (a1.double() @ b1.double()) * (a2.double() @ b2.double())
        ref = {"blocks.1.ffn.0.weight": lambda w, s: dora_ref(w, delta, mag.double(), s)}
    elif kind == "diff":
        d, db, dn = rnd(256, 256), rnd(256), rnd(256)
        sd = {f"{q}.diff": d, f"{q}.diff_b": db, f"{P}blocks.0.norm3.diff": dn, f"{P}head.head.diff": rnd(64, 256)}
        ref = {"blocks.0.self_attn.q.weight": lambda w, s: w + s * d.double(),
               "blocks.0.self_attn.q.bias": lambda w, s: w + s * db.double(),
               "blocks.0.norm3.weight": lambda w, s: w + s * dn.double(),
               "head.head.weight": lambda w, s: w + s * sd[f"{P}head.head.diff"].double()}
    elif kind == "set_weight":
        new = rnd(256)
        sd = {f"{P}blocks.1.self_attn.norm_k.set_weight": new}
        ref = {"blocks.1.self_attn.norm_k.weight": lambda w, s: new.double()}   # strength ignored, as in ComfyUI
    elif kind == "w_norm":
        wn, bn = rnd(256), rnd(256)
        sd = {f"{P}blocks.0.norm3.w_norm": wn, f"{P}blocks.0.norm3.b_norm": bn}
        ref = {"blocks.0.norm3.weight": lambda w, s: w + s * wn.double(),
               "blocks.0.norm3.bias": lambda w, s: w + s * bn.double()}
    elif kind == "precedence":
        # ComfyUI: .diff replaces the module's LoRA (whose keys are read but do nothing); .diff_b wins over b_norm
        d = rnd(256, 256)
        sd = {f"{q}.lora_down.weight": rnd(4, 256), f"{q}.lora_up.weight": rnd(256, 4), f"{q}.diff": d}
        ref = {"blocks.0.self_attn.q.weight": lambda w, s: w + s * d.double()}
    else:
        raise AssertionError(kind)
    return sd, ref


KINDS = ["lora_mid", "loha_tucker", "lokr_tucker", "dora_out", "dora_in", "dora_loha", "diff", "set_weight",
         "w_norm", "precedence"]


@pytest.mark.parametrize("strength", [1.0, 0.6])
@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_merges_like_the_closed_form(kind, strength):
    sd, ref = _kind_case(kind)
    model = tiny_model("t2v")
    base = params(model)
    lora = read_lora(sd, model=model)
    assert not lora.unused_keys
    report = match_lora(lora, model)
    assert report.complete
    if kind == "precedence":
        assert sorted(report.overridden_keys) == sorted(k for k in sd if "lora_" in k)
    handle = merge_into_model(model, lora, strength)
    expected = dict(base)
    for k, fn in ref.items():
        expected[k] = fn(base[k], strength)
        assert not torch.allclose(expected[k], base[k])
    check_params(model, expected)
    handle.restore()
    check_params(model, base, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_adapter_mode_equals_merge_mode(kind):
    """Adapter mode: plain low-rank ΔW by hooks, the rest (DoRA, diff, set, bias) merged; same forward as merge."""
    sd, _ = _kind_case(kind)
    merged, hooked = tiny_model("t2v"), tiny_model("t2v")
    x = torch.randn(1, 16, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    ctx = [torch.randn(5, merged.config.text_dim, generator=torch.Generator().manual_seed(1))]
    with torch.no_grad():
        clean = hooked(x, torch.tensor([500.0]), ctx)
    a = apply_loras(merged, [(read_lora(sd, model=merged), 0.8)], mode="merge")
    b = apply_loras(hooked, [(read_lora(sd, model=hooked), 0.8)], mode="adapter")
    hooks = sum(len(m._forward_hooks) for m in hooked.modules())
    assert hooks == (1 if kind in ("lora_mid", "loha_tucker", "lokr_tucker") else 0)
    with torch.no_grad():
        want = merged(x, torch.tensor([500.0]), ctx)
        got = hooked(x, torch.tensor([500.0]), ctx)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, clean, atol=1e-4)
    a.remove()
    b.remove()
    with torch.no_grad():
        torch.testing.assert_close(hooked(x, torch.tensor([500.0]), ctx), clean, rtol=0, atol=0)


def test_lora_mid_is_read_only_beside_lora_up_and_down():
    """ComfyUI reads `lora_mid` only with the lora_up/lora_down spelling; beside lora_A/lora_B it is not applied."""
    q = f"{P}blocks.0.self_attn.q"
    sd = {f"{q}.lora_A.weight": rnd(4, 256), f"{q}.lora_B.weight": rnd(256, 4), f"{q}.lora_mid.weight": rnd(4, 4)}
    lora = read_lora(sd)
    assert lora.unused_keys == [f"{q}.lora_mid.weight"] and "mid" not in lora.modules["blocks.0.self_attn.q"].tensors


# --- keys that match nothing -------------------------------------------------------------------------------------
def test_unmatched_and_unapplied_keys_are_skipped_and_listed_unless_strict():
    sd = community_lora()
    extra = {f"{P}blocks.0.self_attn.q.lora_B.bias": rnd(256),      # ComfyUI does not apply these either
             f"{P}blocks.9.self_attn.q.diff_b": rnd(256),            # no block 9 in the tiny model
             f"{P}blocks.0.ffn.2.lokr_t1": rnd(2, 2),
             f"{P}blocks.0.norm3.dora_scale": rnd(1, 256)}           # DoRA without low-rank weights
    sd.update(extra)
    extra[MODULATION] = sd[MODULATION]
    model = tiny_model("t2v")
    base = params(model)
    lora = read_lora(sd, model=model)
    report = match_lora(lora, model)
    assert sorted(report.unmatched_keys) == sorted(extra)
    with pytest.raises(MusubiInputError, match="match no weight"):
        apply_loras(model, [(lora, 1.0)], mode="merge")
    check_params(model, base, atol=0)
    apply_loras(model, [(lora, 0.7)], mode="merge", strict=False)
    check_params(model, community_expected(base, sd, 0.7))


def test_parameters_of_non_leaf_modules_are_not_patched_as_in_comfyui():
    """ComfyUI's patcher writes only parameters of modules without parameterized submodules: a block's or the head's
    modulation `.diff` is accepted by its loader and silently never applied. Here it is skipped and listed."""
    model = tiny_model("t2v")
    sd = {MODULATION: rnd(1, 6, 256), f"{P}head.modulation.diff": rnd(1, 2, 256), f"{P}blocks.0.norm3.diff": rnd(256)}
    report = match_lora(read_lora(sd), model)
    assert report.matched == ["blocks.0.norm3"]
    assert sorted(report.unmatched_keys) == sorted([MODULATION, f"{P}head.modulation.diff"])


def test_shape_mismatch_of_a_diff_is_refused_as_another_model_size():
    model = tiny_model("t2v")
    with pytest.raises(MusubiInputError, match="another model size"):
        match_lora(read_lora({f"{P}blocks.0.norm3.diff": rnd(512)}), model)
    with pytest.raises(MusubiInputError, match="bias"):
        match_lora(read_lora({f"{P}blocks.0.self_attn.q.diff_b": rnd(128)}), model)


# --- file-level paths --------------------------------------------------------------------------------------------
def test_checkpoint_merge_and_writer_round_trip_keep_every_kind(tmp_path):
    sd = community_lora()
    del sd[MODULATION]                   # the checkpoint merge refuses keys it does not apply
    moves = {"lora_mid": ("blocks.0.", "blocks.1."),     # -> blocks.1.self_attn.q
             "dora_in": ("blocks.1.", "blocks.0."),      # -> blocks.0.ffn.0: DoRA beside that module's .diff_b
             "loha_tucker": ("", ""), "set_weight": ("", "")}
    for kind, (old, new) in moves.items():
        sd.update({k.replace(old, new) if old else k: v for k, v in _kind_case(kind)[0].items()})
    lora_path = tmp_path / "mixed.safetensors"
    save_file(sd, str(lora_path))
    base_sd = build_preset_state_dict("tiny-t2v")
    save_file({k: v.contiguous() for k, v in base_sd.items()}, str(tmp_path / "base.safetensors"))
    merge_loras_into_checkpoint(tmp_path / "base.safetensors", [(lora_path, 0.8)], tmp_path / "merged.safetensors")
    merged = load_file(str(tmp_path / "merged.safetensors"))

    model = tiny_model("t2v")
    model.load_state_dict(base_sd, strict=False)
    merge_into_model(model, str(lora_path), 0.8)
    own = dict(model.named_parameters())
    changed = [k for k in base_sd if not torch.equal(merged[k], base_sd[k])]
    assert len(changed) == 14              # 9 weights, 5 biases
    for k in base_sd:
        torch.testing.assert_close(merged[k], own[k].detach(), rtol=0, atol=1e-6, msg=k)

    # comfyui and musubi formats keep DoRA / mid / Tucker / diff keys; the re-read file patches identically
    for fmt in ("comfyui", "musubi"):
        out = save_lora(read_lora(lora_path), tmp_path / f"rt_{fmt}.safetensors", format=fmt)
        again = tiny_model("t2v")
        again.load_state_dict(base_sd, strict=False)
        merge_into_model(again, read_lora(out, model=again), 0.8)
        for k, v in again.named_parameters():
            torch.testing.assert_close(v.detach(), own[k].detach(), rtol=0, atol=1e-6, msg=k)
    with pytest.raises(MusubiInputError, match="comfyui or musubi"):
        save_lora(read_lora(lora_path), tmp_path / "x.safetensors", format="diffusers")


# --- a community speed LoRA under a freshly trained adapter --------------------------------------------------------
def test_speed_lora_view_stacks_with_a_fresh_training_adapter():
    """The node path (a view; hooks + copy-on-write merge) with a training network created on top: the trained
    adapter gets gradients, the applied LoRA and the shared model do not change, and the source stays clean."""
    model = tiny_model("t2v")
    base = params(model)
    sd = community_lora()
    lora = read_lora(sd)
    view = make_lora_view(model)
    names = match_lora(lora, view).matched
    net = network_from_lora(view, lora, "speed", 1.0)
    merge_into_view(view, lora, 1.0, names, None, hooked=True)
    net.requires_grad_(False)
    net.attach(view)
    add_network(view, net, {"name": "speed", "strength": 1.0, "mode": "adapter", "node": "t"})
    check_params(model, base, atol=0)                     # the source is untouched

    x = torch.randn(1, 16, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    ctx = [torch.randn(5, model.config.text_dim, generator=torch.Generator().manual_seed(1))]
    ref = tiny_model("t2v")
    merge_into_model(ref, read_lora(sd, model=ref), 1.0, strict=False)
    with torch.no_grad():
        want = ref(x, torch.tensor([500.0]), ctx)
        torch.testing.assert_close(view(x, torch.tensor([500.0]), ctx), want, rtol=1e-4, atol=1e-5)

    trained = AdapterNetwork.create(view, AdapterConfig(kind="lora", rank=2, alpha=1.0), name="trained")
    for p in view.parameters():
        p.requires_grad_(False)
    opt = torch.optim.SGD(trained.trainable_parameters(), lr=0.5)
    speed_before = {k: v.clone() for k, v in net.state_dict().items()}
    view_before = params(view)
    for _ in range(2):
        opt.zero_grad()
        view(x, torch.tensor([500.0]), ctx).square().mean().backward()
        opt.step()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trained.trainable_parameters())
    assert all(torch.equal(v, speed_before[k]) for k, v in net.state_dict().items())
    check_params(view, view_before, atol=0)
    check_params(model, base, atol=0)
    with torch.no_grad():
        stacked = view(x, torch.tensor([500.0]), ctx)
        ref_net = AdapterNetwork("ref")
        for m, ad in trained.adapters().items():
            ref_net.add(m, type(ad)(dict(ref.named_modules())[m], rank=ad.rank, alpha=ad._alpha))
        ref_net.load_state_dict(trained.state_dict())
        ref_net.attach(ref)
        torch.testing.assert_close(stacked, ref(x, torch.tensor([500.0]), ctx), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(stacked, want, atol=1e-5)


# --- ModuleWeights details the merges above do not pin (mutation testing, #21 item 9) ----------------------------

def test_full_weight_patches_compute_in_float32_and_only_a_diff_has_a_delta():
    from engine.lora.weights import ModuleWeights

    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 4, generator=g)
    t16 = torch.randn(3, 4, generator=g).half()
    diff = ModuleWeights("diff", {}, weight_patch=("diff", t16))
    assert diff.delta().dtype == torch.float32 and torch.equal(diff.delta(), t16.float())
    assert torch.equal(diff.patched_weight(w, 0.3), w + 0.3 * t16.float())   # not a float16 product
    put = ModuleWeights("diff", {}, weight_patch=("set", t16))
    assert put.patched_weight(w, 0.5).dtype == torch.float32 and torch.equal(put.patched_weight(w, 0.5), t16.float())
    assert torch.equal(put.patched_weight(w, 0.0), w)          # strength 0 leaves the weight alone
    with pytest.raises(ValueError, match="^a set_weight patch has no ΔW$"):
        put.delta()
    dora = ModuleWeights("lora", {"down": torch.ones(1, 4), "up": torch.ones(3, 1)}, dora_scale=torch.ones(3, 1))
    with pytest.raises(ValueError, match="^a DoRA patch has no ΔW independent of the weight$"):
        dora.delta()
    b = torch.randn(3, generator=g)
    bias = ModuleWeights("diff", {}, bias_diff=t16[0, :3])
    assert torch.equal(bias.patched_bias(b, 0.3), b + 0.3 * t16[0, :3].float())


@pytest.mark.parametrize("axis", [0, 1])
def test_dora_is_comfyuis_exact_arithmetic_even_for_tiny_norms(axis):
    """W' = (W + ΔW)·m / (‖·‖ + eps) bit for bit at strength 1 (no interpolation round trip); weights of norm ~1e-6
    make the eps term visible (its sign included)."""
    from engine.lora.weights import ModuleWeights

    g = torch.Generator().manual_seed(4)
    w = torch.randn(3, 4, generator=g) * 1e-6
    down, up = torch.randn(1, 4, generator=g) * 1e-3, torch.randn(3, 1, generator=g) * 1e-3
    mag = torch.rand(3, 1, generator=g) if axis == 0 else torch.rand(1, 4, generator=g)
    mw = ModuleWeights("lora", {"down": down, "up": up}, alpha=2.0, dora_scale=mag)
    merged = w + (up @ down).reshape(w.shape) * 2.0
    norm = w.norm(dim=1, keepdim=True) if axis == 0 else merged.norm(dim=0, keepdim=True)
    expected = merged * (mag / (norm + torch.finfo(torch.float32).eps))
    assert torch.equal(mw.patched_weight(w, 1.0), expected)
    torch.testing.assert_close(mw.patched_weight(w, 2.0), w + 2.0 * (expected - w))


def test_loha_factor_shapes_are_checked_as_products_with_and_without_tucker_cores(raises_input):
    """w1 and w2 may have different ranks; their products must have the same shape. Tucker: a is [rank, out]."""
    from engine.lora.weights import ModuleWeights

    def loha(r1, r2, out1=3, out2=3, tucker=False):
        t = {"hada_w1_a": torch.ones(r1, out1) if tucker else torch.ones(out1, r1), "hada_w1_b": torch.ones(r1, 4),
             "hada_w2_a": torch.ones(r2, out2) if tucker else torch.ones(out2, r2), "hada_w2_b": torch.ones(r2, 4)}
        if tucker:
            t["hada_t1"], t["hada_t2"] = torch.ones(r1, r1), torch.ones(r2, r2)
        return ModuleWeights("loha", t)

    for tucker in (False, True):
        mw = loha(2, 3, tucker=tucker)
        mw.validate("m")
        assert mw.shape == (3, 4) and mw.raw_delta().shape == (3, 4)
        bad = loha(2, 2, out1=3, out2=5, tucker=tucker)
        with raises_input("m", {k: tuple(v.shape) for k, v in bad.tensors.items()}, "factor shapes that multiply"):
            bad.validate("m")


def test_raw_delta_is_float32_and_only_for_low_rank_kinds():
    from engine.lora.weights import ModuleWeights

    g = torch.Generator().manual_seed(1)
    down, up = torch.randn(2, 4, generator=g).half(), torch.randn(3, 2, generator=g).half()
    mw = ModuleWeights("lora", {"down": down, "up": up})
    assert mw.raw_delta().dtype == torch.float32 and torch.equal(mw.raw_delta(), up.float() @ down.float())
    with pytest.raises(ValueError, match="^no low-rank weights in a 'diff' patch$"):
        ModuleWeights("diff", {}, bias_diff=torch.zeros(3)).raw_delta()


def _m(*shape):
    return torch.ones(*shape)


@pytest.mark.parametrize("kind, tensors, value, expected", [
    # parts missing: the message lists what the module has
    ("lokr", {"lokr_w1": _m(2, 2)}, ["lokr_w1"], "LoKr tensors lokr_w1 (or _a/_b) and lokr_w2 (or _a/_b)"),
    ("lokr", {"lokr_w1_a": _m(2, 1), "lokr_w2": _m(2, 2)}, ["lokr_w1_a", "lokr_w2"], "LoKr tensors lokr_w1"),
    ("lokr", {"lokr_w1": _m(2, 2), "lokr_w2_b": _m(1, 2)}, ["lokr_w1", "lokr_w2_b"], "LoKr tensors lokr_w1"),
    ("loha", {"hada_w1_a": _m(3, 2), "hada_w1_b": _m(2, 4), "hada_w2_a": _m(3, 2)},
     ["hada_w1_a", "hada_w1_b", "hada_w2_a"], "all of ['hada_w1_a', 'hada_w1_b', 'hada_w2_a', 'hada_w2_b']"),
    ("loha", {"hada_w1_a": _m(2, 3), "hada_w1_b": _m(2, 4), "hada_w2_a": _m(2, 3), "hada_w2_b": _m(2, 4),
              "hada_t1": _m(2, 2)}, ["hada_t1", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"],
     "both Tucker cores hada_t1 and hada_t2, or neither"),
    ("lora", {"down": _m(2, 4)}, ["down"], "all of ['down', 'up']"),
    # factors that do not multiply, in the first product as well as the second
    ("loha", {"hada_w1_a": _m(3, 2), "hada_w1_b": _m(5, 4), "hada_w2_a": _m(3, 2), "hada_w2_b": _m(2, 4)},
     {"hada_w1_a": (3, 2), "hada_w1_b": (5, 4), "hada_w2_a": (3, 2), "hada_w2_b": (2, 4)}, "factor shapes that multiply"),
    ("lokr", {"lokr_w1_a": _m(2, 1), "lokr_w1_b": _m(3, 2), "lokr_w2": _m(2, 2)},
     {"lokr_w1_a": (2, 1), "lokr_w1_b": (3, 2), "lokr_w2": (2, 2)}, "factor shapes that multiply"),
    ("lokr", {"lokr_w1": _m(2, 2), "lokr_w2_a": _m(2, 1), "lokr_w2_b": _m(3, 2)},
     {"lokr_w1": (2, 2), "lokr_w2_a": (2, 1), "lokr_w2_b": (3, 2)}, "factor shapes that multiply"),
    # LoCon mid [rank_up, rank_down]: either side off
    ("lora", {"down": _m(2, 8), "mid": _m(4, 3), "up": _m(8, 4)}, {"down": (2, 8), "mid": (4, 3), "up": (8, 4)},
     "factor shapes that multiply"),
    ("lora", {"down": _m(2, 8), "mid": _m(3, 2), "up": _m(8, 4)}, {"down": (2, 8), "mid": (3, 2), "up": (8, 4)},
     "factor shapes that multiply"),
    # Tucker cores [rank_a, rank_b] between a [rank_a, out] and b [rank_b, in]: the b side off
    ("loha", {"hada_w1_a": _m(2, 3), "hada_t1": _m(2, 6), "hada_w1_b": _m(5, 4),
              "hada_w2_a": _m(2, 3), "hada_t2": _m(2, 5), "hada_w2_b": _m(5, 4)},
     {"hada_w1_a": (2, 3), "hada_t1": (2, 6), "hada_w1_b": (5, 4), "hada_w2_a": (2, 3), "hada_t2": (2, 5),
      "hada_w2_b": (5, 4)}, "factor shapes that multiply"),
    ("lokr", {"lokr_w1": _m(2, 2), "lokr_w2_a": _m(2, 3), "lokr_t2": _m(2, 6), "lokr_w2_b": _m(5, 4)},
     {"lokr_w1": (2, 2), "lokr_w2_a": (2, 3), "lokr_t2": (2, 6), "lokr_w2_b": (5, 4)}, "factor shapes that multiply"),
])
def test_module_weight_refusals_name_the_module_its_tensors_and_what_was_expected(kind, tensors, value, expected,
                                                                                  raises_input):
    from engine.lora.weights import ModuleWeights

    with raises_input("m", value, expected):
        ModuleWeights(kind, tensors).validate("m")


def test_dora_scale_refusals_and_a_non_square_mid_factor(raises_input):
    from engine.lora.weights import ModuleWeights

    with raises_input("m dora_scale", "no LoRA/LoHa/LoKr weights", "DoRA with low-rank weights"):
        ModuleWeights("diff", {}, weight_patch=("diff", _m(8, 8)), dora_scale=_m(8, 1)).validate("m")
    lora = {"down": _m(2, 6), "up": _m(8, 2)}
    with raises_input("m dora_scale", (3, 3), "shape (8, 1) or (1, 6) for a weight of shape (8, 6)"):
        ModuleWeights("lora", lora, dora_scale=_m(3, 3)).validate("m")
    for ok in ((8, 1), (1, 6)):
        ModuleWeights("lora", lora, dora_scale=_m(*ok)).validate("m")
    # LoCon's mid [rank_up, rank_down] need not be square: up [8, 4] @ mid [4, 2] @ down [2, 8]
    mw = ModuleWeights("lora", {"down": _m(2, 8), "mid": _m(4, 2), "up": _m(8, 4)})
    mw.validate("m")
    assert mw.shape == (8, 8)
    # and Tucker cores need not be square: a [2, out 3] · core [2, 5] · b [5, in 4]
    for kind, t in (("loha", {"hada_w1_a": _m(2, 3), "hada_t1": _m(2, 5), "hada_w1_b": _m(5, 4),
                              "hada_w2_a": _m(2, 3), "hada_t2": _m(2, 5), "hada_w2_b": _m(5, 4)}),
                    ("lokr", {"lokr_w1": _m(2, 2), "lokr_w2_a": _m(2, 3), "lokr_t2": _m(2, 5), "lokr_w2_b": _m(5, 4)})):
        ModuleWeights(kind, t).validate("m")
