"""The memory plan's formulas (``easyedit_agrade.tools.memory_plan``): hand-computed cases, exact parameter
counts against real modules, world-size scaling, the activation formula against the tensors autograd really saves,
and one prediction against the measured peak RSS of a tiny LLaMA edit (Linux; fresh subprocess)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from easyedit_agrade.tools import memory_plan as mp

ROOT = Path(__file__).resolve().parents[2]
LLAMA = mp.MODELS["llama-2-7b"]
SMOL = mp.MODELS["smollm2-135m"]


def tiny_llama_config(**kw):
    from transformers import LlamaConfig

    args = dict(vocab_size=4096, hidden_size=64, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
    args.update(kw)
    return LlamaConfig(**args)


# -- hand-computed terms ---------------------------------------------------------------------------------------
def test_cache_bytes_hand_computed():
    # the bound quoted in core/cache.py: 6 modules × 1,300 tokens × (1536 + 576) × 4 B ≈ 66 MB
    assert mp.cache_bytes(SMOL, 1300) == 6 * 1300 * 2112 * 4 == 65_894_400
    assert mp.cache_bytes(LLAMA, 32768) == 6 * 32768 * (11008 + 4096) * 4


def test_dtype_bytes_and_weights():
    assert mp.dtype_bytes("bf16") == mp.dtype_bytes("torch.bfloat16") == 2
    assert mp.dtype_bytes("fp32") == 4
    with pytest.raises(ValueError):
        mp.dtype_bytes("int3")
    assert mp.weights_bytes(LLAMA, "bf16") * 2 == mp.weights_bytes(LLAMA, "fp32")


def test_published_parameter_counts():
    assert LLAMA.n_params == 6_738_415_616  # LLaMA-2 7B
    assert mp.MODELS["mistral-7b"].n_params == 7_241_732_096  # Mistral 7B
    assert abs(mp.MODELS["gpt-j-6b"].n_params / 6.05e9 - 1) < 0.01  # GPT-J 6B
    assert abs(SMOL.n_params / 134.5e6 - 1) < 0.01  # SmolLM2-135M


@pytest.mark.parametrize("arch", ["llama", "gptj", "gpt2"])
def test_lm_param_count_matches_transformers(arch):
    import transformers

    if arch == "llama":
        cfg = tiny_llama_config(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=3)
        model = transformers.LlamaForCausalLM(cfg)
    elif arch == "gptj":
        cfg = transformers.GPTJConfig(vocab_size=100, n_embd=32, n_layer=3, n_head=4, rotary_dim=4, n_positions=64)
        model = transformers.GPTJForCausalLM(cfg)
    else:
        cfg = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=3, n_head=4, n_positions=64, n_inner=48)
        model = transformers.GPT2LMHeadModel(cfg)
    spec = mp.ModelSpec.from_hf_config(cfg, n_edited=2)
    assert spec.arch == arch
    assert spec.n_params == sum(p.numel() for p in model.parameters())
    # the edited module exists and has the (Dh, Dg) the spec says
    from easyedit_agrade.core.weights import get_module, io_sizes

    for name in spec.module_names:
        assert io_sizes(get_module(model, name)) == (spec.dh, spec.dg)


def test_hypernet_params_match_module_and_adam_is_twice():
    import torch

    from easyedit_agrade.core.hypernet import EditorNetworks

    # P_h = nb·(2·S·r + r + S + 2·M·S) + 2·M + 2·S + 1 with S = 10, r = 3, nb = 2, M = 2 → 251
    spec = mp.ModelSpec("t", "llama", hidden_size=4, intermediate_size=6, num_layers=4, num_heads=1, num_kv_heads=1,
                        vocab_size=10, tie_word_embeddings=True, edited_layers=(2, 3),
                        module_template="model.layers.{}.mlp.down_proj", dh=6, dg=4)
    assert mp.hypernet_param_count(spec, rank=3, n_blocks=2) == 251
    nets = EditorNetworks([(n, 6, 4) for n in spec.module_names], rank=3, n_blocks=2)
    actual = sum(t.numel() for t in list(nets.parameters()) + list(nets.buffers()))
    assert actual == 251
    assert mp.hypernet_bytes(spec, 3) == 251 * 4
    assert mp.adam_state_bytes(spec, 3) == 2 * mp.hypernet_bytes(spec, 3) == 2 * mp.hypernet_grad_bytes(spec, 3)
    # and Adam really keeps two fp32 moments per parameter
    opt = torch.optim.Adam(nets.parameters())
    for p in nets.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    state = sum(v.numel() for s in opt.state.values() for k, v in s.items() if k in ("exp_avg", "exp_avg_sq"))
    assert state == 2 * sum(p.numel() for p in nets.parameters())


def test_gram_delta_and_method():
    assert mp.solve_method(SMOL, 300, 1) == "dual"
    assert mp.solve_method(SMOL, 3000, 1) == "primal"
    assert mp.solve_method(SMOL, 300, 2) == "primal"  # data-parallel always sums the full Gram
    # streamed primal: fp64 Gram, its copies, factor (+ the previous module's factor when editing), HᵀG, M⁻¹HᵀG
    assert mp.gram_workspace_bytes(LLAMA, 123, "primal") == (7 * 11008 ** 2 + 2 * 11008 * 4096) * 8
    assert mp.gram_workspace_bytes(LLAMA, 123, "primal", training=True) == (6 * 11008 ** 2 + 2 * 11008 * 4096) * 8
    assert mp.gram_workspace_bytes(SMOL, 300, "dual") == (4 * 300 ** 2 + 2 * 300 * 2112) * 4
    assert mp.kept_factor_bytes(LLAMA, 123, "primal") == 5 * 11008 ** 2 * 8
    assert mp.delta_bytes(LLAMA) == 6 * 11008 * 4096 * 4
    assert mp.logits_bytes(SMOL, 100, "fp32") == 100 * 49152 * 16
    assert mp.logits_bytes(LLAMA, 100, "bf16") == 100 * 32000 * (2 + 4 + 12)


# -- plans -----------------------------------------------------------------------------------------------------
WL = mp.Workload(8192, target_tokens=4, prompt_tokens=16)


@pytest.mark.parametrize("make", [mp.editing_plan, mp.training_plan])
def test_world_size_divides_only_the_sharded_terms(make):
    one, two = make(LLAMA, WL, 1), make(LLAMA, WL, 2)
    assert one.method == two.method == "primal"
    for key in ("cache",) + (("stash", "ref_logprobs", "kept_rows", "observe") if make is mp.training_plan else ()):
        assert two.bytes_of(key) * 2 == one.bytes_of(key), key
    for key in ("weights", "hypernet", "gram", "delta", "activations"):  # full size on every rank
        assert two.bytes_of(key) == one.bytes_of(key), key
    if make is mp.training_plan:
        for key in ("adam", "hypernet_grad", "kept_factors", "delta_leaves"):
            assert two.bytes_of(key) == one.bytes_of(key), key
    assert two.peak_bytes < one.peak_bytes
    # the micro-batch terms only shrink once a rank holds fewer edits than one micro-batch
    tiny = make(LLAMA, mp.Workload(64), 2)
    assert tiny.bytes_of("activations") < make(LLAMA, mp.Workload(64), 1).bytes_of("activations")


def test_peak_is_a_phase_total():
    plan = mp.training_plan(LLAMA, WL, 1)
    per = plan.phase_bytes()
    peak, phase = plan.peak
    assert peak == per[phase] == max(per.values())
    assert plan.sum_bytes >= peak
    assert plan.peak_without("weights") == peak - plan.bytes_of("weights")  # weights live in every phase
    assert plan.peak_without(phases=mp.STEP_PHASES) <= peak


def test_7b_edit_fits_one_80gb_gpu_and_shrinks_with_ranks():
    """Sanity of magnitudes: 8192 edits on LLaMA-2 7B in bf16 (weights 12.6 GiB)."""
    peaks = [mp.editing_plan(LLAMA, WL, w).peak_bytes for w in (1, 2, 8)]
    assert 13 * 2 ** 30 < peaks[2] < peaks[1] < peaks[0] < 80e9


def test_from_hf_config_json(tmp_path):
    cfg = {"model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000, "torch_dtype": "bfloat16"}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    spec = mp.ModelSpec.from_hf_config(path)
    ref = mp.MODELS["mistral-7b"]
    assert (spec.dh, spec.dg, spec.edited_layers, spec.module_names) == (ref.dh, ref.dg, ref.edited_layers,
                                                                          ref.module_names)
    assert spec.n_params == ref.n_params and spec.default_dtype == "bf16"
    gptj = mp.ModelSpec.from_hf_config({"model_type": "gptj", "n_embd": 4096, "n_layer": 28, "n_head": 16,
                                        "vocab_size": 50400, "n_inner": None})
    assert (gptj.dh, gptj.dg, gptj.module_names[0]) == (16384, 4096, "transformer.h.22.mlp.fc_out")


# -- against torch ---------------------------------------------------------------------------------------------
def test_activation_formula_matches_saved_tensors():
    """The per-token activation term equals the bytes autograd saves in a real cache pass (tiny LLaMA, fp32)."""
    import torch
    import transformers

    from easyedit_agrade.core.cache import LayerStack, cache_keys_and_grads

    torch.manual_seed(0)
    cfg = tiny_llama_config()
    model = transformers.LlamaForCausalLM(cfg).eval()
    spec = mp.ModelSpec.from_hf_config(cfg, n_edited=2)
    stack = LayerStack(model, [f"{n}.weight" for n in spec.module_names])
    B, L, t = 8, 12, 2
    ids = torch.randint(0, cfg.vocab_size, (B, L))
    att = torch.ones(B, L, dtype=torch.long)
    pmask = torch.zeros(B, L, dtype=torch.bool)
    pmask[:, L - t - 1:L - 1] = True
    labels = torch.full((B, L), -100)
    labels[:, :-1] = ids[:, 1:]
    hidden = stack.lower(ids, att)
    seen: dict[int, int] = {}

    def pack(x):
        seen[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        cache_keys_and_grads(stack, [(ids, att, pmask, labels)], hidden=[hidden])
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = sum(n for ptr, n in seen.items() if ptr not in params)
    logsoftmax = B * t * cfg.vocab_size * 4  # the one saved logits-sized tensor
    predicted = (B * L * ((spec.upper_layers - 1) * mp.activation_bytes_per_token_layer(spec, L, "fp32")
                          + 4 * spec.hidden_size) + logsoftmax)
    assert 0.85 < saved / predicted < 1.15, (saved, predicted)


_CHILD = textwrap.dedent("""
    import gc, json, re, sys, torch, transformers
    torch.set_num_threads(1)
    from easyedit_agrade.core.hypernet import EditorNetworks
    from easyedit_agrade.core.weights import apply_deltas
    from easyedit_agrade.models.agrade import AGRADEHyperParams
    from easyedit_agrade.models.agrade.editor import AGRADEEditor, MicroBatch

    def status(key):
        return int(re.search(key + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

    E, t, L, mb = (int(x) for x in sys.argv[1:5])
    cfg = transformers.LlamaConfig(**json.loads(sys.argv[5]))
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    names = [f"model.layers.{i}.mlp.down_proj.weight" for i in (2, 3)]
    hp = AGRADEHyperParams.from_dict(dict(model_name="tiny", inner_params=names, rank=16, n_blocks=2,
                                          cache_batch_size=mb, batch_size=E))
    mbs = []
    for start in range(0, E, mb):
        ids = torch.randint(0, cfg.vocab_size, (mb, L))
        pm = torch.zeros(mb, L, dtype=torch.bool)
        pm[:, L - t - 1:L - 1] = True
        lab = torch.full((mb, L), -100)
        lab[:, :-1] = ids[:, 1:]
        mbs.append(MicroBatch(ids, torch.ones(mb, L, dtype=torch.long), pm, lab, torch.arange(start, start + mb)))
    with torch.no_grad():
        model(input_ids=mbs[0].input_ids[:1, :4])
    gc.collect()
    base = status("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")
    editor = AGRADEEditor(model, None, hp, EditorNetworks([(n[:-7], 1024, 64) for n in names], rank=16, n_blocks=2))
    cache = editor.cache(mbs, keep_hidden=False)  # the executor path (edit_deltas) without the tokeniser
    result = editor.compute(cache, keep_modules=False)
    cache.close()
    apply_deltas(model, result.deltas, mode="inplace")
    print(json.dumps({"delta": status("VmHWM") - base}))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc/self/clear_refs (Linux)")
def test_prediction_within_factor_of_measured_rss():
    """Predicted peak (minus the weights) of a tiny LLaMA edit vs its measured peak RSS delta, in a fresh process
    (VmHWM reset after loading; glibc told to return freed blocks). Stated factor: 0.6–1.5."""
    cfg_kw = dict(vocab_size=4096, hidden_size=64, intermediate_size=1024, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  tie_word_embeddings=False)
    E, t, L, mb = 1024, 2, 12, 64
    from easyedit_agrade.hparams import DISABLE_EASYEDIT_ENV

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               **{DISABLE_EASYEDIT_ENV: "1"})  # EasyEdit's imports take seconds and play no part in the edit
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(E), str(t), str(L), str(mb), json.dumps(cfg_kw)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    if proc.returncode != 0 and "clear_refs" in proc.stderr:
        pytest.skip("cannot reset the peak RSS here")
    assert proc.returncode == 0, proc.stderr[-3000:]
    measured = json.loads(proc.stdout.strip().splitlines()[-1])["delta"]
    spec = mp.ModelSpec.from_hf_config(tiny_llama_config(), n_edited=2, default_rank=16)
    plan = mp.editing_plan(spec, mp.Workload(E, target_tokens=t, prompt_tokens=L - t), 1, dtype="fp32",
                           micro_batch=mb)
    assert plan.method == "primal"  # T = 2048 ≥ Dh = 1024: the streamed path
    predicted = plan.peak_without("weights")
    print(f"tiny LLaMA edit: measured {measured / 2**20:.1f} MiB, predicted {predicted / 2**20:.1f} MiB")
    assert 0.6 < measured / predicted < 1.5, (measured, predicted, plan.phase_bytes())
