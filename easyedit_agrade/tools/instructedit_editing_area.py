"""The editing-area picture (paper §4.2 / Figure 4): normalised editing directions per task, PCA then t-SNE.

For each test record of each task the editor computes the editing direction of one edited module (default: the
last one), ∇̃ = Σ_i δ̃_i ũ_iᵀ (eq. 3), and its direction ∇̃/‖∇̃‖_F. The directions are 1536×576 matrices on SmolLM2,
so they are never stacked: since ∇̃ = Ũᵀ D̃ is a sum of rank-one terms, the Gram matrix of the normalised directions
is ⟨Ũ_aᵀD̃_a, Ũ_bᵀD̃_b⟩_F = Σ (Ũ_a Ũ_bᵀ) ⊙ (D̃_a D̃_bᵀ), and PCA is read from its centred eigendecomposition (exactly the
PCA of the flattened directions). The top PCA components go to t-SNE (sklearn), and matplotlib draws one panel per
editor, coloured by task. sklearn and matplotlib are imported only here, inside the functions.

    python -m easyedit_agrade.tools.instructedit_editing_area \\
        --editor InstructEdit=archives/instructedit-smollm2-135m.safetensors \\
        --editor "Multi-task MEND=runs/mend-multitask-smollm2/best.safetensors" --per-task 40 --out editing_area.png
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

import torch

from ..core.checkpoint import read_metadata

TASK_ORDER = ("counterfact", "wikirecent", "convsent", "zsre")


def gram_of_directions(factors: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Gram matrix (float64) of the Frobenius-normalised directions Ũᵀ D̃ given as ``(Ũ, D̃)`` factor pairs."""
    n = len(factors)
    K = torch.zeros(n, n, dtype=torch.float64)
    f = [(u.double(), d.double()) for u, d in factors]
    for a in range(n):
        for b in range(a, n):
            v = float(((f[a][0] @ f[b][0].T) * (f[a][1] @ f[b][1].T)).sum())
            K[a, b] = K[b, a] = v
    norms = K.diagonal().clamp_min(1e-30).sqrt()
    return K / norms[:, None] / norms[None, :]


def pca_from_gram(K: torch.Tensor, k: int = 50) -> torch.Tensor:
    """PCA coordinates (n, ≤k) of the points whose Gram matrix is ``K`` (centred kernel eigendecomposition)."""
    n = K.shape[0]
    H = torch.eye(n, dtype=K.dtype) - 1.0 / n
    vals, vecs = torch.linalg.eigh(H @ K @ H)
    order = torch.argsort(vals, descending=True)[: min(k, n)]
    vals, vecs = vals[order].clamp_min(0), vecs[:, order]
    return vecs * vals.sqrt()[None, :]


@torch.no_grad()
def collect_factors(model, tok, archive: str, tasks: Sequence[str], per_task: int, module: int = -1,
                    seed: int = 0, instruction_index: int = 0):
    """(factors, labels, use_instruction) for ``per_task`` test records of each task, edited by ``archive``."""
    from ..models.instructedit.archive import load_networks
    from ..models.instructedit.editor import InstructEditEditor
    from ..models.instructedit.instructedit_eval import make_probe
    from ..models.instructedit.instructedit_hparams import InstructEditHyperParams
    from ..models.instructedit.instructions import load_instructions
    from ..models.instructedit.multitask import load_split

    meta = read_metadata(archive)
    hp = dict(meta["hparams"])
    hparams = InstructEditHyperParams.from_dict({"model_name": meta.get("model_name", "model"), "archive": archive,
                                                 **hp})
    nets = load_networks(archive, model, hparams)
    editor = InstructEditEditor(model, tok, hparams, nets)
    name = editor.stack.module_names[module]
    ins = load_instructions(None) if hparams.use_instruction else None
    factors, labels = [], []
    for task in tasks:
        recs = load_split(task, "test", seed=seed)[:per_task]
        for rec in recs:
            pr = make_probe(rec, ins, instruction_index, hparams.use_instruction)
            mbs = editor.encode([pr.rel[0]], [pr.rel[1]])
            with torch.enable_grad():
                cache = editor.cache(mbs)
            u, d = cache.get(name)
            ut, dt = nets(name, u.float(), d.float())
            factors.append((ut, dt))
            labels.append(task)
    return factors, labels, hparams.use_instruction


def project(factors, *, seed: int = 0, pca_dim: int = 50, perplexity: float = 15.0):
    """PCA (from the Gram matrix) then t-SNE → (n, 2) numpy array."""
    from sklearn.manifold import TSNE

    pcs = pca_from_gram(gram_of_directions(factors), pca_dim).numpy()
    perp = min(perplexity, max(2.0, (len(factors) - 1) / 3))
    return TSNE(n_components=2, perplexity=perp, init="pca", random_state=seed).fit_transform(pcs)


def draw(panels: list[tuple[str, object, list[str]]], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.6), squeeze=False)
    colors = {"counterfact": "tab:blue", "wikirecent": "tab:orange", "convsent": "tab:green", "zsre": "tab:red"}
    for ax, (title, xy, labels) in zip(axes[0], panels):
        for task in TASK_ORDER:
            idx = [i for i, t in enumerate(labels) if t == task]
            if idx:
                ax.scatter(xy[idx, 0], xy[idx, 1], s=14, alpha=0.8, c=colors[task],
                           label=task + (" (held out)" if task == "zsre" else ""))
        ax.set_title(title)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0][0].legend(loc="best", fontsize=8)
    fig.suptitle("Editing area: normalised editing directions ∇̃/‖∇̃‖ (PCA → t-SNE)")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m easyedit_agrade.tools.instructedit_editing_area",
                                description="Figure 4: editing directions per task, PCA then t-SNE, as a PNG.")
    p.add_argument("--editor", action="append", required=True, metavar="LABEL=ARCHIVE",
                   help="an editor archive with its panel title (repeat for InstructEdit and multi-task MEND)")
    p.add_argument("--tasks", default=",".join(TASK_ORDER))
    p.add_argument("--per-task", type=int, default=40)
    p.add_argument("--module", type=int, default=-1, help="which edited module (index in layer order)")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="editing_area.png")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from ..lm import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(args.model)
    model.eval()
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    panels, summary = [], {}
    for item in args.editor:
        if "=" not in item:
            print(f"--editor expects LABEL=ARCHIVE, got {item!r}", file=sys.stderr)
            return 2
        label, path = item.split("=", 1)
        factors, labels, _ = collect_factors(model, tok, path, tasks, args.per_task, args.module, args.seed)
        panels.append((label, project(factors, seed=args.seed), labels))
        summary[label] = {"points": len(labels), "archive": path}
    draw(panels, args.out)
    print(json.dumps({"out": args.out, "editors": summary}))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
