"""The few collectives AGRADE needs, over ``torch.distributed`` (gloo on CPU, NCCL on GPU), or none at all.

Data-parallel AGRADE shards the *edits*: every rank caches H and ∇G for its own records. Only these quantities
need all target tokens, so they are summed across ranks (``all_reduce``):

* eq 3's Gram HᵀH (Dh × Dh) and eq 5's right-hand side HᵀG (Dh × Dg) — every rank then factors and solves the
  same M and applies the same ΔW;
* eq 4's two global inner products ⟨G, G_prev⟩ and ⟨G_prev, G_prev⟩ (scalars; differentiable in training);
* in training, g_θ = ∂L/∂W (each rank's loss is normalised by the *global* token count, so the sum is the
  single-process gradient), the normaliser's batch statistics, and finally the hypernetwork gradients (the DDP
  all-reduce, done once per step on the flattened gradients).

P = H M⁻¹ g_θ (eq 6) and the surrogate Σ P ⊙ G (eq 7) stay local.

:class:`Collective` is the single-process identity; :class:`TorchCollective` talks to an initialised process group.
:func:`init_from_env` starts the group from the variables ``torchrun`` / ``accelerate launch`` set (``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) and :func:`get_collective` returns the right one.
"""
from __future__ import annotations

import os
from typing import Sequence, TypeVar

import torch

T = TypeVar("T")

ENV_DISABLE = "EASYEDIT_AGRADE_DISTRIBUTED"


class Collective:
    """One process: every reduction is the identity."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks, in place (no autograd); returns it."""
        return tensor

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Differentiable sum over ranks (its backward sums the cotangents over ranks)."""
        return tensor

    def all_reduce_grads_(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Sum the ``.grad`` of ``params`` over ranks in one flat buffer (the DDP all-reduce); missing grads are
        treated as zeros so every rank takes part in the same collective."""

    def broadcast_object(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank."""
        return obj

    def all_gather_1d(self, tensor: torch.Tensor) -> torch.Tensor:
        """The 1-D ``tensor`` of every rank concatenated in rank order (lengths may differ between ranks)."""
        return tensor

    def barrier(self) -> None:
        pass

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's share of ``items``: every ``world_size``-th item starting at ``rank`` (all of them in one
        process). Shards differ in size by at most one."""
        return list(items[self.rank::self.world_size])


class TorchCollective(Collective):
    """Collectives over the default ``torch.distributed`` process group."""

    def __init__(self) -> None:
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised; call init_from_env() first")
        self._dist = dist
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        # gloo reduces CPU tensors, NCCL CUDA tensors
        self._device = torch.device("cpu") if dist.get_backend() == "gloo" else torch.device(
            "cuda", torch.cuda.current_device())

    def _to_comm(self, t: torch.Tensor) -> torch.Tensor:
        return t if t.device == self._device else t.to(self._device)

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        buf = self._to_comm(tensor.detach())
        self._dist.all_reduce(buf, op=self._dist.ReduceOp.SUM)
        if buf is not tensor:
            tensor.data.copy_(buf)
        return tensor

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return _SumOverRanks.apply(tensor, self)

    def all_reduce_grads_(self, params: Sequence[torch.nn.Parameter]) -> None:
        params = list(params)
        if not params:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1).to(torch.float64) for p in params])
        self.all_reduce_(flat)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad).to(p.grad.dtype))
            offset += n

    def all_gather_1d(self, tensor: torch.Tensor) -> torch.Tensor:
        lengths = torch.zeros(self.world_size, dtype=torch.float64)
        lengths[self.rank] = tensor.numel()
        self.all_reduce_(lengths)
        sizes = [int(n) for n in lengths.tolist()]
        padded = torch.zeros(max(sizes), dtype=tensor.dtype, device=self._device)
        padded[:tensor.numel()] = tensor.detach().reshape(-1).to(self._device)
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        self._dist.all_gather(parts, padded)
        return torch.cat([part[:n] for part, n in zip(parts, sizes)]).to(tensor.device)

    def broadcast_object(self, obj: T) -> T:
        box = [obj]
        self._dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        self._dist.barrier()


class _SumOverRanks(torch.autograd.Function):
    """y = Σ_ranks x. Every rank's output feeds its own loss and the total loss is the sum over ranks, so
    ∂(Σ_r L_r)/∂x_r = Σ_r' ∂L_r'/∂y: the backward is the same all-reduce of the cotangents."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, coll: "TorchCollective") -> torch.Tensor:  # type: ignore[override]
        ctx.coll = coll
        return coll.all_reduce_(tensor.detach().clone())

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return ctx.coll.all_reduce_(grad.detach().clone()), None


def init_from_env(backend: str | None = None) -> Collective:
    """Initialise ``torch.distributed`` from the launcher's environment when ``WORLD_SIZE`` > 1 (``torchrun``,
    ``accelerate launch``); gloo without CUDA, NCCL with it (one GPU per local rank). Returns the collective to
    use — the identity in a plain single process or with ``EASYEDIT_AGRADE_DISTRIBUTED=0``."""
    if os.environ.get(ENV_DISABLE, "1") == "0":
        return Collective()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    import torch.distributed as dist

    if world > 1 and dist.is_available() and not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return get_collective()


def get_collective() -> Collective:
    """The collective of the current process group (identity when none is initialised or it has one rank)."""
    if os.environ.get(ENV_DISABLE, "1") == "0":
        return Collective()
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return TorchCollective()
    return Collective()
