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
from .byte_terms import (
    DTYPE_BYTES, EDITOR_BYTES, STREAMED_SOLVE_BYTES, activation_bytes_per_token_layer, adam_state_bytes, apply_bytes,
    cache_bytes, cache_pass_activation_bytes, delta_bytes, delta_leaf_bytes, dtype_bytes, g_rows_bytes,
    gram_workspace_bytes, hidden_stash_bytes, hypernet_bytes, hypernet_grad_bytes, hypernet_param_count,
    hypernet_workspace_bytes, kept_factor_bytes, kept_rows_bytes, logits_bytes,
    loss_pass_activation_bytes, lower_copy_bytes, lower_copy_setup_bytes, lower_pass_bytes, observe_bytes,
    optimizer_step_bytes, reference_logprob_bytes, solve_method, surrogate_solve_bytes, weights_bytes)
from .model_spec import MODELS, ModelSpec, Workload, get_spec, lm_param_count
from .plans import EDIT_PHASES, STEP_PHASES, TRAIN_PHASES, MemoryPlan, Term, editing_plan, plans_for, training_plan
from .report import fmt_bytes, markdown_table

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
