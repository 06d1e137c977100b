"""The shared trainer loop (``core.editor_trainer``) with a scripted method: validation schedule, early stopping,
best export, checkpoints, resume == uninterrupted, the two ways a run ends, and the shared command line."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from easyedit_agrade.core.checkpoint import load_json, load_tensors, save_tensors
from easyedit_agrade.core.editor_trainer import EditorTrainer, train_cli, trainer_arg_parser
from easyedit_agrade.distributed.collective import Collective


class ScriptedTrainer(EditorTrainer):
    """A one-weight "network" whose gradient depends on the step; validation scores come from a script."""

    def __init__(self, config, scores, **kw):
        super().__init__(config, collective=Collective(), model=torch.nn.Linear(1, 1), tok=object(),
                         progress=False, log=lambda *_: None, **kw)
        torch.manual_seed(0)
        self.nets = self.place_networks(torch.nn.Linear(2, 1))
        self.opt = torch.optim.Adam(self.nets.parameters(), lr=0.1)
        self.scores = scores

    def run_step(self):
        self.opt.zero_grad()
        x = torch.tensor([[1.0, float(self.step)]], dtype=torch.float64)
        loss = (self.nets(x) - 1.0).pow(2).sum()
        loss.backward()
        self.opt.step()
        return {"loss": float(loss.detach())}

    def validate(self):
        s = self.scores[self.step]
        return {"score": s, "loss": s}  # the same numbers: "loss" is the key where lower is better

    def history_entry(self, val):
        return {"step": self.step, "score": val["score"]}

    def training_facts(self, metrics=None):
        return {"step": self.step, "metrics": metrics}

    def write_archive(self, path, facts):
        save_tensors(path, self.nets.state_dict(), {"facts": facts})

    def checkpoint_metadata(self):
        return {"alg_name": "Scripted"}


def _config(tmp_path, **over):
    cfg = dict(results_dir=str(tmp_path), max_steps=6, val_every=1, checkpoint_every=0, editor_dtype="float64",
               train_lower_dtype=None, patience=2, early_stop_key="score")
    cfg.update(over)
    return SimpleNamespace(**cfg, to_dict=lambda: dict(cfg))


SCORES = {1: 1.0, 2: 3.0, 3: 2.0, 4: 2.5, 5: 9.0, 6: 9.0}


def test_early_stop_after_patience_validations_without_gain_and_best_export(tmp_path):
    tr = ScriptedTrainer(_config(tmp_path, checkpoint_every=10), SCORES)
    summary = tr.run()
    assert summary == {"step": 4, "best": 3.0, "best_step": 2}
    assert tr.state["stopped_early"] and tr.state["bad_evals"] == 2
    assert [h["step"] for h in tr.state["history"]] == [1, 2, 3, 4]
    assert load_json(tmp_path / "best.json") == {"step": 2, "metrics": {"step": 2, "score": 3.0}}
    # the stop step is checkpointed although 4 is not a multiple of checkpoint_every
    assert load_json(tmp_path / "checkpoints" / "latest.json")["step"] == 4
    assert load_json(tmp_path / "config.json")["patience"] == 2


def test_loss_key_prefers_lower_and_no_patience_means_no_early_stop(tmp_path):
    tr = ScriptedTrainer(_config(tmp_path, early_stop_key="loss"), SCORES)
    tr.run()
    assert (tr.state["best"], tr.state["best_step"]) == (1.0, 1)  # 3.0 and 2.0 after it are worse
    assert tr.state["stopped_early"] and tr.step == 3
    tr = ScriptedTrainer(_config(tmp_path / "off", patience=None), SCORES)
    assert tr.run() == {"step": 6, "best": 9.0, "best_step": 5}
    assert "bad_evals" not in tr.state and "stopped_early" not in tr.state


def test_resume_continues_like_an_uninterrupted_run(tmp_path):
    cfg = dict(checkpoint_every=1, patience=3, val_every=2)
    full = ScriptedTrainer(_config(tmp_path / "full", **cfg), SCORES)
    full.run()
    # (stopped at a validation step: a run's last step is always validated)
    ScriptedTrainer(_config(tmp_path / "split", **cfg), SCORES, max_steps=4).run()
    resumed = ScriptedTrainer(_config(tmp_path / "split", **cfg), SCORES, resume=True)
    assert resumed.load_checkpoint() and resumed.step == 4 and resumed.state["bad_evals"] == 1
    resumed.step = 0  # run() resumes again from the same checkpoint
    resumed.run()
    assert resumed.step == full.step == 6
    a, b = full.nets.state_dict(), resumed.nets.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    keep = ("best", "best_step", "bad_evals", "history", "stopped_early")
    assert {k: full.state[k] for k in keep} == {k: resumed.state[k] for k in keep}
    fa, _ = load_tensors(tmp_path / "full" / "best.safetensors")
    fb, _ = load_tensors(tmp_path / "split" / "best.safetensors")
    assert all(torch.equal(fa[k], fb[k]) for k in fa)


@pytest.mark.parametrize("after_loop", [False, True])
def test_the_two_ways_a_run_ends(tmp_path, after_loop):
    cls = type("T", (ScriptedTrainer,), {"final_round_after_loop": after_loop})
    tr = cls(_config(tmp_path, max_steps=3, val_every=2, checkpoint_every=0, patience=None), SCORES)
    tr.run()
    assert [h["step"] for h in tr.state["history"]] == [2, 3]  # the last step is validated either way
    assert (tmp_path / "checkpoints").exists() is after_loop  # checkpoint_every=0: only the after-loop end writes
    assert (tmp_path / "last.safetensors").exists() is after_loop


def test_train_cli_collects_overrides_and_rejects_a_bad_set(capsys):
    parser = trainer_arg_parser(alg="X", prog="p", description="d", out_help="o", set_help="s",
                                after_seed=[(["--n-edits"], dict(type=int, help="n"))])
    seen = {}

    def start(cfg, args):
        seen.update(cfg=cfg, out=args.out)
        return 7

    load = lambda path, overrides: (path, overrides)  # noqa: E731
    extra = lambda args: [("n_edits", args.n_edits), ("preset", None)]  # noqa: E731
    assert train_cli(["c.yaml", "--seed", "4", "--n-edits", "2", "--set", "lr=0.5", "--out", "o"], parser, load,
                     extra, start) == 7
    assert seen == {"cfg": ("c.yaml", {"lr": 0.5, "seed": 4, "n_edits": 2}), "out": "o"}
    assert train_cli(["c.yaml", "--set", "lr"], parser, load, extra, start) == 2
    assert "--set expects KEY=VALUE" in capsys.readouterr().err
    flags = [a.option_strings[0] if a.option_strings else a.dest for a in parser._actions]
    assert flags == ["-h", "config", "--out", "--resume", "--max-steps", "--seed", "--n-edits", "--set", "--threads"]
