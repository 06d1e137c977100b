"""Batched teacher-forced scoring of ``prompt + target`` pairs: one forward pass per padded batch.

For every pair the model reads ``prompt + " " + target`` (tokenised by
:func:`easyedit_agrade.core.tokenize.encode_prompt_target`) and we record, at each target position, the argmax
token (teacher forcing: the true previous tokens are always fed) and the log-probability of the true token. These
are exactly the quantities behind EasyEdit's ``test_prediction_acc`` (token accuracy, and the argmax tokens it
compares for locality), the AGRADE paper's ES/GS/LS, and log-likelihood scoring of multiple-choice answers.

Batches are built by sorting pairs by length and filling a token budget, so padding stays small. Position ids are
computed from the attention mask (real tokens always sit at positions ``0..n-1``), hence left and right padding
give the same numbers as scoring each pair alone, which is what EasyEdit does (one record per forward, no padding).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

from ..core.tokenize import encode_prompt_target, join_prompt_target
from .metrics import token_accuracy

if TYPE_CHECKING:  # pragma: no cover
    import torch

#: default token budget of one forward pass (batch size x padded length)
DEFAULT_BATCH_TOKENS = 2048
DEFAULT_MAX_BATCH = 64


@dataclass
class PairScore:
    """Teacher-forced result for one ``(prompt, target)`` pair."""

    pred: list[int]  # argmax token id at each target position
    target: list[int]  # the target's token ids
    logprob: float  # sum of log p(target token) over the target
    token_logprobs: list[float] = field(default_factory=list, repr=False)

    @property
    def n_tokens(self) -> int:
        return len(self.target)

    @property
    def acc(self) -> float:
        """Fraction of target tokens predicted correctly (EasyEdit's ``test_prediction_acc`` for one record; NaN for
        an empty target): :func:`.metrics.token_accuracy`."""
        return token_accuracy(self.pred, self.target)

    @property
    def exact(self) -> bool:
        """All target tokens predicted (= greedy decoding starts with the target)."""
        return bool(self.target) and self.pred == self.target

    @property
    def mean_logprob(self) -> float:
        return self.logprob / max(len(self.target), 1)


def _pair_lengths(tok: Any, prompts: Sequence[str], targets: Sequence[str]) -> list[int]:
    texts = [join_prompt_target(p, t)[0] for p, t in zip(prompts, targets)]
    enc = tok(texts, add_special_tokens=True)
    return [len(ids) for ids in enc["input_ids"]]


def plan_batches(lengths: Sequence[int], batch_tokens: int = DEFAULT_BATCH_TOKENS,
                 max_batch: int = DEFAULT_MAX_BATCH) -> list[list[int]]:
    """Group indices (sorted by length) into batches whose padded size ``B * max_len`` fits ``batch_tokens``.

    A single pair longer than the budget still gets its own batch.
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    width = 0
    for i in order:
        new_width = max(width, lengths[i])
        if current and (new_width * (len(current) + 1) > batch_tokens or len(current) >= max_batch):
            batches.append(current)
            current, new_width = [], lengths[i]
        current.append(i)
        width = new_width
    if current:
        batches.append(current)
    return batches


def _forward_logits(model: Any, input_ids: "torch.Tensor", attention_mask: "torch.Tensor",
                    keep_last: int | None) -> "torch.Tensor":
    """Logits of a padded batch with position ids taken from the attention mask.

    ``keep_last``: only the logits of the last ``keep_last`` positions are needed (left padding); passed to the
    model as ``logits_to_keep`` when it accepts it, else the full logits are sliced.
    """
    import torch

    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
    out = None
    if keep_last is not None:
        try:
            out = model(**kwargs, logits_to_keep=keep_last)
        except TypeError:
            out = None
    if out is None:
        out = model(**kwargs)
    logits = out if isinstance(out, torch.Tensor) else out.logits
    if keep_last is not None and logits.shape[1] != keep_last:
        logits = logits[:, -keep_last:]
    return logits


def score_pairs(
    model: Any,
    tok: Any,
    prompts: Sequence[str],
    targets: Sequence[str],
    *,
    padding_side: str = "left",
    max_length: int | None = None,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    max_batch: int = DEFAULT_MAX_BATCH,
    device: Any = None,
    with_token_logprobs: bool = False,
) -> list[PairScore]:
    """Teacher-forced scores of ``prompts[i] + " " + targets[i]``, in input order; one forward per batch."""
    import torch

    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    if not prompts:
        return []
    if device is None:
        device = next(model.parameters()).device
    lengths = _pair_lengths(tok, prompts, targets)
    results: list[PairScore | None] = [None] * len(prompts)
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        with torch.no_grad():
            for idx in plan_batches(lengths, batch_tokens, max_batch):
                batch = encode_prompt_target(tok, [prompts[i] for i in idx], [targets[i] for i in idx],
                                             max_length=max_length, padding_side=padding_side)
                predict = batch.predict_mask
                labels = batch.shifted_labels
                keep = None
                if padding_side == "left":
                    # every predicting position lies in the last (longest target + 1) positions
                    cols = predict.any(0).nonzero()
                    keep = int(predict.shape[1] - cols.min().item()) if len(cols) else None
                logits = _forward_logits(model, batch.input_ids.to(device), batch.attention_mask.to(device), keep)
                if keep is not None:
                    predict, labels = predict[:, -keep:], labels[:, -keep:]
                logits = logits.float()
                pred = logits.argmax(-1).cpu()
                logp = torch.log_softmax(logits, dim=-1)
                tgt = labels.clamp_min(0).to(logp.device)
                tok_lp = logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1).cpu()
                for row, i in enumerate(idx):
                    m = predict[row]
                    tl = tok_lp[row][m]
                    results[i] = PairScore(
                        pred=pred[row][m].tolist(),
                        target=labels[row][m].tolist(),
                        logprob=float(tl.sum()),
                        token_logprobs=tl.tolist() if with_token_logprobs else [],
                    )
    finally:
        if was_training:
            model.train()
    return results  # type: ignore[return-value]


def perplexity(model: Any, windows: "torch.Tensor", *, batch_size: int = 4, device: Any = None) -> float:
    """Perplexity over token windows ``(n_windows, width)`` (no padding): exp of the mean next-token NLL."""
    import math

    import torch

    if device is None:
        device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, windows.shape[0], batch_size):
            ids = windows[start:start + batch_size].to(device)
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
            logits = (out if isinstance(out, torch.Tensor) else out.logits)[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                    reduction="sum")
            total_nll += float(nll)
            total_tokens += ids[:, 1:].numel()
    return math.exp(total_nll / max(total_tokens, 1))
