"""Target positions the hypernetwork cannot handle get no edit signal (G = 0): two guards.

1. **Massive activations** (``max_key_norm_ratio``) — the check described first below.
2. **Rows outside the normaliser's training distribution** (``max_row_zscore``) — see
   :func:`out_of_distribution_rows`: a row whose key or output-gradient part has a root-mean-square z-score above
   the limit under the network's *frozen* input normaliser.

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

from typing import Iterable, Optional, TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover
    from ...core.hypernet import RunningNormalizer


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
    return suppress_rows(G, massive_rows(H, max_ratio, reference))


def row_zscores(normalizer: "RunningNormalizer", H: torch.Tensor, grad: torch.Tensor
                ) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """Root-mean-square z-score of each row's key part (``H``) and gradient part (``grad``) under ``normalizer``
    (the statistics the hypernetwork was trained with); None while the normaliser has no statistics."""
    if float(normalizer.count) < 2 or H.shape[0] == 0:
        return None
    dtype = normalizer.mean.dtype
    z = normalizer(torch.cat([H.detach().to(dtype), grad.detach().to(dtype)], dim=1))
    k = H.shape[1]
    return z[:, :k].pow(2).mean(1).sqrt(), z[:, k:].pow(2).mean(1).sqrt()


def out_of_distribution_rows(normalizer: "RunningNormalizer", H: torch.Tensor, grad: torch.Tensor,
                             max_z: Optional[float]) -> Optional[torch.Tensor]:
    """Bool mask of the rows whose key or gradient RMS z-score exceeds ``max_z`` (``max_row_zscore``); None when
    the check is off, the normaliser has no statistics, or no row qualifies.

    Why: the hypernetwork only ever saw rows distributed like its training edits; for a row far outside them its
    output is an extrapolation, and eq 1's coefficient makes that row's G large. On the embedded model the
    training-distribution rows (CounterFact train/val) stay below RMS z 3.8 in every edited module, while the
    zsRE edit "When was Welsh Proms launched? → 1999" has a row (at the lone space before the digits, predicting
    "1") with gradient z ≈ 6.3–6.9 in layers 24–27 although its key norm is ordinary — the massive-activation check
    does not see it. Its G was 3–4 times every other row's; the layer-27 ΔW of that single edit alone sent
    WikiText-2 perplexity from 31 to 2,300, all six layers to 4·10⁷ (every lone space before a number in the text
    now predicted "1"). With the row's G set to 0 (``max_row_zscore: 5``), perplexity stays at 40 and the other
    rows still make the edit. Applied only with a frozen normaliser (editing, validation): a training step's
    statistics are still moving.
    """
    if max_z is None:
        return None
    z = row_zscores(normalizer, H, grad)
    if z is None:
        return None
    mask = (z[0] > float(max_z)) | (z[1] > float(max_z))
    return mask.to(H.device) if bool(mask.any()) else None


def suppress_rows(G: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """``G`` with the rows of ``mask`` set to zero (differentiable in the other rows); ``G`` itself for None."""
    if mask is None:
        return G
    return G * (~mask).to(device=G.device, dtype=G.dtype)[:, None]
