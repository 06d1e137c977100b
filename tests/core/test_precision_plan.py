"""Precision plan (issue 7, requirement 3): 16-bit LM, fp32 editor/solve, drift-free apply/revert of ΔW.

* 100 apply/revert cycles of random fp32 ΔW on tiny LLaMA (nn.Linear) and GPT-2 (Conv1D) in bf16 and fp16 —
  through ``apply_deltas(mode="auto")`` (fp32 hooks) + ``restore_weights``, and through the executors' path
  (``executor_apply_mode("auto")`` = in place from an fp32 master, cast once) + EasyEdit's ``param[...] = v`` or
  ``restore_weights`` — leave every parameter and buffer bit-identical and no hook behind; so does the real
  ``apply_agrade_to_model`` with EasyEdit's restore.
* The failure modes the design avoids: the revert is exact where add-then-subtract in bf16 would drift (shown on
  the same ΔW); in-place bf16 rounding drops a
  small ΔW (chunk after chunk, unless a master accumulates it); EasyEdit's restore cannot remove a hook.
* The hook's edited forward is fp32 math: ``round(out + x₃₂ @ ΔW)`` exactly per module, and the whole model's edit
  effect matches an fp32 copy with ΔW in its fp32 weights to bf16/fp16 tolerance.
* Training: :func:`delta_leaves` gives g_θ = ∂L/∂ΔW exactly (= ∂L/∂W of an in-place edit, fp64); a bf16 LM's
  ``AGRADETrainer`` step gets an fp32 g_θ that matches the same step on an fp32 copy to bf16 tolerance, and leaves
  the LM weights untouched.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "agrade"))

from agrade_helpers import (GPT2_PARAMS, LLAMA_PARAMS, perturb, records, tiny_gpt2, tiny_llama,  # noqa: E402
                            tok, training_config)  # noqa: F401  (tok: session fixture)
from easyedit_agrade.core.weights import (apply_deltas, delta_leaves, delta_to_weight_layout,  # noqa: E402
                                          executor_apply_mode, get_module, has_delta_hooks, io_sizes,
                                          remove_delta_hooks, restore_weights, weight_grad_to_editor_layout)

VOCAB = 64
EDITED = {
    "llama": ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj", "model.layers.2.mlp.down_proj"],
    "gpt2": ["transformer.h.0.mlp.c_proj", "transformer.h.1.attn.c_attn", "transformer.h.2.mlp.c_proj"],
}
HALF = [torch.bfloat16, torch.float16]


def _model(kind: str, dtype: torch.dtype, vocab: int = VOCAB):
    return (tiny_llama if kind == "llama" else tiny_gpt2)(vocab, dtype=dtype)


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _identical(model, snap) -> bool:
    now = model.state_dict()
    return set(now) == set(snap) and all(now[k].dtype == v.dtype and torch.equal(now[k], v) for k, v in snap.items())


def _n_hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _random_deltas(model, names, gen: torch.Generator, scale: float) -> dict[str, torch.Tensor]:
    out = {}
    for n in names:
        dh, dg = io_sizes(get_module(model, n))
        out[n] = torch.randn(dh, dg, generator=gen) * scale  # fp32, editor layout
    return out


def _easyedit_restore(model, weights_copy) -> None:
    """What EasyEdit's BaseEditor does: ``nethook.get_parameter(model, k)[...] = v``."""
    with torch.no_grad():
        for k, v in weights_copy.items():
            model.get_parameter(k)[...] = v


# -- 100 apply/revert cycles -----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("path", ["auto+restore_weights", "executor+easyedit_restore", "executor+restore_weights"])
def test_hundred_apply_revert_cycles_are_bit_identical(kind, dtype, path):
    model = _model(kind, dtype)
    snap, hooks0 = _snapshot(model), _n_hooks(model)
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y0 = model(input_ids=ids).logits
    gen = torch.Generator().manual_seed(0)
    changed = 0
    for cycle in range(100):
        scale = 10.0 ** (-5 + 4 * (cycle % 10) / 9)  # 1e-5 (far below an ulp) … 1e-1 (large)
        if path == "auto+restore_weights":
            copy = apply_deltas(model, _random_deltas(model, EDITED[kind], gen, scale), mode="auto")
            assert has_delta_hooks(model)  # 16-bit weights: the edit lives in fp32 hooks ...
            assert _identical(model, snap)  # ... and the weights are untouched
        else:  # what execute_agrade does: chunks applied in place from an fp32 master, cast once
            copy, masters = {}, {}
            for _chunk in range(2):
                apply_deltas(model, _random_deltas(model, EDITED[kind], gen, scale),
                             mode=executor_apply_mode("auto"), weights_copy=copy, masters=masters)
            assert not has_delta_hooks(model)
            assert set(copy) == {f"{n}.weight" for n in EDITED[kind]}
            assert all(v.dtype == dtype for v in copy.values())  # the originals, not fp32 copies
        if scale >= 1e-2:
            with torch.no_grad():
                changed += int(not torch.equal(model(input_ids=ids).logits, y0))
        if path.endswith("easyedit_restore"):
            _easyedit_restore(model, copy)
        else:
            restore_weights(model, copy)
        assert not has_delta_hooks(model) and _n_hooks(model) == hooks0, f"hook left behind after cycle {cycle}"
    assert changed >= 15, "the edits were vacuous: the edited forward never differed"
    assert _identical(model, snap)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, y0)


@pytest.mark.parametrize("kind,dtype", [("llama", torch.bfloat16), ("gpt2", torch.float16)], ids=["llama-bf16",
                                                                                                 "gpt2-fp16"])
def test_executor_cycles_with_easyedit_restore_are_bit_identical(tmp_path, tok, kind, dtype):  # noqa: F811
    """The real ``apply_agrade_to_model`` (default ``apply_mode: auto``), reverted alternately by EasyEdit's
    ``param[...] = v`` and by ``restore_weights``: weights edited while applied, bit-identical after, no hooks."""
    from easyedit_agrade.models.agrade import AGRADEHyperParams, apply_agrade_to_model
    from easyedit_agrade.models.agrade.agrade_main import clear_archive_cache
    from easyedit_agrade.models.agrade.archive import build_networks, save_archive

    model = _model(kind, dtype, vocab=len(tok))
    params = LLAMA_PARAMS if kind == "llama" else GPT2_PARAMS
    hp = AGRADEHyperParams.from_dict(dict(alg_name="AGRADE", model_name="tiny", inner_params=params, rank=4,
                                          n_blocks=2, eta_init=0.5, editor_dtype="float32", batch_size=2,
                                          cache_batch_size=2, archive=str(tmp_path / "a.safetensors")))
    nets = build_networks(model, hp)
    perturb(nets, scale=0.1)
    nets.train()
    for s in nets.slots:
        nets.observe(s.name, torch.randn(20, s.key_size), torch.randn(20, s.value_size))
    save_archive(tmp_path / "a.safetensors", nets, model, hp)
    clear_archive_cache()
    snap, hooks0 = _snapshot(model), _n_hooks(model)
    recs = records(6)
    for cycle in range(10):
        reqs = [r.to_request() for r in recs[cycle % 3: cycle % 3 + 3]]  # 3 requests = 2 chunks of batch_size 2
        _, copy = apply_agrade_to_model(model, tok, reqs, hp, return_orig_weights=True)
        assert not has_delta_hooks(model)
        assert any(not torch.equal(model.get_parameter(p), snap[p]) for p in params)
        (_easyedit_restore if cycle % 2 == 0 else restore_weights)(model, copy)
        assert _n_hooks(model) == hooks0
        assert _identical(model, snap), f"drift after cycle {cycle}"


# -- the failure modes the design avoids ------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["inplace", "hook"])
def test_revert_is_exact_where_subtracting_in_bf16_would_drift(mode):
    """Our apply/revert (two chunks through ``apply_deltas`` with fp32 masters, as the executor applies them, then
    ``restore_weights``) gives the original bf16 weights bit for bit, for ΔW chosen so that reverting by
    subtraction — round(round(w + ΔW) − ΔW) — misses w; in place, the edited weights are the fp32 sum rounded
    once."""
    model = _model("llama", torch.bfloat16)
    names = EDITED["llama"]
    snap = _snapshot(model)
    gen = torch.Generator().manual_seed(0)
    chunks = [_random_deltas(model, names, gen, 1e-2) for _ in range(2)]
    edited = {}
    for n in names:
        module = get_module(model, n)
        w32 = module.weight.detach().float()
        d1, d2 = (delta_to_weight_layout(module, c[n]) for c in chunks)
        edited[n] = ((w32 + d1) + d2).to(torch.bfloat16)
        naive_revert = ((edited[n].float() - d2) - d1).to(torch.bfloat16)  # subtract in fp32, round
        step_revert = ((edited[n].float() - d2).to(torch.bfloat16).float() - d1).to(torch.bfloat16)  # per chunk
        assert (naive_revert != module.weight).any() and (step_revert != module.weight).any(), "data would not drift"
    copy, masters = {}, {}
    for deltas in chunks:
        apply_deltas(model, deltas, mode=mode, weights_copy=copy, masters=masters)
    assert set(copy) == {f"{n}.weight" for n in names}
    for n in names:
        w = get_module(model, n).weight
        if mode == "inplace":
            assert torch.equal(w, edited[n])  # the edit is in the weights, rounded once
        else:
            assert torch.equal(w, snap[f"{n}.weight"]) and has_delta_hooks(model)  # the edit lives in fp32 hooks
    restore_weights(model, copy)
    assert _identical(model, snap) and not has_delta_hooks(model)


@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
def test_inplace_16bit_rounding_drops_small_delta_master_keeps_it(dtype):
    """A ΔW below half an ulp vanishes when rounded into 16-bit weights chunk by chunk; the fp32 master of
    ``apply_deltas(masters=...)`` accumulates the chunks and rounds once: round(w + Δ₁ + … + Δₖ)."""
    model = _model("llama", dtype)
    name = EDITED["llama"][0]
    w = get_module(model, name).weight
    original = w.detach().clone()
    o32 = original.float()
    _, e = torch.frexp(o32)  # |o| = m·2^e, m in [0.5, 1): ulp(o) = eps·2^(e−1)
    ulp = torch.finfo(dtype).eps * torch.ldexp(torch.ones_like(o32), e - 1)
    d_weight = 0.3 * ulp * torch.sign(o32)  # away from zero: the ulp does not shrink; 0.3 ulp < half an ulp
    delta = d_weight.T.contiguous()  # nn.Linear: editor layout is the transpose
    k = 8
    copy = {}
    for _ in range(k):
        apply_deltas(model, {name: delta}, mode="inplace", weights_copy=copy)  # no master: rounds every chunk
    assert torch.equal(w, original)  # 0.3 ulp < half an ulp: every chunk was rounded away
    restore_weights(model, copy)
    copy, masters = {}, {}
    for _ in range(k):
        apply_deltas(model, {name: delta}, mode="inplace", weights_copy=copy, masters=masters)
    want = (original.float() + k * d_weight).to(dtype)
    assert torch.equal(w, want) and not torch.equal(w, original)
    assert masters[f"{name}.weight"].dtype == torch.float32
    restore_weights(model, copy)
    assert torch.equal(w, original)
    # the fp32 hook keeps such a ΔW: the module's output moves (by x₃₂ @ ΔW, rounded once)
    x = torch.randn(4, w.shape[1], generator=torch.Generator().manual_seed(1)).to(dtype)
    mod = get_module(model, name)
    with torch.no_grad():
        y0 = mod(x)
        copy = apply_deltas(model, {name: k * delta}, mode="hook")
        y1 = mod(x)
    assert torch.equal(y1, (y0.float() + x.float() @ (k * delta)).to(dtype)) and not torch.equal(y1, y0)
    restore_weights(model, copy)


def test_easyedit_restore_cannot_remove_a_hook():
    """Why the executors do not use hooks with ``apply_mode: auto``: ``param[...] = v`` leaves the edit active."""
    model = _model("llama", torch.bfloat16)
    ids = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y0 = model(input_ids=ids).logits
    copy = apply_deltas(model, _random_deltas(model, EDITED["llama"], torch.Generator().manual_seed(0), 0.1),
                        mode="hook")
    _easyedit_restore(model, copy)
    with torch.no_grad():
        assert has_delta_hooks(model) and not torch.equal(model(input_ids=ids).logits, y0)
    assert remove_delta_hooks(model) == len(EDITED["llama"])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, y0)
    with pytest.warns(UserWarning, match="restore_weights"):
        assert executor_apply_mode("hook") == "hook"
    assert executor_apply_mode("auto") == "inplace" and executor_apply_mode("inplace") == "inplace"
    with pytest.raises(ValueError):
        executor_apply_mode("nope")


# -- the hook's forward is fp32 math ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_hook_forward_is_fp32_math(kind, dtype):
    model = _model(kind, dtype)
    ref32 = _model(kind, torch.float32)
    ref32.load_state_dict({k: v.float() for k, v in model.state_dict().items()})  # exact upcast of the 16-bit LM
    scale = 0.1 if kind == "llama" else 0.02  # edits that move the logits by ~10–20 %
    deltas = _random_deltas(model, EDITED[kind], torch.Generator().manual_seed(3), scale)
    ids = torch.randint(0, VOCAB, (3, 9), generator=torch.Generator().manual_seed(2))

    # per module: output = round(out_unedited + x₃₂ @ ΔW), one rounding, bit-exact
    seen = {}

    def grab(name):
        def hook(_m, inputs, output):
            seen[name] = (inputs[0].detach(), output.detach())
        return hook

    with torch.no_grad():
        handles = [get_module(model, n).register_forward_hook(grab(n)) for n in EDITED[kind]]
        base16 = model(input_ids=ids).logits
        for h in handles:
            h.remove()
        base32 = ref32(input_ids=ids).logits
        copy = apply_deltas(model, deltas, mode="auto")
        for n in EDITED[kind]:
            x, out = seen[n]
            want = (out.float() + x.float() @ deltas[n]).to(dtype)
            assert torch.equal(get_module(model, n)(x), want)
        edited16 = model(input_ids=ids).logits
        restore_weights(model, copy)
        apply_deltas(ref32, deltas, mode="auto")  # fp32 weights: in place, fp32 math
        edited32 = ref32(input_ids=ids).logits
    # whole model: the edited 16-bit forward matches the fp32 edited model to 16-bit tolerance (the remaining
    # error is the 16-bit forward's own, about 2⁻⁸ of the logits in bf16, 2⁻¹¹ in fp16)
    effect16, effect32 = (edited16.float() - base16.float()), (edited32 - base32)
    assert float(effect32.norm()) > 0.05 * float(base32.norm())  # a real edit, not noise
    rel = float((edited16.float() - edited32).norm() / edited32.norm())
    rel_effect = float((effect16 - effect32).norm() / effect32.norm())
    assert rel < (1e-2 if dtype == torch.bfloat16 else 2e-3), rel
    assert rel_effect < (0.1 if dtype == torch.bfloat16 else 0.02), rel_effect


# -- training: g_θ = ∂L/∂ΔW through leaves -------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_delta_leaves_grad_equals_weight_grad_fp64(kind):
    model = _model(kind, torch.float64)
    deltas = {n: d.double() for n, d in
              _random_deltas(model, EDITED[kind], torch.Generator().manual_seed(0), 1e-2).items()}
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))
    snap = _snapshot(model)
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.enable_grad(), delta_leaves(model, deltas) as leaves:
        assert all(d.is_leaf and d.requires_grad and d.dtype == torch.float64 for d in leaves.values())
        model(input_ids=ids, labels=ids).loss.backward()
    assert _identical(model, snap) and _n_hooks(model) == 0
    # reference: the same loss with ΔW written into the weights, gradient w.r.t. the weights
    apply_deltas(model, deltas, mode="inplace")
    mods = {n: get_module(model, n) for n in EDITED[kind]}
    for m in mods.values():
        m.weight.requires_grad_(True)
    model(input_ids=ids, labels=ids).loss.backward()
    for n, m in mods.items():
        ref = weight_grad_to_editor_layout(m, m.weight.grad)
        assert float(ref.norm()) > 0
        torch.testing.assert_close(leaves[n].grad, ref, rtol=1e-10, atol=1e-14)


def test_delta_leaves_removes_hooks_on_error():
    model = _model("llama", torch.bfloat16)
    deltas = _random_deltas(model, EDITED["llama"], torch.Generator().manual_seed(0), 1e-2)
    with pytest.raises(RuntimeError, match="boom"):
        with delta_leaves(model, deltas) as leaves:
            assert all(d.dtype == torch.float32 for d in leaves.values()) and _n_hooks(model) == len(deltas)
            raise RuntimeError("boom")
    assert _n_hooks(model) == 0


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_bf16_training_step_gives_fp32_g_theta(tok, monkeypatch, kind):  # noqa: F811
    """``AGRADETrainer.compute_gradients`` on a bf16 LM: g_θ is fp32 (editor dtype), matches the same step on an
    fp32 copy of the LM to bf16 tolerance, and the LM's weights are untouched (no in-place ΔW, no grads)."""
    from easyedit_agrade.models.agrade import AGRADETrainer
    from easyedit_agrade.models.agrade import equations as eq

    params = LLAMA_PARAMS if kind == "llama" else GPT2_PARAMS
    m16 = _model(kind, torch.bfloat16, vocab=len(tok))
    m32 = _model(kind, torch.float32, vocab=len(tok))
    m32.load_state_dict({k: v.float() for k, v in m16.state_dict().items()})  # the same (bf16-exact) weights
    recs = records(4)
    captured: list[dict[str, torch.Tensor]] = []
    real = eq.eq6_and_ridge_gradients

    def spy(fact, H, g_theta, delta, **kw):
        captured[-1][len(captured[-1])] = g_theta.detach().clone()
        return real(fact, H, g_theta, delta, **kw)

    monkeypatch.setattr(eq, "eq6_and_ridge_gradients", spy)
    out = []
    for model in (m16, m32):
        cfg = training_config(params, editor_dtype="float32")
        trainer = AGRADETrainer(cfg, train_set=recs, val_set=recs, model=model, tok=tok, progress=False,
                                out_dir="unused")
        perturb(trainer.nets, scale=0.1)
        snap = _snapshot(model)
        captured.append({})
        trainer.compute_gradients(recs)
        assert _identical(model, snap) and _n_hooks(model) == 0
        assert all(p.grad is None for p in model.parameters())
        out.append(captured[-1])
    g16, g32 = out
    assert len(g16) == len(params) == len(g32)
    for i in g16:
        assert g16[i].dtype == torch.float32 and g32[i].dtype == torch.float32
        assert bool(torch.isfinite(g16[i]).all()) and float(g32[i].norm()) > 0
        rel = float((g16[i] - g32[i]).norm() / g32[i].norm())
        # bf16 activations alone give ~2⁻⁸ relative error (measured 5e-3 … 8e-3 on these models)
        assert rel < 3e-2, f"module {i}: relative error {rel:.3e} between the bf16 and the fp32 LM"
