"""Run a causal LM only as deep as the edited layers need, and capture per-module H and ∇G with hooks.

:class:`LayerStack` locates the decoder layers of a Hugging Face causal LM (LLaMA/Mistral ``model.layers``,
GPT-2/GPT-J ``transformer.h``, GPT-NeoX ``gpt_neox.layers``, …: the ``nn.ModuleList`` whose length is the
number of hidden layers) and the edited modules (from parameter names such as
``model.layers.24.mlp.down_proj.weight``). Let ``first`` be the lowest layer holding an edited module.

* :meth:`LayerStack.lower` runs layers ``< first`` once, without grad, and returns the hidden state entering
  layer ``first`` (the forward stops there: a pre-hook raises a private exception).
* :meth:`LayerStack.upper` runs only layers ``>= first`` from such a hidden state (the layer list is swapped for
  its tail for the duration of the call; embeddings are recomputed but ignored), then the final norm, and applies
  the output head (``lm_head``) **only at the requested positions**. Backward therefore never goes below layer
  ``first``, and the ``B × L × vocab`` logits are never materialised.

:class:`KeyGradCapture` is a context manager whose forward hooks record, for every edited module, its input rows
(H) at selected positions and, through a tensor hook on the module output, ∇G at those positions after
``loss.backward()`` (the total derivative of the loss w.r.t. the module output, including every path through
later layers and later edited modules). :func:`cache_keys_and_grads` loops this over micro-batches.

Memory bound of the cache: ``Σ_modules T · (Dh + Dg) · 4`` bytes (fp32 rows; T = target tokens of all edits),
e.g. 6 modules × 1,300 tokens × (1536 + 576) × 4 B ≈ 66 MB for 1,024 CounterFact edits on SmolLM2. The cache
refuses to grow beyond ``max_rows`` rows per module (default 65,536; a :class:`CacheOverflowError` says so), and
activations are only held for one micro-batch at a time.
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from .weights import get_module, io_sizes, module_name_of_param

DEFAULT_MAX_ROWS = 65_536


class CacheOverflowError(RuntimeError):
    """More rows would be cached per module than the configured bound."""


class _StopForward(Exception):
    pass


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(dotted path, ModuleList) of the decoder layers: the ModuleList with ``num_hidden_layers`` entries."""
    cfg = getattr(model, "config", None)
    n = None
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        n = getattr(cfg, key, None) if cfg is not None else None
        if isinstance(n, int):
            break
    best: tuple[str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            if n is not None and len(mod) == n:
                return name, mod
            if best is None or len(mod) > len(best[1]):
                best = (name, mod)
    if best is None:
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")
    return best


def _first_hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    if args:
        return args[0]
    return kwargs["hidden_states"]


def _replace_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden,) + tuple(args[1:]), kwargs
    kwargs = dict(kwargs)
    kwargs["hidden_states"] = hidden
    return args, kwargs


def _set_submodule(root: nn.Module, path: str, value: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = get_module(root, parent_path) if parent_path else root
    setattr(parent, leaf, value)


@dataclass
class LayerStack:
    """The decoder layers of ``model`` and the edited modules named by ``param_names`` (see module docstring)."""

    model: nn.Module
    param_names: Sequence[str]
    layers_path: str = field(init=False)
    layers: nn.ModuleList = field(init=False)
    module_names: list[str] = field(init=False)
    layer_of: dict[str, int] = field(init=False)
    first: int = field(init=False)

    def __post_init__(self) -> None:
        self.layers_path, self.layers = find_decoder_layers(self.model)
        self.module_names = [module_name_of_param(p) for p in self.param_names]
        if not self.module_names:
            raise ValueError("no edited parameters given")
        pat = re.compile(re.escape(self.layers_path) + r"\.(\d+)\.")
        self.layer_of = {}
        for name in self.module_names:
            get_module(self.model, name)  # raises KeyError naming the module if absent
            m = pat.match(name + ".")
            if not m:
                raise ValueError(f"edited module {name!r} is not inside the decoder layers {self.layers_path!r}")
            self.layer_of[name] = int(m.group(1))
        order = sorted(range(len(self.module_names)), key=lambda i: (self.layer_of[self.module_names[i]], i))
        self.module_names = [self.module_names[i] for i in order]
        self.param_names = [f"{n}.weight" for n in self.module_names]
        self.first = min(self.layer_of.values())

    # -- model pieces -------------------------------------------------------------------------------------
    def modules(self) -> dict[str, nn.Module]:
        return {n: get_module(self.model, n) for n in self.module_names}

    def sizes(self) -> list[tuple[str, int, int]]:
        """``[(module_name, Dh, Dg)]`` in layer order."""
        return [(n, *io_sizes(m)) for n, m in self.modules().items()]

    @property
    def base(self) -> nn.Module:
        return self.model.base_model

    def head(self) -> nn.Module:
        head = self.model.get_output_embeddings()
        if head is None:
            raise ValueError(f"{type(self.model).__name__} has no output embeddings (lm_head)")
        return head

    # -- runs -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def lower(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Hidden state entering layer ``first`` (no grad; layers below run once)."""
        box: list[torch.Tensor] = []

        def stop(_mod, args, kwargs):
            box.append(_first_hidden(args, kwargs).detach())
            raise _StopForward

        handle = self.layers[self.first].register_forward_pre_hook(stop, with_kwargs=True)
        try:
            self.base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _StopForward:
            pass
        finally:
            handle.remove()
        if not box:
            raise RuntimeError("the forward pass never reached the first edited layer")
        return box[0]

    @contextlib.contextmanager
    def _tail(self, hidden: torch.Tensor) -> Iterator[None]:
        tail = nn.ModuleList(list(self.layers)[self.first:])

        def inject(_mod, args, kwargs):
            return _replace_hidden(args, kwargs, hidden)

        handle = tail[0].register_forward_pre_hook(inject, with_kwargs=True)
        _set_submodule(self.model, self.layers_path, tail)
        try:
            yield
        finally:
            _set_submodule(self.model, self.layers_path, self.layers)
            handle.remove()

    def upper(
        self,
        hidden: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        positions: torch.Tensor,
    ) -> torch.Tensor:
        """Logits (N, vocab) at the ``positions`` mask (B, L) from the hidden state entering layer ``first``."""
        with self._tail(hidden):
            out = self.base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        last = out[0] if isinstance(out, tuple) else out.last_hidden_state
        return self.head()(last[positions])


class KeyGradCapture:
    """Hooks recording module inputs (H) and output-gradients (∇G) at the rows selected by ``positions``.

    The output gradient is caught with a tensor hook, so it is the *total* derivative of the loss w.r.t. the
    module output, including the paths through later edited modules. When an output does not require grad (the
    lowest edited module: parameters frozen, input hidden state detached) it is replaced by an equal leaf that
    does, which only cuts paths into layers below it. Use::

        with KeyGradCapture(modules, positions) as cap:
            loss = ...forward...
            loss.backward()
        H, dG = cap.rows(name)
    """

    def __init__(self, modules: dict[str, nn.Module], positions: torch.Tensor, dtype: torch.dtype = torch.float32):
        self.modules = modules
        self.positions = positions
        self.dtype = dtype
        self._inputs: dict[str, torch.Tensor] = {}
        self._grads: dict[str, torch.Tensor] = {}
        self._handles: list = []

    def __enter__(self) -> "KeyGradCapture":
        for name, mod in self.modules.items():
            self._handles.append(mod.register_forward_hook(self._hook(name)))
        return self

    def _hook(self, name: str) -> Callable:
        def store(grad: torch.Tensor) -> None:
            self._grads[name] = grad.detach()

        def hook(_mod, inputs, output):
            self._inputs[name] = inputs[0].detach()
            if not output.requires_grad:
                output = output.detach().requires_grad_(True)
            output.register_hook(store)
            return output
        return hook

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def rows(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(H rows (n, Dh), ∇G rows (n, Dg)) at the selected positions, in ``dtype``."""
        grad = self._grads.get(name)
        if grad is None:
            raise RuntimeError(f"no gradient reached module {name}; call loss.backward() inside the context")
        keys = self._inputs[name][self.positions].to(self.dtype)
        return keys, grad[self.positions].to(self.dtype)


@dataclass
class KeyGradCache:
    """Per-module H and ∇G rows (fp32 by default) gathered over micro-batches.

    In memory (default) the cache holds at most ``max_rows`` rows per module (:class:`CacheOverflowError`
    beyond). With ``spill=True`` every added piece is written at once to a safetensors shard in a private
    temporary folder (``tempfile.mkdtemp`` under ``spill_root`` or the system temp dir; unique per cache) and
    only read back one piece at a time by :meth:`chunks` — then memory does not grow with the number of edits
    and ``max_rows`` is not enforced. :meth:`close` (also on ``with`` exit and when the cache is garbage
    collected) deletes the folder.
    """

    module_names: Sequence[str]
    max_rows: int = DEFAULT_MAX_ROWS
    keys: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    grads: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)
    #: target tokens scored by the cache pass and how many of them were already the argmax (teacher-forced token
    #: accuracy of the model being edited on its own edit prompts, for free from the pass's logits)
    n_targets: int = 0
    n_correct: int = 0
    spill: bool = False
    spill_root: str | None = None
    shards: dict[str, list[str]] = field(default_factory=dict)
    row_counts: dict[str, int] = field(default_factory=dict)
    spill_dir: str | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self._finalizer = None
        if self.spill:
            import shutil
            import tempfile
            import weakref

            self.spill_dir = tempfile.mkdtemp(prefix="easyedit-agrade-cache-", dir=self.spill_root)
            self._finalizer = weakref.finalize(self, shutil.rmtree, self.spill_dir, True)

    def __enter__(self) -> "KeyGradCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Delete spilled shards (no-op for an in-memory cache)."""
        if self._finalizer is not None:
            self._finalizer()

    def add(self, name: str, k: torch.Tensor, g: torch.Tensor) -> None:
        if k.shape[0] != g.shape[0]:
            raise ValueError(f"{name}: {k.shape[0]} key rows but {g.shape[0]} gradient rows")
        rows = self.row_counts.get(name, 0) + k.shape[0]
        if not self.spill and rows > self.max_rows:
            raise CacheOverflowError(
                f"caching {rows} rows for {name} exceeds max_rows={self.max_rows}; edit fewer facts at once "
                "(smaller batch_size), raise the bound, or spill the cache to disk (cache_spill: true)"
            )
        self.row_counts[name] = rows
        if self.spill:
            from safetensors.torch import save_file

            assert self.spill_dir is not None
            index = len(self.shards.setdefault(name, []))
            path = f"{self.spill_dir}/{self.module_names.index(name):03d}-{index:06d}.safetensors"
            save_file({"keys": k.detach().contiguous().cpu(), "grads": g.detach().contiguous().cpu()}, path)
            self.shards[name].append(path)
            return
        self.keys.setdefault(name, []).append(k)
        self.grads.setdefault(name, []).append(g)

    def n_rows(self, name: str) -> int:
        return self.row_counts.get(name, 0)

    def chunks(self, name: str, device: torch.device | str | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(H rows, ∇G rows) of ``name`` piece by piece, in the order they were added (one piece resident)."""
        if self.spill:
            from safetensors.torch import load_file

            for path in self.shards.get(name, []):
                d = load_file(path, device=str(device) if device is not None else "cpu")
                yield d["keys"], d["grads"]
            return
        for k, g in zip(self.keys.get(name, []), self.grads.get(name, [])):
            yield (k, g) if device is None else (k.to(device), g.to(device))

    def get(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        pieces = list(self.chunks(name))
        if not pieces:
            raise KeyError(f"nothing cached for {name}")
        return torch.cat([k for k, _ in pieces]), torch.cat([g for _, g in pieces])

    def nbytes(self) -> int:
        """Bytes held in memory (spilled shards are on disk and not counted)."""
        return sum(t.numel() * t.element_size() for d in (self.keys, self.grads) for ts in d.values() for t in ts)


def cache_keys_and_grads(
    stack: LayerStack,
    micro_batches: Sequence[tuple[torch.Tensor, ...]],
    *,
    hidden: Sequence[torch.Tensor] | None = None,
    dtype: torch.dtype = torch.float32,
    max_rows: int = DEFAULT_MAX_ROWS,
    cache: KeyGradCache | None = None,
) -> KeyGradCache:
    """Capture H and ∇G of every edited module over micro-batches.

    Each micro-batch is ``(input_ids, attention_mask, predict_mask, shifted_labels)`` (``predict_mask`` marks
    positions whose logits predict a target token; ``shifted_labels`` holds that token's id there), optionally
    followed by a ``key_mask``: the positions whose rows are recorded (default: ``predict_mask``; e.g. the predict
    positions plus the subject's last token — the loss is on the predict positions either way). The loss is
    the **summed** cross-entropy over target tokens, so ∇G does not depend on how many edits share a batch.
    ``hidden`` optionally gives precomputed :meth:`LayerStack.lower` outputs per micro-batch (else each batch's
    lower layers run just before it, so only one batch's activations are ever resident). ``cache`` appends to an
    existing (e.g. spilling) cache instead of a new in-memory one; ``micro_batches`` may be any iterable.
    """
    if cache is None:
        cache = KeyGradCache(stack.module_names, max_rows=max_rows)
    modules = stack.modules()
    for i, (ids, att, pmask, labels, *rest) in enumerate(micro_batches):
        key_mask = rest[0] if rest else pmask
        h = hidden[i] if hidden is not None else stack.lower(ids, att)
        with torch.enable_grad(), grad_only_for(stack.model), KeyGradCapture(modules, key_mask, dtype) as cap:
            logits = stack.upper(h, ids, att, pmask)
            wanted = labels[pmask]
            loss = torch.nn.functional.cross_entropy(logits.float(), wanted, reduction="sum")
            loss.backward()
            cache.n_correct += int((logits.detach().argmax(-1) == wanted).sum())
            cache.n_targets += int(wanted.numel())
            for name in stack.module_names:
                cache.add(name, *cap.rows(name))
        cache.losses.append(float(loss.detach()))
    return cache


@contextlib.contextmanager
def grad_only_for(model: nn.Module, params: Sequence[nn.Parameter] = ()) -> Iterator[None]:
    """Inside: only ``params`` require grad (others are frozen, so backward accumulates nothing into them);
    the previous ``requires_grad`` flags are restored on exit."""
    keep = {id(p) for p in params}
    saved = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(id(p) in keep)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
