"""Record, and compare, the exact ΔW the shipped archives give: a before/after check for refactors.

For every shipped archive under ``archives/`` this edits a fixed small set of records of the embedded model with
the method's EasyEdit executor (``apply_agrade_to_model`` / ``apply_instructedit_to_model``) and writes a JSON
of SHA-256 digests of the exact bytes of every ΔW tensor the executor applies (caught at
:func:`easyedit_agrade.core.weights.apply_deltas`, in call order) and of every edited weight after the call.

    OMP_NUM_THREADS=1 python scripts/check_delta_identity.py --out before.json
    ... change the code ...
    OMP_NUM_THREADS=1 python scripts/check_delta_identity.py --out after.json
    python scripts/check_delta_identity.py --compare before.json after.json      # exit 1 on any difference

Cases (the records are read through :func:`easyedit_agrade.paths.data_file`):

* ``agrade-default``: ``hparams/AGRADE/smollm2-135m.yaml`` as shipped (``archive: null`` → the preserved-term
  archive; e^μ C₀ term with ``preserved_change_budget``; needs the key statistics, cached after the first run);
* ``agrade-paper``: the same YAML with ``use_preserved_cov: false`` (the paper's eq 3; the paper-form archive);
* ``malmen``: ``preset: malmen`` with ``use_preserved_cov: false`` (the MALMEN archive);
* ``instructedit``: ``hparams/InstructEdit/smollm2-135m.yaml`` (one ΔW per record, applied in sequence).

``scripts/delta_identity_d2f7206.json`` is the record of commit d2f7206 (before the hypernetwork-editor base moved
into ``core/``), made on the project's 2-core CPU machine with torch 2.14.1 and one thread.

Each on the first 8 records of ``counterfact/counterfact-val.json`` and of the zsRE eval file. Bit-identity needs
the same machine, library versions and thread count on both runs (hence ``OMP_NUM_THREADS=1``; the script also
sets ``torch.set_num_threads(1)``).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
N_RECORDS = 8
DATASETS = {  # name -> (file under the shared data folder, record format, EasyEdit task of InstructEdit)
    "counterfact-val": ("counterfact/counterfact-val.json", "counterfact", "counterfact"),
    "zsre-eval": ("portability/One_Hop/zsre_mend_eval_portability_gpt4.json", "zsre", "zsre"),
}
CASES = {  # name -> (alg_name, hparams YAML, overrides)
    "agrade-default": ("AGRADE", "hparams/AGRADE/smollm2-135m", {}),
    "agrade-paper": ("AGRADE", "hparams/AGRADE/smollm2-135m",
                     {"use_preserved_cov": False, "preserved_change_budget": None}),
    "malmen": ("AGRADE", "hparams/AGRADE/smollm2-135m",
               {"preset": "malmen", "use_preserved_cov": False, "preserved_change_budget": None}),
    "instructedit": ("InstructEdit", "hparams/InstructEdit/smollm2-135m", {}),
}


def tensor_sha256(t) -> str:
    """SHA-256 of a tensor's dtype, shape and exact bytes (CPU, contiguous)."""
    import torch

    t = t.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{t.dtype}\0{tuple(t.shape)}\0".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _records(dataset: str) -> list:
    from easyedit_agrade.dataset.readers import read_records
    from easyedit_agrade.paths import data_file

    relative, fmt, _ = DATASETS[dataset]
    return read_records(data_file(relative), fmt, limit=N_RECORDS)


def _hparams(case: str):
    alg, yaml_path, overrides = CASES[case]
    if alg == "AGRADE":
        from easyedit_agrade.models.agrade.agrade_hparams import AGRADEHyperParams as cls
    else:
        from easyedit_agrade.models.instructedit.instructedit_hparams import InstructEditHyperParams as cls
    return cls.from_hparams(REPO / yaml_path, overrides=dict(overrides, device="cpu"))


def _executor(alg: str):
    if alg == "AGRADE":
        from easyedit_agrade.models.agrade import agrade_main

        return agrade_main.apply_agrade_to_model, agrade_main.find_archive
    from easyedit_agrade.models.instructedit import instructedit_main

    return instructedit_main.apply_instructedit_to_model, instructedit_main.find_archive


class DeltaRecorder:
    """Wraps ``core.weights.apply_deltas`` in every loaded ``easyedit_agrade`` module that imported it, recording
    the digest of each ΔW passed in (a list of ``{module: sha256}`` per apply call)."""

    def __init__(self) -> None:
        from easyedit_agrade.core import weights

        self.original = weights.apply_deltas
        self.calls: list[dict[str, str]] = []
        self.patched: list[str] = []
        for name, module in list(sys.modules.items()):
            if name.startswith("easyedit_agrade") and getattr(module, "apply_deltas", None) is self.original:
                setattr(module, "apply_deltas", self)
                self.patched.append(name)

    def __call__(self, model, deltas, **kwargs):
        self.calls.append({name: tensor_sha256(d) for name, d in deltas.items()})
        return self.original(model, deltas, **kwargs)

    def take(self) -> list[dict[str, str]]:
        calls, self.calls = self.calls, []
        return calls


def record(out: Path) -> dict:
    import torch

    torch.set_num_threads(1)
    from easyedit_agrade.core.weights import restore_weights
    from easyedit_agrade.lm import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer()
    for alg in ("AGRADE", "InstructEdit"):
        _executor(alg)  # import the executors (and whatever they import) before patching
    recorder = DeltaRecorder()
    result: dict = {"torch": torch.__version__, "n_records": N_RECORDS, "cases": {}}
    for case, (alg, _, _) in CASES.items():
        hp = _hparams(case)
        apply, find = _executor(alg)
        for dataset, (_, _, task) in DATASETS.items():
            requests = [r.to_request() for r in _records(dataset)]
            if alg == "InstructEdit":
                requests = [dict(req, task=task) for req in requests]
            start = time.perf_counter()
            archive = find(model, hp).name
            _, weights_copy = apply(model, tok, requests, hp, return_orig_weights=True)
            after = {name: tensor_sha256(model.get_parameter(name)) for name in sorted(weights_copy)}
            restore_weights(model, weights_copy)
            result["cases"][f"{case}/{dataset}"] = {"archive": archive, "deltas": recorder.take(),
                                                   "weights_after": after}
            print(f"{case}/{dataset}: {archive}, {len(result['cases'][f'{case}/{dataset}']['deltas'])} ΔW "
                  f"call(s), {time.perf_counter() - start:.1f} s", flush=True)
    result["patched_modules"] = recorder.patched
    out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return result


def compare(a: Path, b: Path) -> int:
    """Print per case whether every digest agrees; 0 when all do, 1 otherwise."""
    left, right = (json.loads(p.read_text(encoding="utf-8"))["cases"] for p in (a, b))
    bad = 0
    for case in sorted(set(left) | set(right)):
        x, y = left.get(case), right.get(case)
        if x is None or y is None:
            print(f"{case}: only in {a if y is None else b}")
            bad += 1
            continue
        same = all(x[key] == y[key] for key in ("archive", "deltas", "weights_after"))
        n = sum(len(call) for call in x["deltas"])
        print(f"{case}: {'identical' if same else 'DIFFERENT'} ({n} ΔW tensors, {len(x['weights_after'])} weights)")
        bad += not same
    print("all digests match" if not bad else f"{bad} case(s) differ")
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--out", type=Path, help="write the digests of this tree's edits to this JSON file")
    group.add_argument("--compare", type=Path, nargs=2, metavar=("A", "B"), help="compare two such files")
    args = parser.parse_args(argv)
    if args.compare:
        return compare(*args.compare)
    record(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
