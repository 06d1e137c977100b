"""Per-rank memory plan of AGRADE editing and training, from explicit formulas (no torch needed).

Every term is one named function returning bytes, with its formula in the docstring. :func:`editing_plan` and
:func:`training_plan` assemble the terms for a model (:class:`ModelSpec`), an edit batch (:class:`Workload`) and
a data-parallel world size, and tag each term with the *phases* of the run in which it is alive. The predicted
peak is the largest phase total (``MemoryPlan.peak``); ``MemoryPlan.sum_bytes`` (every term at once) is a looser
upper bound. ``benchmarks/memory_report.py`` prints the tables and checks the prediction against a measured run.

Notation (all per rank):

=========  =========================================================================================
W          world size (data-parallel ranks; each rank holds the whole LM)
E, E_r     edits in the batch; this rank's shard E_r = ceil(E / W)
t, p       average target / prompt tokens per edit; L = p + t the (padded) sequence length
T_r        cached rows per module = ceil(E_r · t) (one row per target-predicting position)
B          records per micro-batch = min(micro_batch, E_r)
d, dff     hidden and intermediate size; V vocabulary; heads attention heads
K          decoder layers from the lowest edited one to the top (only these run with grad)
M          edited modules; Dh, Dg their input / output width; S = Dh + Dg
r, nb      hypernetwork rank and number of blocks; P_h its parameter count
b          bytes per element of the LM dtype (bf16: 2, fp32: 4); the editor itself always works in fp32 (4 B)
=========  =========================================================================================

What the code keeps (``easyedit_agrade`` at the time of writing; the plan mirrors it):

* **Editing** (the executor, ``AGRADEEditor.edit_deltas``): the lower layers run no-grad one micro-batch at a
  time, right before that micro-batch's cache pass, and their output is dropped afterwards; only the K upper
  layers keep activations for backward; logits exist at target positions only. H and ∇G are cached in fp32 for
  the rank's rows. ΔW is solved per module either in memory with the T×T dual form (one process, T_r < Dh) or
  streamed: HᵀH (Dh×Dh) and HᵀG (Dh×Dg) accumulated piece by piece in fp64 and all-reduced, so **they are
  full-size on every rank whatever W**, like ΔW; M is factored in fp64. Per-module rows and factors are not
  kept.
* **Training** (``AGRADETrainer.compute_gradients``): the lower outputs of the edit, paraphrase and locality
  prompts are kept for the whole step; per module H, ∇G, G (and the G eq 4 used) and the factorisation are kept
  for eq 6; the unedited log-probs on the locality targets are kept for the KL term; ΔW enters as fp32 leaves
  whose grads are g_θ; the hypernetwork has fp32 params, grads and Adam's two moments.

Not modelled: the fp64 / jitter retries of the factorisation (they allocate another Dh² or T² in fp64), the
allocator's caching and fragmentation, CUDA context and library workspaces (cuBLAS, NCCL buffers), the tokeniser
and the Python objects of the records.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

#: bytes per element for the dtypes a model can be held in
DTYPE_BYTES: dict[str, int] = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2,
                               "fp64": 8, "float64": 8}
#: the editor's own dtype (H/∇G cache, hypernetwork, dual solve, ΔW): fp32
EDITOR_BYTES = 4
#: the streamed (primal / data-parallel) path accumulates HᵀH and HᵀG and factors M in fp64
STREAMED_SOLVE_BYTES = 8

EDIT_PHASES = ("lower", "cache", "solve", "apply")
TRAIN_PHASES = ("setup", "lower", "cache", "observe", "solve", "reference", "loss", "surrogate", "step")
#: the phases of one training step (``setup`` is the one-off construction of the trainer)
STEP_PHASES = TRAIN_PHASES[1:]


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of ``dtype`` (``bf16``, ``fp32``, ``float16``, …)."""
    try:
        return DTYPE_BYTES[str(dtype).replace("torch.", "").lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPE_BYTES)}") from None


# ------------------------------------------------------------------------------------------------------------
# model and workload
# ------------------------------------------------------------------------------------------------------------
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
# parameter counts
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


def hypernet_param_count(spec: ModelSpec, rank: int, n_blocks: int = 2) -> int:
    """P_h of the editing hypernetwork (one net per distinct (Dh, Dg); all edited modules share one here).

    P_h = nb·(2·S·r + r + S + 2·M·S) + 2·M + (2·S + 1)
    (per block A: S×r, b₁: r, B: r×S, b₂: S, per-module scale and shift: M×S; per-module η and log λ; the
    normaliser's mean and m2 buffers (S each) and its count).
    """
    S, M = spec.dh + spec.dg, spec.n_modules
    return n_blocks * (2 * S * rank + rank + S + 2 * M * S) + 2 * M + 2 * S + 1


# ------------------------------------------------------------------------------------------------------------
# terms (bytes)
# ------------------------------------------------------------------------------------------------------------
def weights_bytes(spec: ModelSpec, dtype: str) -> int:
    """LM weights: N_params · b."""
    return lm_param_count(spec) * dtype_bytes(dtype)


def lower_copy_bytes(spec: ModelSpec, lower_dtype: str | None) -> int:
    """Training with ``train_lower_dtype``: a second copy of the LM in that dtype runs the frozen lower layers.
    N_params · b_lower (0 when unset)."""
    return 0 if not lower_dtype else lm_param_count(spec) * dtype_bytes(lower_dtype)


def lower_copy_setup_bytes(spec: ModelSpec, dtype: str, lower_dtype: str | None) -> int:
    """One-off, when the trainer is built with ``train_lower_dtype``: the LM is deep-copied in its own dtype and
    then cast tensor by tensor, so for a moment the full copy and the largest cast tensor (the embedding) coexist:
    N_params · b + V · d · b_lower (0 when unset)."""
    if not lower_dtype:
        return 0
    return (lm_param_count(spec) * dtype_bytes(dtype)
            + spec.vocab_size * spec.hidden_size * dtype_bytes(lower_dtype))


def hypernet_bytes(spec: ModelSpec, rank: int, n_blocks: int = 2) -> int:
    """Hypernetwork parameters and buffers in fp32: P_h · 4."""
    return hypernet_param_count(spec, rank, n_blocks) * EDITOR_BYTES


def adam_state_bytes(spec: ModelSpec, rank: int, n_blocks: int = 2) -> int:
    """Adam's two moments (exp_avg, exp_avg_sq) in fp32: 2 · P_h · 4."""
    return 2 * hypernet_param_count(spec, rank, n_blocks) * EDITOR_BYTES


def hypernet_grad_bytes(spec: ModelSpec, rank: int, n_blocks: int = 2) -> int:
    """Hypernetwork gradients in fp32: P_h · 4."""
    return hypernet_param_count(spec, rank, n_blocks) * EDITOR_BYTES


def optimizer_step_bytes(spec: ModelSpec, rank: int, n_blocks: int = 2, world_size: int = 1) -> int:
    """Transient of the optimiser step: Adam's temporaries ≈ 2 · P_h · 4 (foreach implementation), plus the
    flat gradient buffer of the data-parallel all-reduce, P_h · 4, when W > 1."""
    p = hypernet_param_count(spec, rank, n_blocks)
    return (2 + (1 if world_size > 1 else 0)) * p * EDITOR_BYTES


def hidden_stash_bytes(spec: ModelSpec, tokens: float, dtype: str) -> int:
    """Lower-layer outputs kept for reuse (training: edit + paraphrase + locality prompts of the shard):
    Σ_sets E_r · L_set · d · b  (``tokens`` = Σ_sets E_r · L_set)."""
    return math.ceil(tokens * spec.hidden_size * dtype_bytes(dtype))


def lower_pass_bytes(spec: ModelSpec, micro_batch: int, seq_len: int, dtype: str) -> int:
    """One no-grad micro-batch through one lower layer (the working set of the largest layer) plus its output:
    B · L · b · (6·d + 2·kv_dim + 3·dff) + B · L² · 4 (4-D attention mask)."""
    d, f = spec.hidden_size, spec.intermediate_size
    tokens = micro_batch * seq_len
    return tokens * dtype_bytes(dtype) * (6 * d + 2 * spec.kv_dim + 3 * f) + micro_batch * seq_len * seq_len * 4


def activation_bytes_per_token_layer(spec: ModelSpec, seq_len: int, dtype: str) -> int:
    """Bytes autograd saves per token and upper layer when only inputs need gradients (frozen weights save
    nothing for their matmuls). Counted from the tensors autograd actually saves (checked on SmolLM2 with
    ``saved_tensors_hooks``, fp32, SDPA):

    * llama: b·(4·d + 3·dff) + 4·(2·d + 2 + heads + L) — q, k, v (k/v expanded to all heads) and the SDPA output;
      SiLU input, SiLU output and up-projection (3·dff); the two RMSNorm inputs (kept in fp32) and their rsqrt;
      SDPA's logsumexp (heads) and the layer's B×1×L×L mask (L per token).
    * gptj (estimate, eager attention in fp32): b·(3·d + 4·dff + heads·L) + 4·(2·d + 2·heads·L + 2)
      — LN input, v, attention output; four GELU-tanh intermediates; q/k, scores and softmax in fp32.
    * gpt2 (estimate): b·(6·d + 4·dff) + 4·(4 + heads + L).
    """
    d, f, h, L = spec.hidden_size, spec.intermediate_size, spec.num_heads, seq_len
    b = dtype_bytes(dtype)
    if spec.arch == "llama":
        return b * (4 * d + 3 * f) + 4 * (2 * d + 2 + h + L)
    if spec.arch == "gptj":
        return b * (3 * d + 4 * f + h * L) + 4 * (2 * d + 2 * h * L + 2)
    return b * (6 * d + 4 * f) + 4 * (4 + h + L)


def cache_pass_activation_bytes(spec: ModelSpec, micro_batch: int, seq_len: int, dtype: str) -> int:
    """One micro-batch of the cache pass (upper layers with grad, one micro-batch at a time):

    B·L · [(K−1)·a(L) + 4·d  +  M·(Dh + Dg)·b  +  b·(2·d + 3·dff)  +  d·b]

    = saved activations of the K − 1 layers above the lowest edited one (the edited module is the last linear of
    its layer, so in that layer nothing before it is in the graph) and the final norm's fp32 input + the module
    inputs and output-gradients the capture hooks hold for every edited module + one layer's gradients during
    backward + the hidden state entering the lowest edited layer.
    """
    b = dtype_bytes(dtype)
    tokens = micro_batch * seq_len
    per_token = ((spec.upper_layers - 1) * activation_bytes_per_token_layer(spec, seq_len, dtype)
                 + 4 * spec.hidden_size
                 + spec.n_modules * (spec.dh + spec.dg) * b
                 + b * (2 * spec.hidden_size + 3 * spec.intermediate_size)
                 + spec.hidden_size * b)
    return tokens * per_token


def loss_pass_activation_bytes(spec: ModelSpec, micro_batch: int, seq_len: int, dtype: str) -> int:
    """One micro-batch of the training loss pass (ΔW as fp32 hook leaves that need gradients):

    B·L · [(K−1)·a(L) + 4·d  +  M·(Dh + Dg)·4  +  b·(2·d + 3·dff)]

    = activations of the layers above the lowest edited one and the final norm + each edited module's input
    kept in fp32 for ∂L/∂ΔW and its fp32 hook output + one layer's gradients during backward (the hidden states
    entering the lowest edited layer are the kept lower outputs)."""
    b = dtype_bytes(dtype)
    tokens = micro_batch * seq_len
    per_token = ((spec.upper_layers - 1) * activation_bytes_per_token_layer(spec, seq_len, dtype)
                 + 4 * spec.hidden_size
                 + spec.n_modules * (spec.dh + spec.dg) * EDITOR_BYTES
                 + b * (2 * spec.hidden_size + 3 * spec.intermediate_size))
    return tokens * per_token


def logits_bytes(spec: ModelSpec, positions: float, dtype: str, *, training: bool = False) -> int:
    """Logits at target-predicting positions only (never B×L×V), one micro-batch of N = B·t positions:

    N · V · (b + 4·[b≠4] + 3·4)   cache pass: logits, their fp32 copy, log-softmax, two gradients
    N · V · (b + 4·[b≠4] + 5·4)   training: + the KL's exp(ref) and (ref − log p) temporaries
    """
    b = dtype_bytes(dtype)
    per = b + (4 if b != 4 else 0) + (5 if training else 3) * 4
    return math.ceil(positions * spec.vocab_size * per)


def reference_logprob_bytes(spec: ModelSpec, loc_rows: float) -> int:
    """Training: unedited log-probs at the shard's locality-target positions, kept for the KL term:
    E_r · t_loc · V · 4."""
    return math.ceil(loc_rows * spec.vocab_size * EDITOR_BYTES)


def cache_bytes(spec: ModelSpec, rows: int) -> int:
    """The H/∇G cache: Σ_modules T_r · (Dh + Dg) · 4 (fp32 rows of this rank's shard only)."""
    return spec.n_modules * rows * (spec.dh + spec.dg) * EDITOR_BYTES


def observe_bytes(spec: ModelSpec, rows: int) -> int:
    """Training, normaliser update of one module: concatenated H and ∇G, [H, ∇G], and the centred and squared
    deviations: 4 · T_r · (Dh + Dg) · 4."""
    return 4 * rows * (spec.dh + spec.dg) * EDITOR_BYTES


def solve_method(spec: ModelSpec, rows: int, world_size: int = 1, solver: str = "auto") -> str:
    """``"dual"`` (T×T, in memory) iff one process and 0 < T_r < Dh (or ``solver="dual"``); else ``"primal"``
    (streamed: HᵀH and HᵀG accumulated and, for W > 1, all-reduced — full Dh×Dh and Dh×Dg on every rank)."""
    if solver == "dual" and world_size == 1:
        return "dual"
    if solver == "primal" or world_size > 1:
        return "primal"
    return "dual" if 0 < rows < spec.dh else "primal"


def gram_workspace_bytes(spec: ModelSpec, rows: int, method: str, *, training: bool = False,
                         solve_bytes: int = STREAMED_SOLVE_BYTES) -> int:
    """The factorisation of one module (eq 3) and eq 5's solve.

    primal (streamed, ``solve_bytes`` = 8: fp64): (6 + [editing]) · Dh² · 8 + 2 · Dh · Dg · 8 — the accumulated
    HᵀH, its lower triangle, the symmetrised copy, M = HᵀH + e^λ I, its Cholesky factor and LAPACK's
    column-major copy of M; editing also still holds the previous module's factor (training keeps all of them,
    see :func:`kept_factor_bytes`); HᵀG and M⁻¹HᵀG. Independent of T and W.
    dual (in memory, fp32): 3 · T_r² · 4 (K = HHᵀ + e^λ I, its factor, LAPACK's copy) + editing: the previous
    module's factor T_r² · 4 and the current and previous module's concatenated rows 2 · T_r · (Dh + Dg) · 4.
    """
    if method == "primal":
        squares = 6 + (0 if training else 1)
        return (squares * spec.dh * spec.dh + 2 * spec.dh * spec.dg) * solve_bytes
    if training:
        return 3 * rows * rows * EDITOR_BYTES
    return (4 * rows * rows + 2 * rows * (spec.dh + spec.dg)) * EDITOR_BYTES


def kept_factor_bytes(spec: ModelSpec, rows: int, method: str, solve_bytes: int = STREAMED_SOLVE_BYTES) -> int:
    """Training keeps each module's factorisation for eq 6; during the last module's solve the (M − 1) earlier
    ones exist: (M − 1) · Dh² · 8 (primal, fp64) or (M − 1) · T_r² · 4 (dual). (The current module's factor is
    part of :func:`gram_workspace_bytes`.)"""
    if method == "primal":
        return (spec.n_modules - 1) * spec.dh * spec.dh * solve_bytes
    return (spec.n_modules - 1) * rows * rows * EDITOR_BYTES


def g_rows_bytes(spec: ModelSpec, rows: int, method: str) -> int:
    """G rows (T_r × Dg, fp32) alive while one module is solved: primal/streamed 3 · T_r · Dg · 4 (this module's
    G pieces before and after eq 4 and the previous module's final G); dual 2 · T_r · Dg · 4 (G, G_prev)."""
    return (3 if method == "primal" else 2) * rows * spec.dg * EDITOR_BYTES


def hypernet_workspace_bytes(spec: ModelSpec, rows: int, rank: int, n_blocks: int = 2, *,
                             grad: bool = False) -> int:
    """The hypernetwork on ``rows`` rows of one module (fp32).

    no grad (editing): rows · (4·S + 2·r) · 4 — [H, ∇G], normalised copy, a block's hidden (r) and output;
    with grad (training surrogate): rows · (nb·(2·S + r) + 3·S + 2·Dg) · 4 — per block the input and the MLP
    output (S each) and the ReLU output (r) saved for backward, plus the concatenated input, the normalised
    rows and one gradient (S each), and G, P (Dg each)."""
    S = spec.dh + spec.dg
    per_row = (n_blocks * (2 * S + rank) + 3 * S + 2 * spec.dg) if grad else (4 * S + 2 * rank)
    return rows * per_row * EDITOR_BYTES


def kept_rows_bytes(spec: ModelSpec, rows: int, method: str, solve_bytes: int = STREAMED_SOLVE_BYTES) -> int:
    """Training keeps, per module, what eqs 6 and 7 need: the concatenated H and ∇G and the final G (fp32);
    the streamed path also the G_prev eq 4 used and the factorisation's own copy of H in the solve dtype:

    dual:   M · T_r · (Dh + 2·Dg) · 4
    primal: M · T_r · ((Dh + 3·Dg) · 4 + Dh · 8)
    """
    if method == "primal":
        per_row = (spec.dh + 3 * spec.dg) * EDITOR_BYTES + spec.dh * solve_bytes
    else:
        per_row = (spec.dh + 2 * spec.dg) * EDITOR_BYTES
    return spec.n_modules * rows * per_row


def delta_bytes(spec: ModelSpec) -> int:
    """ΔW for every edited module, fp32, full size on every rank: M · Dh · Dg · 4."""
    return spec.n_modules * spec.dh * spec.dg * EDITOR_BYTES


def apply_bytes(spec: ModelSpec, dtype: str) -> int:
    """Applying ΔW in place (the executor, every dtype): exact clones of the edited weights for the restore,
    M · Dh · Dg · b, plus the fp32 sums round(w₃₂ + ΔW): kept as masters for 16-bit weights, M · Dh · Dg · 4, or
    one transient Dh · Dg · 4 for fp32 weights."""
    b = dtype_bytes(dtype)
    masters = spec.n_modules if b < 4 else 1
    return spec.n_modules * spec.dh * spec.dg * b + masters * spec.dh * spec.dg * EDITOR_BYTES


def delta_leaf_bytes(spec: ModelSpec) -> int:
    """Training: ΔW as fp32 leaves (a copy of ΔW) and their gradients g_θ: 2 · M · Dh · Dg · 4."""
    return 2 * spec.n_modules * spec.dh * spec.dg * EDITOR_BYTES


def surrogate_solve_bytes(spec: ModelSpec, rows: int, method: str, solve_bytes: int = STREAMED_SOLVE_BYTES) -> int:
    """Eq 6 and the λ gradient for one module.

    primal (fp64 factor): g_θ and ΔW cast to fp64, X = M⁻¹g_θ and ⟨X, ΔW⟩'s product (4 · Dh · Dg · 8), P = H X and
    P ⊙ G (2 · T_r · Dg · 8);
    dual (fp32): P, H g_θ (2 · T_r · Dg · 4) and g_θ − HᵀP and its product with ΔW (2 · Dh · Dg · 4).
    """
    if method == "primal":
        return (4 * spec.dh * spec.dg + 2 * rows * spec.dg) * solve_bytes
    return (2 * spec.dh * spec.dg + 2 * rows * spec.dg) * EDITOR_BYTES


# ------------------------------------------------------------------------------------------------------------
# plans
# ------------------------------------------------------------------------------------------------------------
@dataclass
class Term:
    """One memory term: ``nbytes`` alive during ``phases``; ``scales`` says whether it shrinks with W."""

    key: str
    label: str
    nbytes: int
    phases: tuple[str, ...]
    formula: str
    scales: bool = False


@dataclass
class MemoryPlan:
    """All terms of one run (editing or training) on one rank."""

    mode: str
    spec: ModelSpec
    workload: Workload
    world_size: int
    dtype: str
    micro_batch: int
    rank: int
    method: str
    terms: list[Term] = field(default_factory=list)

    @property
    def phases(self) -> tuple[str, ...]:
        return EDIT_PHASES if self.mode == "edit" else TRAIN_PHASES

    def term(self, key: str) -> Term:
        for t in self.terms:
            if t.key == key:
                return t
        raise KeyError(key)

    def bytes_of(self, key: str) -> int:
        return self.term(key).nbytes

    def phase_bytes(self) -> dict[str, int]:
        """Σ of the terms alive in each phase."""
        return {ph: sum(t.nbytes for t in self.terms if ph in t.phases) for ph in self.phases}

    @property
    def peak(self) -> tuple[int, str]:
        """(bytes, phase) of the largest phase total — the predicted peak of this rank."""
        per = self.phase_bytes()
        phase = max(per, key=lambda p: per[p])
        return per[phase], phase

    @property
    def peak_bytes(self) -> int:
        return self.peak[0]

    @property
    def sum_bytes(self) -> int:
        """Every term at once (an upper bound that ignores that phases do not overlap)."""
        return sum(t.nbytes for t in self.terms)

    def peak_without(self, *keys: str, phases: Sequence[str] | None = None) -> int:
        """The peak over ``phases`` (default: all) with the terms ``keys`` left out (e.g. ``"weights"`` to compare
        with a measured delta after loading)."""
        per = {ph: sum(t.nbytes for t in self.terms if ph in t.phases and t.key not in keys)
               for ph in (phases or self.phases)}
        return max(per.values())


def _common(spec: ModelSpec, workload: Workload, world_size: int, dtype: str | None, micro_batch: int | None,
            rank: int | None, training: bool):
    dtype = dtype or spec.default_dtype
    dtype_bytes(dtype)
    mb = micro_batch or (spec.train_micro_batch if training else spec.edit_micro_batch)
    rank = rank or spec.default_rank
    e_r = workload.edits_per_rank(world_size)
    rows = workload.rows_per_rank(world_size)
    return dtype, mb, rank, e_r, rows, min(mb, e_r)


def editing_plan(spec: ModelSpec, workload: Workload, world_size: int = 1, *, dtype: str | None = None,
                 micro_batch: int | None = None, rank: int | None = None, n_blocks: int = 2,
                 solver: str = "auto") -> MemoryPlan:
    """Per-rank memory of one AGRADE edit of ``workload`` (the executor path: ``AGRADEEditor.edit_deltas`` and
    the in-place apply). Phases: lower (one micro-batch through the frozen layers), cache (its upper-layer pass
    with grad), solve (one module's factorisation, all ΔW so far), apply."""
    dtype, mb, rank, e_r, rows, B = _common(spec, workload, world_size, dtype, micro_batch, rank, False)
    method = solve_method(spec, rows, world_size, solver)
    L_mean, t, L_max = workload.sets()["edit"]
    piece_rows = math.ceil(B * t)  # the streamed path maps one cached piece (one micro-batch) at a time
    all_ph = EDIT_PHASES
    terms = [
        Term("weights", "LM weights", weights_bytes(spec, dtype), all_ph, "N_params·b"),
        Term("hypernet", "hypernetwork params (fp32)", hypernet_bytes(spec, rank, n_blocks), all_ph, "P_h·4"),
        Term("lower_pass", "lower layers, one micro-batch (no grad)", lower_pass_bytes(spec, B, L_max, dtype),
             ("lower",), "B·L·b·(6d+2d_kv+3dff) + B·L²·4", scales=e_r < mb),
        Term("activations", "cache pass activations, one micro-batch (upper layers)",
             cache_pass_activation_bytes(spec, B, L_max, dtype), ("cache",),
             "B·L·[(K−1)·a(L) + 4d + M·S·b + b·(2d+3dff) + d·b]", scales=e_r < mb),
        Term("logits", "logits at target positions, one micro-batch", logits_bytes(spec, B * t, dtype),
             ("cache",), "B·t·V·(b + 4[b≠4] + 12)", scales=e_r < mb),
        Term("cache", "H/∇G cache (fp32, this rank's rows)", cache_bytes(spec, rows), ("lower", "cache", "solve"),
             "M·T_r·(Dh+Dg)·4", scales=True),
        Term("gram", f"Gram/Cholesky workspace ({method})", gram_workspace_bytes(spec, rows, method), ("solve",),
             "7·Dh²·8 + 2·Dh·Dg·8" if method == "primal" else "4·T_r²·4 + 2·T_r·S·4", scales=method == "dual"),
        Term("g_rows", "G rows of the current and previous module", g_rows_bytes(spec, rows, method), ("solve",),
             ("3" if method == "primal" else "2") + "·T_r·Dg·4", scales=True),
        Term("hypernet_ws", "hypernetwork forward (no grad)",
             hypernet_workspace_bytes(spec, piece_rows if method == "primal" else rows, rank, n_blocks),
             ("solve",), "rows·(4S + 2r)·4", scales=True),
        Term("delta", "ΔW, all modules (fp32)", delta_bytes(spec), ("solve", "apply"), "M·Dh·Dg·4"),
        Term("apply", "apply: weight clones + fp32 sums", apply_bytes(spec, dtype), ("apply",),
             "M·Dh·Dg·b + (M or 1)·Dh·Dg·4"),
    ]
    return MemoryPlan("edit", spec, workload, world_size, dtype, mb, rank, method, terms)


def training_plan(spec: ModelSpec, workload: Workload, world_size: int = 1, *, dtype: str | None = None,
                  micro_batch: int | None = None, rank: int | None = None, n_blocks: int = 2,
                  solver: str = "auto", lower_dtype: str | None | bool = True) -> MemoryPlan:
    """Per-rank memory of one AGRADE training step (``AGRADETrainer.train_step``) on ``workload`` (the global
    step batch; each rank takes E_r records). ``lower_dtype=True`` uses ``spec.train_lower_dtype``; a dtype name
    or None overrides it. Steady state: Adam's moments and last step's grads already exist. The ``setup`` phase
    is the one-off construction of the trainer (it matters only with a lower dtype: the deep copy); use
    ``plan.peak_without(phases=STEP_PHASES)`` for the step alone."""
    dtype, mb, rank, e_r, rows, B = _common(spec, workload, world_size, dtype, micro_batch, rank, True)
    method = solve_method(spec, rows, world_size, solver)
    low = spec.train_lower_dtype if lower_dtype is True else (lower_dtype or None)
    sets = workload.sets()
    stash_tokens = e_r * sum(L for L, _t, _m in sets.values())
    L_edit, t_edit, Lmax_edit = sets["edit"]
    t_loc = sets["loc"][1]
    loss_act = max(loss_pass_activation_bytes(spec, B, Lm, dtype) + logits_bytes(spec, B * t, dtype, training=True)
                   for _L, t, Lm in sets.values())
    every = TRAIN_PHASES
    step = STEP_PHASES
    kept = ("solve", "reference", "loss", "surrogate")
    terms = [
        Term("weights", "LM weights", weights_bytes(spec, dtype), every, "N_params·b"),
        Term("lower_copy_setup", "setup only: deep copy of the LM before its cast to the lower dtype",
             lower_copy_setup_bytes(spec, dtype, low), ("setup",), "N_params·b + V·d·b_lower"),
        Term("lower_copy", f"LM copy for the frozen lower layers ({low or '-'})", lower_copy_bytes(spec, low), step,
             "N_params·b_lower"),
        Term("hypernet", "hypernetwork params (fp32)", hypernet_bytes(spec, rank, n_blocks), every, "P_h·4"),
        Term("adam", "Adam state (2 × params, fp32)", adam_state_bytes(spec, rank, n_blocks), step, "2·P_h·4"),
        Term("hypernet_grad", "hypernetwork grads (fp32)", hypernet_grad_bytes(spec, rank, n_blocks), step,
             "P_h·4"),
        Term("stash", "lower-layer outputs kept (edit + paraphrase + locality)",
             hidden_stash_bytes(spec, stash_tokens, dtype), step, "E_r·ΣL·d·b", scales=True),
        Term("lower_pass", "lower layers, one micro-batch (no grad)",
             lower_pass_bytes(spec, B, max(m for _L, _t, m in sets.values()), dtype), ("lower",),
             "B·L·b·(6d+2d_kv+3dff) + B·L²·4", scales=e_r < mb),
        Term("activations", "cache pass activations, one micro-batch (upper layers)",
             cache_pass_activation_bytes(spec, B, Lmax_edit, dtype) + logits_bytes(spec, B * t_edit, dtype),
             ("cache",), "B·L·[(K−1)·a(L) + M·S·b + …] + logits", scales=e_r < mb),
        Term("cache", "H/∇G cache (fp32, this rank's rows)", cache_bytes(spec, rows),
             ("cache", "observe") + kept, "M·T_r·(Dh+Dg)·4", scales=True),
        Term("observe", "normaliser update, one module", observe_bytes(spec, rows), ("observe",),
             "4·T_r·S·4", scales=True),
        Term("kept_rows", "per-module H, ∇G, G (+ fp64 H) kept for eq 6/7", kept_rows_bytes(spec, rows, method),
             kept, "M·T_r·((Dh+3Dg)·4 + Dh·8)" if method == "primal" else "M·T_r·(Dh+2Dg)·4", scales=True),
        Term("kept_factors", "factorisations of earlier modules", kept_factor_bytes(spec, rows, method), kept,
             "(M−1)·Dh²·8" if method == "primal" else "(M−1)·T_r²·4", scales=method == "dual"),
        Term("gram", f"Gram/Cholesky workspace ({method})",
             gram_workspace_bytes(spec, rows, method, training=True), ("solve",),
             "6·Dh²·8 + 2·Dh·Dg·8" if method == "primal" else "3·T_r²·4", scales=method == "dual"),
        Term("g_rows", "G pieces of the current and previous module",
             g_rows_bytes(spec, rows, method) if method == "primal" else 0, ("solve",), "3·T_r·Dg·4 (streamed)",
             scales=True),
        Term("hypernet_ws", "hypernetwork forward (no grad)",
             hypernet_workspace_bytes(spec, math.ceil(B * t_edit) if method == "primal" else rows, rank, n_blocks),
             ("solve",), "rows·(4S + 2r)·4", scales=True),
        Term("delta", "ΔW, all modules (fp32)", delta_bytes(spec), kept, "M·Dh·Dg·4"),
        Term("ref_logprobs", "unedited log-probs at locality targets", reference_logprob_bytes(spec, e_r * t_loc),
             ("reference", "loss", "surrogate"), "E_r·t_loc·V·4", scales=True),
        Term("delta_leaves", "ΔW leaves + g_θ (fp32)", delta_leaf_bytes(spec), ("loss", "surrogate"),
             "2·M·Dh·Dg·4"),
        Term("loss_activations", "loss pass, one micro-batch (activations + logits)", loss_act, ("loss",),
             "B·L·[(K−1)·a(L) + M·S·4 + …] + logits", scales=e_r < mb),
        Term("surrogate", "eq 6 solve + hypernetwork with grad, one module",
             surrogate_solve_bytes(spec, rows, method)
             + hypernet_workspace_bytes(spec, rows, rank, n_blocks, grad=True), ("surrogate",),
             ("(4·Dh·Dg + 2·T_r·Dg)·8" if method == "primal" else "(2·Dh·Dg + 2·T_r·Dg)·4")
             + " + T_r·(nb(2S+r)+3S+2Dg)·4", scales=True),
        Term("opt_step", "optimiser step temporaries", optimizer_step_bytes(spec, rank, n_blocks, world_size),
             ("step",), "2·P_h·4 (+ P_h·4 flat all-reduce buffer if W>1)"),
    ]
    return MemoryPlan("train", spec, workload, world_size, dtype, mb, rank, method, terms)


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


# ------------------------------------------------------------------------------------------------------------
# formatting
# ------------------------------------------------------------------------------------------------------------
def fmt_bytes(n: float) -> str:
    """``12.3 GiB`` / ``45.6 MiB`` / ``7.8 KiB``."""
    for unit, div in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(n) >= div or unit == "KiB":
            return f"{n / div:.2f} {unit}" if unit == "GiB" else f"{n / div:.1f} {unit}"
    return f"{n} B"  # pragma: no cover


def markdown_table(plans: Sequence[MemoryPlan]) -> str:
    """One Markdown table: terms as rows, one column per plan (e.g. world sizes), then peak and Σ rows."""
    if not plans:
        return ""
    head = "| term | formula | " + " | ".join(f"W={p.world_size}" for p in plans) + " |"
    lines = [head, "|---|---|" + "---|" * len(plans)]
    for i, t in enumerate(plans[0].terms):
        cells = [fmt_bytes(p.terms[i].nbytes) if p.terms[i].nbytes else "–" for p in plans]
        lines.append(f"| {t.label} | `{t.formula}` | " + " | ".join(cells) + " |")
    lines.append("| **predicted peak** (phase) | max over phases | "
                 + " | ".join(f"**{fmt_bytes(p.peak[0])}** ({p.peak[1]})" for p in plans) + " |")
    lines.append("| Σ all terms (upper bound) | | " + " | ".join(fmt_bytes(p.sum_bytes) for p in plans) + " |")
    lines.append("| solve | | " + " | ".join(f"{p.method}, T_r={p.workload.rows_per_rank(p.world_size)}"
                                                for p in plans) + " |")
    return "\n".join(lines)


def plans_for(spec: ModelSpec, workload: Workload, world_sizes: Iterable[int],
              **kw: Any) -> dict[str, list[MemoryPlan]]:
    """``{"edit": [...], "train": [...]}`` for each world size."""
    train_kw = dict(kw)
    edit_kw = {k: v for k, v in kw.items() if k != "lower_dtype"}
    ws = list(world_sizes)
    return {"edit": [editing_plan(spec, workload, w, **edit_kw) for w in ws],
            "train": [training_plan(spec, workload, w, **train_kw) for w in ws]}


__all__ = [
    "DTYPE_BYTES", "EDITOR_BYTES", "MODELS", "MemoryPlan", "ModelSpec", "Term", "Workload",
    "activation_bytes_per_token_layer", "adam_state_bytes", "apply_bytes", "cache_bytes",
    "cache_pass_activation_bytes", "delta_bytes", "delta_leaf_bytes", "dtype_bytes", "editing_plan", "fmt_bytes",
    "g_rows_bytes", "get_spec", "gram_workspace_bytes", "hidden_stash_bytes", "hypernet_bytes",
    "hypernet_grad_bytes", "hypernet_param_count", "hypernet_workspace_bytes", "kept_factor_bytes",
    "kept_rows_bytes", "lm_param_count", "logits_bytes", "loss_pass_activation_bytes", "lower_copy_bytes",
    "lower_copy_setup_bytes", "STEP_PHASES", "TRAIN_PHASES", "EDIT_PHASES", "STREAMED_SOLVE_BYTES",
    "lower_pass_bytes", "markdown_table", "observe_bytes", "optimizer_step_bytes", "plans_for",
    "reference_logprob_bytes", "solve_method", "surrogate_solve_bytes", "training_plan",
    "weights_bytes",
]
