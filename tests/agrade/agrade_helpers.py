"""Tiny float64 models (LLaMA with nn.Linear, GPT-2 with Conv1D) and synthetic edit records for AGRADE tests."""
from __future__ import annotations

import pytest
import torch

from easyedit_agrade.dataset import EditRecord


@pytest.fixture(scope="session")
def tok():
    try:
        from easyedit_agrade.lm import load_tokenizer

        return load_tokenizer()
    except Exception as exc:  # pragma: no cover - environment without the embedded model
        pytest.skip(f"embedded tokenizer unavailable: {exc}")


def tiny_llama(vocab: int, seed: int = 0, dtype=torch.float64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=24, num_hidden_layers=3,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    return model


def tiny_gpt2(vocab: int, seed: int = 0, dtype=torch.float64):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_embd=16, n_layer=3, n_head=2, n_positions=128, n_inner=24,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg).to(dtype).eval()
    return model


LLAMA_PARAMS = [f"model.layers.{i}.mlp.down_proj.weight" for i in (1, 2)]
GPT2_PARAMS = [f"transformer.h.{i}.mlp.c_proj.weight" for i in (1, 2)]

_FACTS = [
    ("The capital of France is", "Rome", "France's capital city is", "The largest ocean is", "the Pacific"),
    ("Danielle Darrieux's mother tongue is", "English", "Danielle Darrieux speaks natively", "Water boils at",
     "100 degrees"),
    ("The Eiffel Tower is located in", "Berlin", "Where is the Eiffel Tower? It is in", "Bananas are",
     "yellow fruit"),
    ("Apple was founded by", "Bill Gates", "The founder of Apple is", "The sun rises in the", "east"),
    ("The Beatles came from", "Paris", "The home town of the Beatles is", "Cats like to", "sleep a lot"),
    ("Mount Everest is in", "Chile", "Everest stands in", "Two plus two equals", "four"),
]


def records(n: int = 6) -> list[EditRecord]:
    out = []
    for i in range(n):
        p, t, r, lp, lg = _FACTS[i % len(_FACTS)]
        out.append(EditRecord(prompt=p, target_new=t, rephrase_prompt=r, locality_prompt=lp,
                              locality_ground_truth=lg, index=i, source="<test>"))
    return out


def training_config(params, **overrides):
    from easyedit_agrade.models.agrade import AGRADETrainingHyperParams

    cfg = dict(alg_name="AGRADE", model_name="tiny-test-model", inner_params=list(params), rank=4, n_blocks=2,
               eta_init=0.5, log_lambda_init=-1.0, editor_dtype="float64", cache_batch_size=4, n_edits=4,
               val_size=4, val_every=0, checkpoint_every=0, max_steps=2, lr=1e-2, eta_lr=1e-2, lambda_lr=1e-2,
               max_length=32, loc_coef=0.7, gen_coef=1.0, edit_coef=0.5)
    cfg.update(overrides)
    return AGRADETrainingHyperParams.from_dict(cfg)


def perturb(nets, seed: int = 1, scale: float = 0.3) -> None:
    """Make every hypernetwork parameter non-trivial (an untrained net has B = 0, scale = 1, shift = 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in nets.named_parameters():
            if name.endswith(("lr", "log_lambda")):
                continue
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))


def tiny_editor(tok, **over):
    """An :class:`AGRADEEditor` on a fresh tiny LLaMA with a perturbed float64 network in eval mode (editing);
    ``over`` overrides the training config (e.g. ``solver="primal"``)."""
    from easyedit_agrade.models.agrade.archive import build_networks
    from easyedit_agrade.models.agrade.editor import AGRADEEditor

    model = tiny_llama(len(tok))
    cfg = training_config(LLAMA_PARAMS, **over)
    nets = build_networks(model, cfg, seed=0).to(torch.float64)
    perturb(nets)
    nets.eval()
    return AGRADEEditor(model, tok, cfg, nets)


def tiny_agrade_archive(tmp_path, tok, kind: str = "llama", **over):
    """(model, hparams): a tiny LLaMA (or GPT-2) and a perturbed float64 AGRADE network with normaliser statistics
    (the z-score guard needs them), saved as ``tmp_path/a.safetensors`` and named by ``hparams.archive``; the
    executor's archive cache is cleared. ``over`` overrides the editing hparams."""
    from easyedit_agrade.models.agrade import AGRADEHyperParams
    from easyedit_agrade.models.agrade.agrade_main import clear_archive_cache
    from easyedit_agrade.models.agrade.archive import build_networks, save_archive

    model = tiny_llama(len(tok)) if kind == "llama" else tiny_gpt2(len(tok))
    params = LLAMA_PARAMS if kind == "llama" else GPT2_PARAMS
    cfg = dict(alg_name="AGRADE", model_name="tiny", inner_params=params, rank=4, n_blocks=2, eta_init=0.5,
               editor_dtype="float64", batch_size=8, cache_batch_size=2, archive=str(tmp_path / "a.safetensors"))
    cfg.update(over)
    hp = AGRADEHyperParams.from_dict(cfg)
    nets = build_networks(model, hp).double()
    perturb(nets, scale=0.1)
    nets.train()
    for s in nets.slots:
        nets.observe(s.name, torch.randn(20, s.key_size, dtype=torch.float64),
                     torch.randn(20, s.value_size, dtype=torch.float64))
    save_archive(tmp_path / "a.safetensors", nets, model, hp, {"note": "test"})
    clear_archive_cache()
    return model, hp
