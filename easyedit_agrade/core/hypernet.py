"""The editing hypernetwork shared by AGRADE (MALMEN-style) and InstructEdit (MEND-style).

Both methods feed a pair of per-token row vectors into a small network and read back a pair of the same
shapes: AGRADE maps (H, ∇G) -> (H̃, ∇G̃) (module inputs and output-gradients); MEND maps (u, δ) -> (ũ, δ̃).

Architecture (one :class:`HyperNetwork` per edited-weight *shape*, shared by every module of that shape):

* :class:`RunningNormalizer` — per-feature running mean/std over the concatenated row ``[key, value]``.
  Its statistics change **only** through :meth:`HyperNetwork.observe`, which does nothing unless the network is
  in training mode (``net.train()``); :meth:`HyperNetwork.forward` never changes them. Editing therefore uses
  frozen statistics, and a training step that runs the network twice (once without grad to edit, once with grad
  for the surrogate loss) sees the same normalisation both times.
* ``n_blocks`` :class:`LowRankBlock` — ``y + scale_m ⊙ (ReLU(y A + b₁) B + b₂) + shift_m`` with A (size×rank),
  B (rank×size), and a per-module (``m``) scale and shift. B, b₂ and the shifts start at 0 and the scales at 1, so
  an untrained network is exactly "normalise, then identity"; B, b₂ and the shifts get gradient at once,
  A, b₁ and the scales as soon as B is non-zero (after the first update).
* per-module scalars: ``lr`` (AGRADE's η of eq 1 / MEND's edit learning rate) and ``log_lambda`` (AGRADE's λ of
  eq 3, e^λ is the ridge), as 1-D parameters indexed by the module's position in its shape group.

:class:`EditorNetworks` groups the per-shape networks for a list of edited modules and gives the Adam parameter
groups (body / η / λ, each with its own learning rate).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import nn


class RunningNormalizer(nn.Module):
    """Per-feature running mean and standard deviation (Chan et al.'s parallel update), frozen unless told.

    Buffers: ``count`` (0-d, float64), ``mean`` and ``m2`` (size,). ``normalize`` is the identity while fewer than
    two rows have been observed. ``eps`` is added to the std.
    """

    def __init__(self, size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.size = int(size)
        self.eps = float(eps)
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(size))
        self.register_buffer("m2", torch.zeros(size))

    @torch.no_grad()
    def update(self, x: torch.Tensor, collective=None) -> None:
        """Fold the rows of ``x`` (n, size) into the statistics. With a multi-rank ``collective``
        (:mod:`easyedit_agrade.distributed`) the batch is the union of every rank's rows: its count, mean and
        squared deviations are summed over ranks, so every rank folds in the same global batch."""
        if x.dim() != 2 or x.shape[1] != self.size:
            raise ValueError(f"normalizer expects (n, {self.size}) rows, got {tuple(x.shape)}")
        x = x.to(self.mean.dtype)
        if collective is not None and collective.is_distributed:
            head = torch.cat([torch.tensor([float(x.shape[0])], dtype=torch.float64, device=x.device),
                              x.sum(0, dtype=torch.float64)])
            collective.all_reduce_(head)
            n = int(head[0])
            if n == 0:
                return
            b_mean = (head[1:] / n).to(self.mean.dtype)
            b_m2 = ((x - b_mean) ** 2).sum(0, dtype=torch.float64)
            collective.all_reduce_(b_m2)
            b_m2 = b_m2.to(self.mean.dtype)
        else:
            n = x.shape[0]
            if n == 0:
                return
            b_mean = x.mean(0)
            b_m2 = ((x - b_mean) ** 2).sum(0)
        total = float(self.count) + n
        delta = b_mean - self.mean
        self.mean.add_(delta * (n / total))
        self.m2.add_(b_m2 + delta ** 2 * (float(self.count) * n / total))
        self.count.fill_(total)

    def std(self) -> torch.Tensor:
        if float(self.count) < 2:
            return torch.ones_like(self.mean)
        return (self.m2 / (float(self.count) - 1)).clamp_min(0).sqrt()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(self.count) < 2:
            return x
        return (x - self.mean.to(x.dtype)) / (self.std().to(x.dtype) + self.eps)


class LowRankBlock(nn.Module):
    """``y + scale_m ⊙ (ReLU(y A + b₁) B + b₂) + shift_m`` — a rank-``rank`` residual MLP block."""

    def __init__(self, size: int, rank: int, n_modules: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.randn(size, rank, generator=generator) / size ** 0.5)
        self.b1 = nn.Parameter(torch.zeros(rank))
        self.B = nn.Parameter(torch.zeros(rank, size))
        self.b2 = nn.Parameter(torch.zeros(size))
        self.scale = nn.Parameter(torch.ones(n_modules, size))
        self.shift = nn.Parameter(torch.zeros(n_modules, size))

    def forward(self, y: torch.Tensor, module_idx: int) -> torch.Tensor:
        z = torch.relu(y @ self.A + self.b1) @ self.B + self.b2
        return y + self.scale[module_idx] * z + self.shift[module_idx]


class HyperNetwork(nn.Module):
    """(key, value) rows -> (key~, value~) rows, for all modules of one weight shape.

    ``key_size`` is the module's input width (Dh for AGRADE, u for MEND), ``value_size`` its output width
    (Dg, δ). ``lr_init`` fills the per-module ``lr`` (η), ``log_lambda_init`` the per-module ``log_lambda``.
    """

    def __init__(
        self,
        key_size: int,
        value_size: int,
        rank: int,
        n_blocks: int,
        n_modules: int,
        *,
        lr_init: float = 1e-3,
        log_lambda_init: float = 0.0,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        self.key_size, self.value_size = int(key_size), int(value_size)
        self.n_modules = int(n_modules)
        size = self.key_size + self.value_size
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        self.normalizer = RunningNormalizer(size)
        self.blocks = nn.ModuleList([LowRankBlock(size, rank, n_modules, gen) for _ in range(n_blocks)])
        self.lr = nn.Parameter(torch.full((n_modules,), float(lr_init)))
        self.log_lambda = nn.Parameter(torch.full((n_modules,), float(log_lambda_init)))

    def _cat(self, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        if keys.dim() != 2 or values.dim() != 2 or keys.shape[0] != values.shape[0]:
            raise ValueError(f"keys and values must be (n, ·) with equal n, got {tuple(keys.shape)}, "
                             f"{tuple(values.shape)}")
        if keys.shape[1] != self.key_size or values.shape[1] != self.value_size:
            raise ValueError(f"expected widths ({self.key_size}, {self.value_size}), got "
                             f"({keys.shape[1]}, {values.shape[1]})")
        return torch.cat([keys, values], dim=1)

    @torch.no_grad()
    def observe(self, keys: torch.Tensor, values: torch.Tensor, collective=None) -> bool:
        """Update the normaliser with these rows **if the network is in training mode**; returns whether it did.
        ``collective``: data-parallel training, the rows of every rank form the batch."""
        if not self.training:
            return False
        self.normalizer.update(self._cat(keys, values).to(self.normalizer.mean.dtype), collective)
        return True

    def forward(self, keys: torch.Tensor, values: torch.Tensor, module_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= module_idx < self.n_modules:
            raise IndexError(f"module index {module_idx} out of range for {self.n_modules} modules")
        dtype = self.blocks[0].A.dtype if len(self.blocks) else self.normalizer.mean.dtype
        x = self.normalizer(self._cat(keys, values).to(dtype))
        for block in self.blocks:
            x = block(x, module_idx)
        return x[:, : self.key_size], x[:, self.key_size:]

    def body_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if n not in ("lr", "log_lambda")]


def shape_key(key_size: int, value_size: int) -> str:
    """Name of the shape group: ``"<key_size>x<value_size>"``."""
    return f"{int(key_size)}x{int(value_size)}"


@dataclass(frozen=True)
class ModuleSlot:
    """Where module ``name`` lives: its shape group ``group`` and its index inside the group."""

    name: str
    group: str
    index: int
    key_size: int
    value_size: int


class EditorNetworks(nn.Module):
    """One :class:`HyperNetwork` per distinct (key_size, value_size), for an ordered list of edited modules.

    ``modules`` is a sequence of ``(module_name, key_size, value_size)`` in layer order. ``slot(name)`` tells which
    network and index serve a module; ``net(name)`` returns its network.
    """

    def __init__(
        self,
        modules: Sequence[tuple[str, int, int]],
        *,
        rank: int,
        n_blocks: int,
        lr_init: float = 1e-3,
        log_lambda_init: float = 0.0,
        log_mu_init: float | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        counts: dict[str, int] = {}
        slots: list[ModuleSlot] = []
        for name, k, v in modules:
            g = shape_key(k, v)
            slots.append(ModuleSlot(name, g, counts.get(g, 0), int(k), int(v)))
            counts[g] = counts.get(g, 0) + 1
        if len({s.name for s in slots}) != len(slots):
            raise ValueError("edited module names must be unique")
        self.slots: list[ModuleSlot] = slots
        self._by_name = {s.name: s for s in slots}
        self.nets = nn.ModuleDict()
        for i, g in enumerate(sorted(counts)):
            k, v = (int(x) for x in g.split("x"))
            self.nets[g] = HyperNetwork(k, v, rank, n_blocks, counts[g], lr_init=lr_init,
                                        log_lambda_init=log_lambda_init, seed=seed + i)
        self.config = {"rank": int(rank), "n_blocks": int(n_blocks),
                       "modules": [[s.name, s.key_size, s.value_size] for s in slots]}
        #: per-module log μ of AGRADE's preserved-knowledge term (``log_mu_init`` None: no such term, no key in
        #: the state dict — the archives of methods without it are unchanged)
        self.log_mu_params: nn.ParameterDict | None = None
        if log_mu_init is not None:
            self.log_mu_params = nn.ParameterDict({g: nn.Parameter(torch.full((counts[g],), float(log_mu_init)))
                                                   for g in sorted(counts)})

    def slot(self, name: str) -> ModuleSlot:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"module {name!r} is not one of the edited modules {list(self._by_name)}") from None

    def net(self, name: str) -> HyperNetwork:
        return self.nets[self.slot(name).group]  # type: ignore[return-value]

    def lr(self, name: str) -> torch.Tensor:
        s = self.slot(name)
        return self.nets[s.group].lr[s.index]

    def log_lambda(self, name: str) -> torch.Tensor:
        s = self.slot(name)
        return self.nets[s.group].log_lambda[s.index]

    def log_mu(self, name: str) -> torch.Tensor | None:
        """log μ of the preserved-knowledge term for ``name`` (None when the networks have no such term)."""
        if self.log_mu_params is None:
            return None
        s = self.slot(name)
        return self.log_mu_params[s.group][s.index]

    def forward(self, name: str, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.slot(name)
        return self.nets[s.group](keys, values, s.index)

    def observe(self, name: str, keys: torch.Tensor, values: torch.Tensor, collective=None) -> bool:
        return self.net(name).observe(keys, values, collective)

    def param_groups(self, body_lr: float, lr_lr: float, lambda_lr: float, mu_lr: float | None = None) -> list[dict]:
        """Adam groups: the network bodies, the per-module ``lr`` (η), the per-module ``log_lambda`` (λ) and, when
        the networks have one, the per-module log μ (its own group, rate ``mu_lr``, default ``lambda_lr``)."""
        body: list[nn.Parameter] = []
        lrs: list[nn.Parameter] = []
        lams: list[nn.Parameter] = []
        for g in sorted(self.nets):
            net = self.nets[g]
            body += net.body_parameters()
            lrs.append(net.lr)
            lams.append(net.log_lambda)
        return [
            {"params": body, "lr": float(body_lr), "name": "body"},
            {"params": lrs, "lr": float(lr_lr), "name": "eta"},
            {"params": lams, "lr": float(lambda_lr), "name": "lambda"},
        ] + ([] if self.log_mu_params is None else [
            {"params": [self.log_mu_params[g] for g in sorted(self.log_mu_params)],
             "lr": float(lambda_lr if mu_lr is None else mu_lr), "name": "mu"}])

    def per_module_scalars(self) -> dict[str, dict[str, float]]:
        """``{module: {"eta": η, "log_lambda": λ[, "log_mu": μ]}}`` — for logs and model cards."""
        out = {}
        for s in self.slots:
            out[s.name] = {"eta": float(self.lr(s.name).detach()), "log_lambda": float(self.log_lambda(s.name).detach())}
            if self.log_mu_params is not None:
                out[s.name]["log_mu"] = float(self.log_mu(s.name).detach())
        return out


def parameters_of(groups: Iterable[dict]) -> list[nn.Parameter]:
    return [p for g in groups for p in g["params"]]
