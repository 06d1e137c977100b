"""``easyedit-agrade edit``: edit a model with a file of requests and write the results.

The requests file is JSON (a list, or one object) or JSONL, in one of EasyEdit's formats — zsRE MEND (``src``,
``alt``, ``rephrase``, ``loc``, ``loc_ans``), CounterFact MEND (``prompt``, ``target_new``, ``rephrase_prompt``,
``locality_prompt``, ``locality_ground_truth``) or KnowEdit (``prompt``, ``target_new``, ``subject``,
``portability{...}``, ``locality{...}``); ROME-style CounterFact and MQuAKE records are read too. Every record is
validated before anything runs: a malformed one stops the command with an error naming the record index and the
field, and nothing is written. Results (EasyEdit's per-record ``pre``/``post`` structure plus ES/GS/LS/Editing
Score and the pitfall metrics) are written atomically, and so is the edited model when ``--save-model`` is given.

Nothing that the command did not create is ever deleted or overwritten. Before anything is edited: ``--out``
must not be the requests file nor a directory, and an existing ``--out`` file needs ``--overwrite``;
``--save-model`` must not be (or contain) the current directory, the home directory, the repository or ``/``,
nor contain the requests or results file; an existing non-empty directory is replaced (with ``--overwrite``)
only when it is a model this command saved (it holds :data:`SAVED_MARKER`). The model is written to a temporary
sibling and renamed into place.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from ..atomic import atomic_dir
from .methods import ALL_METHODS, METHODS, MethodSpec

NEEDS_SUBJECT = {"ROME", "MEMIT"}

#: written into every model directory ``--save-model`` creates; only such a directory is ever replaced
SAVED_MARKER = "easyedit-agrade-saved-model.json"


class UsageError(Exception):
    """Bad input: reported on stderr with exit status 2, nothing written."""


def build_parser(prog: str = "easyedit-agrade edit") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Edit a model with a JSON/JSONL file of requests (zsRE MEND, CounterFact MEND or KnowEdit "
        "format) through EasyEdit's BaseEditor, and write per-record results. A malformed record stops the "
        "command with its index and field; no file is written half-way.",
    )
    p.add_argument("requests", help="JSON or JSONL file of edit requests")
    p.add_argument("--method", default="AGRADE", choices=ALL_METHODS,
                   help="editing method (uses hparams/<METHOD>/smollm2-135m.yaml unless --hparams is given)")
    p.add_argument("--hparams", default=None, help="hparams YAML (its alg_name picks the method)")
    p.add_argument("--format", default="auto", choices=("auto", "zsre", "counterfact", "knowedit"),
                   help="record format (default: detected per record)")
    p.add_argument("--model", default="smollm2-135m-instruct", help="model alias or local Hugging Face directory")
    p.add_argument("--out", default=None, help="results JSON (default: <requests stem>.<method>.results.json); "
                   "an existing file is refused unless --overwrite")
    p.add_argument("--save-model", default=None, help="also save the edited model (Hugging Face directory; must "
                   "not exist, or be empty, or be a model saved by this command and --overwrite given)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out file, or a --save-model directory saved by this command")
    p.add_argument("--mode", default="auto", choices=("auto", "batch", "sequential"),
                   help="batch: all requests in one call; sequential: one call per request (default: the method's)")
    p.add_argument("--limit", type=int, default=None, help="edit only the first N records (N >= 1)")
    p.add_argument("--no-eval", action="store_true", help="skip the before/after metrics")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return p


def read_requests(path: str | os.PathLike[str], fmt: str = "auto", limit: int | None = None):
    """Parse and validate the requests file; raises :class:`UsageError` naming the record and field."""
    from ..evaluate.records import RecordError, parse_records, read_json_records

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"requests file {str(path)!r} not found")
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be at least 1, got {limit}")
    try:
        raw = read_json_records(path)
        if not isinstance(raw, list) or not raw:
            raise UsageError(f"{path.name}: expected a non-empty list of records")
        if limit is not None:
            raw = raw[:limit]
        records, cases = parse_records(raw, fmt, source=path.name)
    except RecordError as exc:
        raise UsageError(str(exc)) from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"requests file {str(path)!r} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at "
                         f"offset {exc.start})") from None
    return records, cases


def _check_for_method(records: Sequence[Any], spec: MethodSpec, source: str) -> None:
    if spec.alg_name not in NEEDS_SUBJECT:
        return
    for i, r in enumerate(records):
        index = r.uid.rsplit(":", 1)[-1]
        if not r.subject:
            raise UsageError(f"{source}: record {index}: field 'subject' is required by {spec.alg_name}")
        if r.subject not in r.prompt:
            raise UsageError(f"{source}: record {index}: field 'subject' ({r.subject!r}) does not occur in the "
                             f"prompt, which {spec.alg_name} requires")


def _spec_from_args(args: argparse.Namespace) -> MethodSpec:
    if not args.hparams:
        return METHODS[args.method]
    import yaml

    path = Path(args.hparams)
    if not path.is_file():
        raise UsageError(f"hparams file {str(path)!r} not found")
    try:
        with open(path, encoding="utf-8") as f:
            config = yaml.safe_load(f) or {}
    except UnicodeDecodeError as exc:
        raise UsageError(f"hparams file {str(path)!r} is not UTF-8 text (offset {exc.start})") from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise UsageError(f"hparams file {str(path)!r} is not valid YAML{at}: {problem}") from None
    if not isinstance(config, dict):
        raise UsageError(f"hparams file {str(path)!r}: expected a mapping of keys, got {type(config).__name__}")
    alg = config.get("alg_name")
    if not isinstance(alg, str):
        raise UsageError(f"{path.name}: field 'alg_name' is missing")
    return MethodSpec(alg, alg, str(path.resolve()))


def _protected_dirs() -> list[Path]:
    from ..paths import REPO_ROOT

    return [Path("/").resolve(), Path.home().resolve(), Path.cwd().resolve(), Path(REPO_ROOT).resolve()]


def check_save_model_target(target: str | os.PathLike[str], *, overwrite: bool,
                            keep: Sequence[str | os.PathLike[str]] = ()) -> Path:
    """The resolved ``--save-model`` directory, or :class:`UsageError` when writing there could delete something
    the command did not create. ``keep``: files that must survive (the requests file, the results file)."""
    raw = str(target)
    path = Path(target).expanduser().resolve()
    for protected in _protected_dirs():
        if path == protected or path in protected.parents:
            raise UsageError(f"--save-model {raw!r} is {protected} or contains it; refusing (even with --overwrite) "
                             "to replace it: give a new directory")
    for other in keep:
        other_path = Path(other).expanduser().resolve()
        if path == other_path or path in other_path.parents:
            raise UsageError(f"--save-model {raw!r} would replace {str(other)!r}; give a new directory")
    if not path.exists():
        return path
    if not path.is_dir():
        raise UsageError(f"--save-model {raw!r} exists and is not a directory; refusing to replace it")
    if not any(path.iterdir()):
        return path
    if not (path / SAVED_MARKER).is_file():
        raise UsageError(f"--save-model {raw!r} is a non-empty directory that this command did not save; refusing "
                         "to replace it (even with --overwrite): give a new directory or remove it yourself")
    if not overwrite:
        raise UsageError(f"--save-model {raw!r} already holds a saved model; pass --overwrite to replace it")
    return path


def check_out_target(out: str | os.PathLike[str], requests: str | os.PathLike[str], *, overwrite: bool) -> Path:
    """The resolved results path, or :class:`UsageError` (the requests file itself, a directory, or an existing
    file without ``--overwrite``)."""
    path = Path(out).expanduser().resolve()
    src = Path(requests).expanduser().resolve()
    if path == src or (path.exists() and src.exists() and os.path.samefile(path, src)):
        raise UsageError(f"--out {str(out)!r} is the requests file; refusing to overwrite it (even with --overwrite)")
    if path.is_dir():
        raise UsageError(f"--out {str(out)!r} is a directory; give a file name")
    if path.exists() and not overwrite:
        raise UsageError(f"--out {str(out)!r} exists; pass --overwrite to replace it")
    return path


def atomic_save_model(model: Any, tok: Any, target: Path, *, overwrite: bool = False,
                      keep: Sequence[str | os.PathLike[str]] = ()) -> None:
    """Save an HF model directory via a temporary sibling folder renamed into place (:func:`atomic_dir`).

    The target is checked again with :func:`check_save_model_target` right before the rename; a replaced earlier
    save is moved aside first and deleted only once the new one is in place (restored if the rename fails).
    """
    target = check_save_model_target(target, overwrite=overwrite, keep=keep)
    if hasattr(model, "merge_and_unload"):  # a peft wrapper (LoRA): fold the adapter into the weights
        model = model.merge_and_unload()
    # the target may have changed while saving: check again; it is then empty or our own earlier save
    with atomic_dir(target, replace_existing=True,
                    check_before_rename=lambda: check_save_model_target(target, overwrite=overwrite, keep=keep)) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        (tmp / SAVED_MARKER).write_text(json.dumps({"saved_by": "easyedit-agrade edit",
                                                    "time": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")


def edit_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``easyedit-agrade edit`` (returns the exit status)."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        spec = _spec_from_args(args)
        records, cases = read_requests(args.requests, args.format, args.limit)
        _check_for_method(records, spec, Path(args.requests).name)
        out = Path(args.out) if args.out else Path(args.requests).with_name(
            f"{Path(args.requests).stem}.{spec.name}.results.json")
        check_out_target(out, args.requests, overwrite=args.overwrite)
        if args.save_model:
            check_save_model_target(args.save_model, overwrite=args.overwrite, keep=(args.requests, out))
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from ..distributed.collective import init_from_env

    # under torchrun / accelerate launch every rank runs this with the same requests; AGRADE's executor caches
    # only this rank's shard and all ranks apply the same ΔW (docs/distributed.md); rank 0 writes the results
    coll = init_from_env()
    try:
        result, edited, tok = _run(args, spec, records, cases)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001
        from .runner import error_text

        print(f"error: {spec.name} failed, nothing written: {error_text(exc)}", file=sys.stderr)
        return 1
    from .runner import _sanitize, atomic_write_text

    if not coll.is_main:
        return 0
    try:  # checked again: the paths may have changed during the edit
        check_out_target(out, args.requests, overwrite=args.overwrite)
        if args.save_model:
            atomic_save_model(edited, tok, Path(args.save_model), overwrite=args.overwrite, keep=(args.requests, out))
            result["saved_model"] = Path(args.save_model).name
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    atomic_write_text(out, json.dumps(_sanitize(result), indent=1, ensure_ascii=False))
    summary = result.get("summary") or {}
    parts = [f"{k} {summary[k]:.3f}" for k in ("ES", "GS", "LS", "Score") if summary.get(k) is not None]
    ratios = [r["heldout_ppl_ratio"] for r in result.get("edit_reports", []) if r.get("heldout_ppl_ratio")]
    if ratios:  # the perplexity guard was on (max_heldout_ppl_ratio): each call's ratio against the model it got
        parts.append(f"held-out perplexity {max(ratios):.3f}x" + (" (largest per call)" if len(ratios) > 1 else ""))
    print(f"edited {len(records)} record(s) with {spec.name} ({result['mode']}) in {result['edit_seconds']:.1f}s"
          + (f"; {', '.join(parts)}" if parts else "") + f"; results: {out}")
    return 0


def _run(args: argparse.Namespace, spec: MethodSpec, records: Sequence[Any], cases: Sequence[Any]):
    import torch

    from ..evaluate.suite import Evaluator
    from ..integration.cpu_compat import cuda_on_cpu
    from ..lm import load_model_and_tokenizer
    from .methods import apply_edits, diagnose, edit_mode, load_hparams, make_editor, method_context
    from .resources import measure
    from .runner import _quiet_easyedit

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        hparams = load_hparams(spec)
    except (FileNotFoundError, ValueError, TypeError) as exc:
        raise UsageError(f"hparams: {exc}") from None
    mode, why = edit_mode(spec, hparams)
    if args.mode != "auto":
        mode, why = args.mode, "chosen with --mode"
    model, tok = load_model_and_tokenizer(args.model)
    tok.padding_side = "left"
    evaluator = Evaluator(tok) if not args.no_eval else None
    pre = evaluator.score(model, records, cases) if evaluator else None
    requests = [r.to_request() for r in records]
    notes: list[str] = []
    reports: list[dict] = []
    log = open(os.devnull, "w")
    try:
        with contextlib.redirect_stdout(log), cuda_on_cpu():
            _quiet_easyedit()
            editor = make_editor(hparams, model, tok, args.model)
            _quiet_easyedit()
            with method_context(spec, editor.model, editor.hparams, len(requests), notes), measure() as m:
                edited = apply_edits(editor, requests, mode, reports=reports)
    except Exception as exc:
        reason = diagnose(spec, hparams, exc)
        if reason:
            raise RuntimeError(f"{exc} ({reason})") from exc
        raise
    finally:
        log.close()
    result: dict[str, Any] = {"method": spec.name, "alg_name": spec.alg_name, "mode": mode, "mode_reason": why,
                              "n_edits": len(records), "requests_file": Path(args.requests).name,
                              "model": args.model, **m.as_dict(), "notes": notes, "edit_reports": reports,
                              "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if evaluator is not None:
        with torch.no_grad():
            post = evaluator.score(edited, records, cases)
        result["summary"] = evaluator.summarize(records, cases, post, pre)
        result["records"] = evaluator.per_record(records, post, pre)
    else:
        result["records"] = [{"case_id": r.uid, "requested_rewrite": r.to_request()} for r in records]
    return result, edited, tok
