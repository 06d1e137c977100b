"""The evaluator: every probe of an edited set scored in padded batches, summarised as the papers report it.

Given edit records (:class:`~.records.EvalRecord`) and MQuAKE cases, :class:`Evaluator` builds one flat list of
teacher-forced probes and scores it with :func:`~.scoring.score_pairs` (one forward per batch, not per record):

* ``rewrite`` — ``prompt -> target_new`` (ES; EasyEdit ``rewrite_acc``);
* ``rephrase`` — the first paraphrase -> ``target_new`` (GS; ``rephrase_acc``);
* ``locality`` — ``neighborhood`` (LS), ``Other-Attribution``, ``Forgetfulness``, and ``Distract-Neighbor`` (the edit
  sentence ``prompt + " " + target_new + "."`` prepended to the neighbourhood prompt). As in EasyEdit, a locality
  probe's value is the agreement of the argmax tokens after the edit with those of the unedited model on the same
  input (teacher-forced on the probe's answer), so the unedited model scores 1 by construction;
* ``portability`` — One-Hop, Subject-Replace, Inverse-Relation, KnowEdit Reasoning / Subject_Aliasing /
  Logical_Generalization: token accuracy on the probe's answer (EasyEdit ``portability``);
* MQuAKE (Zhong et al. 2023; the pitfalls survey, eqs. 7-9): edit-wise success (each edited fact recalled exactly),
  instance-wise accuracy (every new single hop of a case recalled, any alias), multi-hop accuracy (any of the
  case's questions answered with the new answer or an alias). "Recalled exactly" = all answer tokens are the argmax
  under teacher forcing, i.e. greedy decoding starts with the answer.

Scores are keyed by probe, so the unedited model's scores (needed for locality) are computed once for the
largest evaluation set and reused for every method and size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence

from ..core.tokenize import join_prompt_target
from .metrics import agreement, editing_score, mean
from .records import DISTRACT_NEIGHBOR, NEIGHBORHOOD, EvalRecord, MQuAKECase, Probe
from .scoring import PairScore, score_pairs

ItemKey = tuple  # (rid, kind, key, j, alias)


@dataclass(frozen=True)
class Item:
    rid: str
    kind: str  # rewrite | rephrase | locality | portability | mq_question | mq_hop
    key: str
    j: int
    alias: int
    prompt: str
    target: str

    @property
    def id(self) -> ItemKey:
        return (self.rid, self.kind, self.key, self.j, self.alias)


def distract_prompt(record: EvalRecord, probe: Probe) -> str:
    """The Distract-Neighbor input: the edit as a sentence, then the unrelated prompt."""
    sentence = join_prompt_target(record.prompt, record.target_new)[0].rstrip()
    if sentence[-1] not in ".?!":
        sentence += "."
    return f"{sentence} {probe.prompt}"


class Evaluator:
    """Scores edit records and summarises them (see the module docstring).

    ``max_probes_per_key`` caps the probes of one key per record (KnowEdit lists can be long; None = all);
    ``max_aliases`` caps the aliases tried for exact-match metrics; ``score_kwargs`` go to
    :func:`~.scoring.score_pairs` (``batch_tokens``, ``max_batch``, ``padding_side``, ``max_length``).
    """

    def __init__(self, tok: Any, *, max_probes_per_key: Optional[int] = None, max_aliases: int = 5,
                 distract_neighbor: bool = True, **score_kwargs: Any) -> None:
        self.tok = tok
        self.max_probes = max_probes_per_key
        self.max_aliases = max(1, max_aliases)
        self.distract = distract_neighbor
        self.score_kwargs = score_kwargs

    # ------------------------------------------------------------------ probes
    def _cap(self, probes: Sequence[Probe]) -> Sequence[Probe]:
        return probes if self.max_probes is None else probes[: self.max_probes]

    def locality_probes(self, r: EvalRecord) -> dict[str, list[Probe]]:
        out = {k: list(self._cap(v)) for k, v in r.locality.items() if v}
        if self.distract and out.get(NEIGHBORHOOD):
            out[DISTRACT_NEIGHBOR] = [Probe(distract_prompt(r, p), p.answers) for p in out[NEIGHBORHOOD]]
        return out

    def items(self, records: Iterable[EvalRecord], cases: Iterable[MQuAKECase] = ()) -> list[Item]:
        out: list[Item] = []
        for r in records:
            out.append(Item(r.uid, "rewrite", "", 0, 0, r.prompt, r.target_new))
            if r.rephrase:
                out.append(Item(r.uid, "rephrase", "", 0, 0, r.rephrase[0], r.target_new))
            for key, probes in self.locality_probes(r).items():
                out.extend(Item(r.uid, "locality", key, j, 0, p.prompt, p.answer) for j, p in enumerate(probes))
            for key, probes in r.portability.items():
                out.extend(Item(r.uid, "portability", key, j, 0, p.prompt, p.answer)
                           for j, p in enumerate(self._cap(probes)))
        for c in cases:
            for kind, probes in (("mq_question", c.questions), ("mq_hop", c.hops)):
                for j, p in enumerate(probes):
                    out.extend(Item(c.uid, kind, "", j, a, p.prompt, ans)
                               for a, ans in enumerate(p.answers[: self.max_aliases]))
        return out

    def score(self, model: Any, records: Iterable[EvalRecord], cases: Iterable[MQuAKECase] = (),
              known: Optional[Mapping[ItemKey, PairScore]] = None) -> dict[ItemKey, PairScore]:
        """Score every probe (skipping those already in ``known``); returns ``known`` updated with the new ones."""
        items = [it for it in self.items(records, cases) if known is None or it.id not in known]
        scores = score_pairs(model, self.tok, [it.prompt for it in items], [it.target for it in items],
                             **self.score_kwargs)
        out = dict(known or {})
        out.update({it.id: s for it, s in zip(items, scores)})
        return out

    # ------------------------------------------------------------------ EasyEdit structure
    def easyedit_outputs(self, r: EvalRecord, scores: Mapping[ItemKey, PairScore]) -> dict:
        """What EasyEdit's ``compute_edit_quality`` returns for ``r.to_request()`` on the scored model:
        ``rewrite_acc``/``rephrase_acc`` lists, ``locality[{key}_output]`` argmax tokens, ``portability[{key}_acc]``.
        (Includes the derived Distract-Neighbor locality key, which a plain request does not carry.)"""
        ret: dict[str, Any] = {"rewrite_acc": [scores[(r.uid, "rewrite", "", 0, 0)].acc], "locality": {},
                               "portability": {}}
        if r.rephrase:
            ret["rephrase_acc"] = [scores[(r.uid, "rephrase", "", 0, 0)].acc]
        for key, probes in self.locality_probes(r).items():
            ret["locality"][f"{key}_output"] = [scores[(r.uid, "locality", key, j, 0)].pred
                                                for j in range(len(probes))]
        for key, probes in r.portability.items():
            ret["portability"][f"{key}_acc"] = [scores[(r.uid, "portability", key, j, 0)].acc
                                                for j in range(len(self._cap(probes)))]
        return ret

    def easyedit_post(self, r: EvalRecord, post: Mapping[ItemKey, PairScore],
                      pre: Mapping[ItemKey, PairScore]) -> dict:
        """The ``post`` block of ``BaseEditor.edit``: locality outputs turned into ``{key}_acc`` against ``pre``."""
        ret = self.easyedit_outputs(r, post)
        before = self.easyedit_outputs(r, pre)
        for name in list(ret["locality"]):
            key = name[: -len("_output")]
            ret["locality"][f"{key}_acc"] = [agreement(a, b) for a, b in
                                             zip(ret["locality"].pop(name), before["locality"][name])]
        return ret

    # ------------------------------------------------------------------ summaries
    def summarize(self, records: Sequence[EvalRecord], cases: Sequence[MQuAKECase],
                  post: Mapping[ItemKey, PairScore], pre: Mapping[ItemKey, PairScore]) -> dict:
        """All metrics of one model state. ``pre`` holds the unedited model's scores (``post is pre`` for the
        unedited model itself)."""
        per = [self.easyedit_post(r, post, pre) for r in records]

        def block(sel: Sequence[int]) -> dict:
            es = mean(per[i]["rewrite_acc"][0] for i in sel)
            gs = mean(per[i]["rephrase_acc"][0] for i in sel if "rephrase_acc" in per[i])
            ls = mean(mean(per[i]["locality"][f"{NEIGHBORHOOD}_acc"]) for i in sel
                      if f"{NEIGHBORHOOD}_acc" in per[i]["locality"])
            return {
                "ES": es, "GS": gs, "LS": ls, "Score": editing_score(es, gs, ls),
                "ES_exact": mean(float(post[(records[i].uid, "rewrite", "", 0, 0)].exact) for i in sel),
                "GS_exact": mean(float(post[(records[i].uid, "rephrase", "", 0, 0)].exact) for i in sel
                                 if records[i].rephrase),
                "n": {"ES": len(sel), "GS": sum("rephrase_acc" in per[i] for i in sel),
                      "LS": sum(f"{NEIGHBORHOOD}_acc" in per[i]["locality"] for i in sel)},
            }

        edits = list(range(len(records)))
        out = block(edits)
        families = sorted({records[i].family for i in edits})
        out["by_family"] = {f: block([i for i in edits if records[i].family == f]) for f in families}

        def keyed(section: str, suffix: str = "_acc") -> dict:
            keys = sorted({k for p in per for k in p[section]})
            res = {}
            for k in keys:
                vals = [mean(p[section][k]) for p in per if k in p[section]]
                res[k[: -len(suffix)]] = {"acc": mean(vals), "n": len(vals)}
            return res

        out["portability"] = keyed("portability")
        out["locality"] = keyed("locality")
        out["mquake"] = self._mquake(records, cases, post)
        out["easyedit"] = {
            "rewrite_acc": mean(p["rewrite_acc"][0] for p in per),
            "rephrase_acc": mean(p["rephrase_acc"][0] for p in per if "rephrase_acc" in p),
            "locality": {f"{k}_acc": v["acc"] for k, v in out["locality"].items()},
            "portability": {f"{k}_acc": v["acc"] for k, v in out["portability"].items()},
        }
        return out

    def _mquake(self, records: Sequence[EvalRecord], cases: Sequence[MQuAKECase],
                post: Mapping[ItemKey, PairScore]) -> dict:
        mq = [r for r in records if r.family == "mquake"]
        if not mq and not cases:
            return {}

        def any_alias(rid: str, kind: str, j: int, probe: Probe) -> bool:
            return any(post[(rid, kind, "", j, a)].exact for a in range(len(probe.answers[: self.max_aliases])))

        iw = [all(any_alias(c.uid, "mq_hop", j, p) for j, p in enumerate(c.hops)) for c in cases]
        mh = [any(any_alias(c.uid, "mq_question", j, p) for j, p in enumerate(c.questions)) for c in cases]
        return {
            "edit_wise": mean(float(post[(r.uid, "rewrite", "", 0, 0)].exact) for r in mq),
            "instance_wise": mean(float(x) for x in iw),
            "multi_hop": mean(float(x) for x in mh),
            "n_edits": len(mq),
            "n_cases": len(cases),
        }

    def per_record(self, records: Sequence[EvalRecord], post: Mapping[ItemKey, PairScore],
                   pre: Mapping[ItemKey, PairScore]) -> list[dict]:
        """EasyEdit-structure results per record: ``{"case_id", "requested_rewrite", "pre", "post"}``."""
        return [{"case_id": r.uid, "requested_rewrite": r.to_request(), "pre": self.easyedit_outputs(r, pre),
                 "post": self.easyedit_post(r, post, pre)} for r in records]
