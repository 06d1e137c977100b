"""Target positions whose edited-module input carries a *massive activation* get no edit signal (G = 0).

Small decoder LMs put a few huge activations (hundreds of times the typical entry) on attention-sink tokens: the
first token of a sequence and, in some contexts, a later token. SmolLM2-135M-Instruct does this to the lone
space token before a number in e.g. "When was Ayyubid dynasty abolished? 1279": at ``model.layers.28.mlp.down_proj``
that position's input row has norm 606 where every other row has about 50 (median). That row is far outside what
the hypernetwork's frozen normaliser was fitted on (z-scores above 500), the network's output for it explodes, and
eq 1's coefficient c = −η⟨H, H̃⟩ (quadratic in the row) is 250 times the median: the ΔW of that one edit had norm
1,150 against a weight norm of 190 and sent WikiText perplexity from 39 to 10⁶ (every edit in the same batch failed
with it — the bench's 0/0/0 rows).

Such a row is *kept* in the Gram matrix of eq 3 with its G row set to zero: the ridge solve then also asks ΔW to
leave that input's output unchanged (the sink keeps working), and the other target positions and the other
modules still carry the edit. A row is "massive" when its norm exceeds ``max_key_norm_ratio`` (hparam, default 4;
None turns this off) times the median row norm of the same module over the rows being edited together (the
streamed path takes the median over all cached pieces, so it agrees with the in-memory one; in data-parallel
editing each rank uses the median of its own rows). On the embedded model the ordinary rows of the benchmark pool
(first 512 records) stay at or below 3 times the median; the sink rows lie at 4.1 (zsRE "When was Liu Song dynasty
abolished? 1607") to 12.5; the CounterFact validation edits (the training data's distribution) stay below 2.5, so
the check does not change what the shipped archive was trained or validated on.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch


def row_norm_median(H: torch.Tensor | Iterable[torch.Tensor], dtype: torch.dtype | None = None
                    ) -> Optional[torch.Tensor]:
    """The median row norm of ``H`` (a tensor, or an iterable of row pieces, e.g. a cache's chunks); None when
    there are no rows. ``dtype``: compute in this dtype (the editor's)."""
    pieces = [H] if isinstance(H, torch.Tensor) else [h[0] if isinstance(h, (tuple, list)) else h for h in H]
    norms = [p.to(dtype or p.dtype).norm(dim=1) for p in pieces if p.shape[0]]
    if not norms:
        return None
    return torch.cat([n.to(norms[0].device) for n in norms]).median()


def massive_rows(H: torch.Tensor, max_ratio: Optional[float],
                 reference: Optional[torch.Tensor | float] = None) -> Optional[torch.Tensor]:
    """Bool mask of the rows of ``H`` whose norm exceeds ``max_ratio × reference`` (default reference: the
    median row norm of ``H``); None when the check is off or no row qualifies."""
    if max_ratio is None or H.shape[0] == 0:
        return None
    ref = row_norm_median(H) if reference is None else torch.as_tensor(reference)
    if ref is None or not bool(ref > 0):
        return None
    mask = H.norm(dim=1) > float(max_ratio) * ref.to(device=H.device, dtype=H.dtype)
    return mask if bool(mask.any()) else None


def suppress_massive_rows(G: torch.Tensor, H: torch.Tensor, max_ratio: Optional[float],
                          reference: Optional[torch.Tensor | float] = None) -> torch.Tensor:
    """``G`` with the rows of :func:`massive_rows` set to zero (differentiable in the other rows)."""
    mask = massive_rows(H, max_ratio, reference)
    if mask is None:
        return G
    return G * (~mask).to(device=G.device, dtype=G.dtype)[:, None]
