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


@pytest.mark.parametrize("idx", [0, 1])
def test_captured_keys_and_grads_equal_autograd(idx):
    model, params = _models()[idx]
    stack = LayerStack(model, params)
    ids, att, pm, labels = _batch()
    cache = cache_keys_and_grads(stack, [(ids, att, pm, labels)], dtype=torch.float64)
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
        assert torch.allclose(H, inp[pm].detach(), atol=1e-12)
        assert torch.allclose(dG, out.grad[pm], atol=1e-12)
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
