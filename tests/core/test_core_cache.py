"""LayerStack (run only the layers edits need) and H/∇G capture, on tiny float64 LLaMA and GPT-2 models."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from easyedit_agrade.core.cache import (CacheOverflowError, LayerStack, cache_keys_and_grads, find_decoder_layers)
from easyedit_agrade.core.weights import get_module


def _models():
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=16, intermediate_size=24, num_hidden_layers=4,
                                         num_attention_heads=2, num_key_value_heads=2,
                                         max_position_embeddings=64)).double().eval()
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_embd=16, n_layer=4, n_head=2, n_positions=64,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).double().eval()
    return [(llama, [f"model.layers.{i}.mlp.down_proj.weight" for i in (2, 3)]),
            (gpt2, [f"transformer.h.{i}.mlp.c_proj.weight" for i in (3, 2)])]


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (3, 9), generator=g)
    att = torch.ones_like(ids)
    att[1, 7:] = 0  # right padding
    pm = torch.zeros_like(ids, dtype=torch.bool)
    pm[0, 4:8] = True
    pm[1, 3:6] = True
    pm[2, 2:4] = True
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    return ids, att, pm, labels


@pytest.mark.parametrize("idx", [0, 1])
def test_lower_then_upper_equals_full_forward(idx):
    model, params = _models()[idx]
    stack = LayerStack(model, params)
    assert stack.first == 2 and stack.module_names == sorted(stack.module_names)
    ids, att, pm, _ = _batch()
    hidden = stack.lower(ids, att)
    with torch.no_grad():
        logits = stack.upper(hidden, ids, att, pm)
        full = model(input_ids=ids, attention_mask=att).logits[pm]
    assert torch.allclose(logits, full, atol=1e-10)
    assert len(find_decoder_layers(model)[1]) == 4  # the layer list is restored


@pytest.mark.parametrize("with_key_mask", [False, True])
@pytest.mark.parametrize("idx", [0, 1])
def test_captured_keys_and_grads_equal_autograd(idx, with_key_mask):
    """H and ∇G at the predict positions — or, with a key mask (``key_positions: target+subject``), also at
    earlier positions whose gradient only arrives through the attention above; the loss stays on the targets."""
    model, params = _models()[idx]
    stack = LayerStack(model, params)
    ids, att, pm, labels = _batch()
    km = pm.clone()
    km[0, 1] = km[2, 0] = True
    rows = km if with_key_mask else pm
    cache = cache_keys_and_grads(stack, [(ids, att, pm, labels, km) if with_key_mask else (ids, att, pm, labels)],
                                 dtype=torch.float64)
    # reference: full forward, hooks keep the module inputs and outputs, autograd gives d loss / d output
    seen = {}

    def hook(name):
        def f(mod, inp, out):
            out.retain_grad()
            seen[name] = (inp[0], out)
        return f

    handles = [get_module(model, n).register_forward_hook(hook(n)) for n in stack.module_names]
    logits = model(input_ids=ids, attention_mask=att).logits
    F.cross_entropy(logits[pm], labels[pm], reduction="sum").backward()
    for h in handles:
        h.remove()
    for name in stack.module_names:
        H, dG = cache.get(name)
        inp, out = seen[name]
        assert H.shape[0] == int(rows.sum())
        assert torch.allclose(H, inp[rows].detach(), atol=1e-12)
        # the cache pass takes the CE of fp32-cast logits: agreement to fp32 precision of the gradient's scale
        assert torch.allclose(dG, out.grad[rows], atol=1e-6 * float(out.grad.abs().max()))
        if with_key_mask:  # the extra rows' gradient comes through the attention of the layers above only
            above = stack.layer_of[name] < len(find_decoder_layers(model)[1]) - 1
            assert (float(out.grad[km & ~pm].abs().max()) > 0) == above
    if with_key_mask:  # an explicit key mask equal to the predict mask is the default cache, bit for bit
        explicit = cache_keys_and_grads(stack, [(ids, att, pm, labels, pm)], dtype=torch.float64)
        default = cache_keys_and_grads(stack, [(ids, att, pm, labels)], dtype=torch.float64)
        for name in stack.module_names:
            assert all(torch.equal(a, b) for a, b in zip(explicit.get(name), default.get(name)))
    lower_param = next(iter(find_decoder_layers(model)[1][0].parameters()))
    assert lower_param.requires_grad  # flags restored after the cache pass
    model.zero_grad(set_to_none=True)


def test_cache_bound():
    model, params = _models()[0]
    stack = LayerStack(model, params)
    ids, att, pm, labels = _batch()
    with pytest.raises(CacheOverflowError, match="max_rows"):
        cache_keys_and_grads(stack, [(ids, att, pm, labels)], max_rows=3)


def test_unknown_module_is_reported():
    model, _ = _models()[0]
    with pytest.raises(KeyError, match="model.layers.9"):
        LayerStack(model, ["model.layers.9.mlp.down_proj.weight"])
