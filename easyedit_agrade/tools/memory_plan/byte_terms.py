"""The byte terms of the memory plan: parameter counts and one named function per term (bytes, the formula in its
docstring). Notation: :mod:`easyedit_agrade.tools.memory_plan`."""
from __future__ import annotations

import math

from .model_spec import ModelSpec, lm_param_count

#: bytes per element for the dtypes a model can be held in
DTYPE_BYTES: dict[str, int] = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2,
                               "fp64": 8, "float64": 8}
#: the editor's own dtype (H/∇G cache, hypernetwork, dual solve, ΔW): fp32
EDITOR_BYTES = 4
#: the streamed (primal / data-parallel) path accumulates HᵀH and HᵀG and factors M in fp64
STREAMED_SOLVE_BYTES = 8


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of ``dtype`` (``bf16``, ``fp32``, ``float16``, …)."""
    try:
        return DTYPE_BYTES[str(dtype).replace("torch.", "").lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPE_BYTES)}") from None



# ------------------------------------------------------------------------------------------------------------
# parameter counts
# ------------------------------------------------------------------------------------------------------------
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
