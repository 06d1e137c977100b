"""Fixtures: a tiny InstructEdit editor trained for a few steps on the embedded model (once per session)."""
from __future__ import annotations

import pytest

from easyedit_agrade.paths import REPO_ROOT

TRAIN_FACTS = [
    ("The Eiffel Tower is located in the city of", "Rome", "The Eiffel Tower can be found in", "The Colosseum is in", "Rome"),
    ("The mother tongue of Danielle Darrieux is", "English", "Danielle Darrieux's native language is",
     "The mother tongue of Thomas Joannes Stieltjes is", "Dutch"),
    ("Apple A5 was created by", "Google", "Apple A5 was developed by", "Windows 10 was created by", "Microsoft"),
    ("The capital of Germany is", "Paris", "Germany's capital city is", "The capital of Italy is", "Rome"),
]


def tiny_records():
    from easyedit_agrade.models.instructedit.multitask import TaskRecord

    cf = [TaskRecord("counterfact", p, t, rephrase_prompt=r, locality_prompt=lp, locality_ground_truth=la, index=i)
          for i, (p, t, r, lp, la) in enumerate(TRAIN_FACTS)]
    conv = [TaskRecord("convsent", "What do you think of bananas?", "I love bananas, they are delicious.",
                       rephrase_prompt="Tell me your opinion of bananas.", subject="bananas", label="positive",
                       responses=["I love bananas, they are delicious.", "Bananas are great."],
                       opposite=["I hate bananas.", "Bananas are awful."], locality_prompt="What do you think of cats?",
                       locality_ground_truth="Cats are fine.", index=0)]
    return {"counterfact": cf, "convsent": conv}


@pytest.fixture()
def tiny_task_records():
    return tiny_records()


@pytest.fixture(scope="session")
def tiny_instructions():
    from easyedit_agrade.models.instructedit.instructions import InstructionSet

    desc = {t: [f"Edit {t} facts, variant {i}." for i in range(10)] for t in ("counterfact", "wikirecent", "zsre")}
    desc["convsent"] = [f"Be [LABEL] about [TOPIC], variant {i}." for i in range(10)]
    return InstructionSet(desc, source="tiny")


@pytest.fixture(scope="session")
def tiny_archive(tmp_path_factory, embedded_model, tiny_instructions):
    """Path of an editor trained 3 steps (2 edits each) on four CounterFact-style facts and one ConvSent topic."""
    import torch

    from easyedit_agrade.models.instructedit.instructedit_trainer import InstructEditTrainer, load_training_config

    torch.set_num_threads(1)
    cfg = load_training_config(str(REPO_ROOT / "hparams/TRAINING/InstructEdit/smollm2-135m.yaml"),
                               {"max_steps": 3, "n_edits": 2, "accumulate": 1, "val_every": 0, "checkpoint_every": 2,
                                "train_lower_dtype": None, "edit_lr": 1e-3, "lr": 1e-3, "tasks": ["counterfact", "convsent"]})
    out = tmp_path_factory.mktemp("tiny-instructedit")
    model, tok = embedded_model
    recs = tiny_records()
    trainer = InstructEditTrainer(cfg, recs, {}, model=model, tok=tok, out_dir=str(out), log=lambda s: None,
                                  instructions=tiny_instructions)
    summary = trainer.run()
    assert summary["step"] == 3
    return out / "last.safetensors"
