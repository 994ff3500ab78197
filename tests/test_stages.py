"""The stage definitions (llm_trainer/stages.py): what each says is consistent with train.py and prepare.py, and a
setting of another stage is refused before any work."""

import pytest

import configurator
import train
from llm_trainer import stages
from llm_trainer.data.batches import UNITS


def check(argv):
    cfg = train.configure(argv)
    train.check_config(cfg, stages.get(cfg["stage"]), 1)


def test_each_stage_names_train_keys_and_a_known_unit():
    for stage in stages.STAGES.values():
        assert stage.unit in UNITS, stage.name
        assert set(stage.keys) <= set(train._DEFAULTS), stage.name
        assert set(stage.fixed_on_resume) <= set(stage.keys), stage.name
    # stage=auto maps each kind of record to one stage (pairs to dpo: rm trains on the same sets)
    kinds = [s.record_kind for s in stages.STAGES.values()]
    assert {k: stages.of_record_kind(k).name for k in kinds} == {"text": "pretrain", "chat": "sft", "pair": "dpo",
                                                                 "task": "grpo"}
    assert [s.name for s in stages.STAGES.values() if s.record_kind == "pair"] == ["dpo", "rm"]


@pytest.mark.parametrize("stage, key, value", [("sft", "dpo_beta", 0.5), ("dpo", "grpo_group", 4),
                                               ("pretrain", "reward", "length"), ("grpo", "think_tag_weight", 2.0)])
def test_a_setting_of_another_stage_is_refused(stage, key, value, capsys):
    with pytest.raises(configurator.ConfigError) as e:
        check([f"--stage={stage}", f"--{key}={value}"])
    assert f"{key}=" in e.value.message and f"stage {stage} does not use it" in e.value.message
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


@pytest.mark.parametrize("stage, key, value", [("dpo", "dpo_beta", 0.5), ("grpo", "grpo_group", 4),
                                               ("pretrain", "think_tag_weight", 2.0), ("sft", "think_tag_weight", 2.0)])
def test_a_setting_of_its_own_stage_passes(stage, key, value):
    check([f"--stage={stage}", f"--{key}={value}"])


def test_an_unknown_stage_lists_the_stages():
    with pytest.raises(configurator.ConfigError) as e:
        stages.get("rlhf")
    assert e.value.message == f"stage must be one of {', '.join(stages.STAGES)}, got 'rlhf'"


def test_tokens_per_step():
    cfg = train.configure(["--stage=dpo", "--batch_size=3", "--block_size=16", "--gradient_accumulation_steps=2",
                           "--pack=False"])  # packed rows of pairs: tests/test_pack_pairs.py
    assert stages.tokens_per_step(cfg) == 2 * 3 * 16 * 2  # chosen and rejected rows
    assert stages.tokens_per_step({**cfg, "stage": "sft"}) == 3 * 16 * 2
    assert stages.tokens_per_step({**cfg, "stage": "grpo"}) is None  # rows as long as prompt and completion
