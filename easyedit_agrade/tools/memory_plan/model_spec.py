"""The models and edit batches the memory plan is computed for: :class:`ModelSpec` (architecture numbers, from the
project's table :data:`MODELS` or a Hugging Face ``config.json``) and :class:`Workload` (edits and token counts)."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence


@dataclass(frozen=True)
class ModelSpec:
    """Architecture numbers of a causal LM and the AGRADE edit configuration on it.

    ``arch`` selects the parameter-count and activation formulas: ``"llama"`` (LLaMA / Mistral / Qwen2 / SmolLM2:
    RMSNorm, SwiGLU MLP, SDPA attention), ``"gptj"`` (GPT-J: parallel attention + GELU MLP, eager fp32 attention),
    ``"gpt2"`` (GPT-2: Conv1D, GELU MLP). ``edited_layers`` are the decoder layers whose ``module_template`` module
    is edited; that module's weight maps Dh -> Dg.
    """

    name: str
    arch: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    tie_word_embeddings: bool
    edited_layers: tuple[int, ...]
    module_template: str
    dh: int
    dg: int
    default_rank: int = 1920
    default_dtype: str = "bf16"
    edit_micro_batch: int = 64
    train_micro_batch: int = 64
    train_lower_dtype: str | None = None
    max_positions: int = 2048

    def __post_init__(self) -> None:
        if self.arch not in ("llama", "gptj", "gpt2"):
            raise ValueError(f"unknown arch {self.arch!r}; expected llama, gptj or gpt2")
        if not self.edited_layers:
            raise ValueError("edited_layers is empty")
        if min(self.edited_layers) < 0 or max(self.edited_layers) >= self.num_layers:
            raise ValueError(f"edited layers {self.edited_layers} outside 0..{self.num_layers - 1}")

    @property
    def n_modules(self) -> int:
        """M, the number of edited modules."""
        return len(self.edited_layers)

    @property
    def upper_layers(self) -> int:
        """K = num_layers − (lowest edited layer): the layers run with grad in the cache and loss passes."""
        return self.num_layers - min(self.edited_layers)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_dim(self) -> int:
        return self.head_dim * self.num_kv_heads

    @property
    def module_names(self) -> list[str]:
        return [self.module_template.format(i) for i in self.edited_layers]

    @property
    def n_params(self) -> int:
        return lm_param_count(self)

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any] | str | os.PathLike[str] | Any, *, name: str | None = None,
                       n_edited: int = 6, edited_layers: Sequence[int] | None = None, **overrides: Any) -> "ModelSpec":
        """Spec from a Hugging Face ``config.json`` (a path, a dict, or a ``PretrainedConfig``).

        Edited module: the second MLP linear (``mlp.down_proj`` for LLaMA-type, ``mlp.fc_out`` for GPT-J,
        ``mlp.c_proj`` for GPT-2) of the last ``n_edited`` layers unless ``edited_layers`` is given.
        """
        if isinstance(config, (str, os.PathLike)):
            path = Path(config)
            cfg = json.loads((path / "config.json" if path.is_dir() else path).read_text())
            name = name or (path.parent.name if path.name == "config.json" else path.name)
        elif isinstance(config, Mapping):
            cfg = dict(config)
        else:
            cfg = config.to_dict()
        model_type = str(cfg.get("model_type", "llama")).lower()

        def first(*keys: str, default: Any = None) -> Any:
            for k in keys:
                if cfg.get(k) is not None:
                    return cfg[k]
            return default

        d = int(first("hidden_size", "n_embd", "d_model"))
        layers = int(first("num_hidden_layers", "n_layer", "num_layers"))
        heads = int(first("num_attention_heads", "n_head"))
        vocab = int(first("vocab_size"))
        if model_type in ("gptj", "gpt2"):
            arch = model_type
            dff = int(first("n_inner", "intermediate_size", default=4 * d))
            kv = heads
            tied = bool(cfg.get("tie_word_embeddings", model_type == "gpt2"))
            template = "transformer.h.{}.mlp.fc_out" if arch == "gptj" else "transformer.h.{}.mlp.c_proj"
        else:  # llama, mistral, qwen2, … (RMSNorm + gated MLP + down_proj)
            arch = "llama"
            dff = int(first("intermediate_size"))
            kv = int(first("num_key_value_heads", default=heads))
            tied = bool(cfg.get("tie_word_embeddings", False))
            template = "model.layers.{}.mlp.down_proj"
        layers_edited = tuple(edited_layers) if edited_layers is not None else tuple(
            range(layers - n_edited, layers))
        dtype = str(cfg.get("torch_dtype") or "bf16")
        fields: dict[str, Any] = dict(
            name=name or str(cfg.get("_name_or_path") or model_type), arch=arch, hidden_size=d,
            intermediate_size=dff, num_layers=layers, num_heads=heads, num_kv_heads=kv, vocab_size=vocab,
            tie_word_embeddings=tied, edited_layers=layers_edited, module_template=template, dh=dff, dg=d,
            default_dtype={"float32": "fp32", "fp32": "fp32", "float16": "fp16", "fp16": "fp16"}.get(dtype, "bf16"),
            max_positions=int(first("max_position_embeddings", "n_positions", default=2048)))
        fields.update(overrides)
        return cls(**fields)


@dataclass(frozen=True)
class Workload:
    """One edit batch: ``n_edits`` records with ``prompt_tokens`` + ``target_tokens`` tokens on average.

    Training also runs paraphrase (``rephrase_prompt_tokens``, same targets) and locality prompts
    (``loc_prompt_tokens`` + ``loc_target_tokens``); unset lengths default to the edit prompt's. ``seq_len``
    optionally gives the padded length of the longest micro-batch (default: ceil(p + t)).
    """

    n_edits: int
    target_tokens: float = 4.0
    prompt_tokens: float = 16.0
    rephrase_prompt_tokens: float | None = None
    loc_prompt_tokens: float | None = None
    loc_target_tokens: float | None = None
    seq_len: int | None = None
    rephrase_seq_len: int | None = None
    loc_seq_len: int | None = None

    def __post_init__(self) -> None:
        if self.n_edits < 1 or self.target_tokens <= 0 or self.prompt_tokens < 0:
            raise ValueError("need n_edits >= 1, target_tokens > 0 and prompt_tokens >= 0")

    def edits_per_rank(self, world_size: int) -> int:
        """E_r = ceil(E / W) — shards differ by at most one record, the largest one sets the peak."""
        if world_size < 1:
            raise ValueError("world_size must be >= 1")
        return math.ceil(self.n_edits / world_size)

    def rows_per_rank(self, world_size: int) -> int:
        """T_r = ceil(E_r · t)."""
        return math.ceil(self.edits_per_rank(world_size) * self.target_tokens)

    def sets(self) -> dict[str, tuple[float, float, int]]:
        """``{set: (mean tokens per record L, target tokens t, longest padded micro-batch length)}`` for the
        edit, paraphrase (``equiv``) and locality prompts."""
        t, p = self.target_tokens, self.prompt_tokens
        pe = self.rephrase_prompt_tokens if self.rephrase_prompt_tokens is not None else p
        pl = self.loc_prompt_tokens if self.loc_prompt_tokens is not None else p
        tl = self.loc_target_tokens if self.loc_target_tokens is not None else t
        return {"edit": (p + t, t, self.seq_len or math.ceil(p + t)),
                "equiv": (pe + t, t, self.rephrase_seq_len or math.ceil(pe + t)),
                "loc": (pl + tl, tl, self.loc_seq_len or math.ceil(pl + tl))}


# ------------------------------------------------------------------------------------------------------------
# parameter count
# ------------------------------------------------------------------------------------------------------------
def lm_param_count(spec: ModelSpec) -> int:
    """Parameters of the LM.

    * llama: V·d·(1 if tied else 2) + n_layers·(d·(d + 2·kv_dim) + d² + 3·d·dff + 2·d) + d
    * gptj:  2·V·d + V + n_layers·(4·d² + 2·d·dff + dff + d + 2·d) + 2·d
    * gpt2:  V·d + n_pos·d + n_layers·(4·d + 3·d² + 3·d + d² + d + 2·d·dff + dff + d) + 2·d (tied head)
    """
    d, f, n, V = spec.hidden_size, spec.intermediate_size, spec.num_layers, spec.vocab_size
    if spec.arch == "llama":
        per_layer = d * (d + 2 * spec.kv_dim) + d * d + 3 * d * f + 2 * d
        return V * d * (1 if spec.tie_word_embeddings else 2) + n * per_layer + d
    if spec.arch == "gptj":
        per_layer = 4 * d * d + 2 * d * f + f + d + 2 * d
        return V * d * (1 if spec.tie_word_embeddings else 2) + V + n * per_layer + 2 * d
    per_layer = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (2 * d * f + f + d)
    return V * d + spec.max_positions * d + n * per_layer + 2 * d


# ------------------------------------------------------------------------------------------------------------
# the models of this project (public architecture numbers)
# ------------------------------------------------------------------------------------------------------------
def _last(n_layers: int, k: int = 6) -> tuple[int, ...]:
    return tuple(range(n_layers - k, n_layers))


MODELS: dict[str, ModelSpec] = {
    "gpt-j-6b": ModelSpec("gpt-j-6b", "gptj", hidden_size=4096, intermediate_size=16384, num_layers=28,
                          num_heads=16, num_kv_heads=16, vocab_size=50400, tie_word_embeddings=False,
                          edited_layers=_last(28), module_template="transformer.h.{}.mlp.fc_out", dh=16384,
                          dg=4096, default_rank=1920, default_dtype="bf16"),
    "llama-2-7b": ModelSpec("llama-2-7b", "llama", hidden_size=4096, intermediate_size=11008, num_layers=32,
                            num_heads=32, num_kv_heads=32, vocab_size=32000, tie_word_embeddings=False,
                            edited_layers=_last(32), module_template="model.layers.{}.mlp.down_proj", dh=11008,
                            dg=4096, default_rank=1920, default_dtype="bf16"),
    "mistral-7b": ModelSpec("mistral-7b", "llama", hidden_size=4096, intermediate_size=14336, num_layers=32,
                            num_heads=32, num_kv_heads=8, vocab_size=32000, tie_word_embeddings=False,
                            edited_layers=_last(32), module_template="model.layers.{}.mlp.down_proj", dh=14336,
                            dg=4096, default_rank=1920, default_dtype="bf16"),
    "smollm2-135m": ModelSpec("smollm2-135m", "llama", hidden_size=576, intermediate_size=1536, num_layers=30,
                              num_heads=9, num_kv_heads=3, vocab_size=49152, tie_word_embeddings=True,
                              edited_layers=_last(30), module_template="model.layers.{}.mlp.down_proj", dh=1536,
                              dg=576, default_rank=128, default_dtype="fp32", edit_micro_batch=64,
                              train_micro_batch=16, train_lower_dtype="bf16", max_positions=8192),
}


def get_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known: {sorted(MODELS)} (or pass a config.json)") from None
