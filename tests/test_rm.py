"""The reward-model stage (stage=rm) and GRPO against a reward model (reward="rm:DIR"): the Bradley-Terry loss by
hand from the last token's hidden state, margins from the data, a toy preference learnt, the export to transformers'
LlamaForSequenceClassification (padded on either side), every start (a run, an HF directory, an exported reward
model, LoRA), exact resume, 2 ranks == 1 process, GRPO's logged rewards equal to the reward model scored directly,
prompts without references, and one clear line for each bad input."""

import json
import math
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import export
import prepare
import train
from llm_trainer import stages
from llm_trainer.core.checkpoint import load_checkpoint, load_model, save_checkpoint
from llm_trainer.data import shards
from llm_trainer.data.tokenizer import load_tokenizer
from llm_trainer.training import grpo, losses, optimizers
from llm_trainer.training.rewards import conversation
from model import ModelConfig, Transformer
from tests.helpers import ROOT, TINY, metrics, run_train, sigkill_after_checkpoint, train_losses, val_losses

transformers = pytest.importorskip("transformers")

SMALL = ["--dim=32", "--n_layers=1", "--n_heads=2", "--block_size=96", "--batch_size=4", "--warmup_iters=0",
         "--eval_iters=2", "--log_interval=1"]


def rm_args(data, out, *extra):
    return [f"--data_dir={data}", f"--out_dir={out}", "--stage=rm", *SMALL, *extra]


def one_line_exit_2(p):
    lines = [line for line in p.stderr.strip().splitlines() if line]
    assert p.returncode == 2 and len(lines) == 1, (p.returncode, p.stdout[-2000:], p.stderr)
    return lines[0]


@pytest.fixture(scope="module")
def lm_run(demo_sft, tmp_path_factory):
    """A tiny language model (a few SFT steps): what a reward model starts from."""
    out = str(tmp_path_factory.mktemp("lm_run"))
    run_train([f"--data_dir={demo_sft}", f"--out_dir={out}", "--stage=sft", *SMALL, "--max_iters=3",
               "--eval_interval=3", "--learning_rate=3e-3", "--tie_embeddings=False"])
    return out


@pytest.fixture(scope="module")
def rm_run(demo_dpo, lm_run, tmp_path_factory):
    """A reward model trained a few steps from lm_run on the demo's preference pairs."""
    out = str(tmp_path_factory.mktemp("rm_run"))
    run_train(rm_args(demo_dpo, out, f"--init_from={lm_run}", "--max_iters=4", "--eval_interval=4",
                      "--learning_rate=3e-3"))
    return out


@pytest.fixture(scope="module")
def prompts_only(demo_pretrain, tmp_path_factory):
    """A grpo set of the demo's preference prompts alone (plain {"prompt"} and chats that end with the user's
    message), no reference answers, with the demo tokenizer."""
    root = tmp_path_factory.mktemp("prompts_only")
    for split in ("train", "val"):
        records = []
        with open(os.path.join(ROOT, "data", "demo", f"dpo_{split}.jsonl"), encoding="utf-8") as f:
            for i, line in enumerate(f):
                pair = json.loads(line)
                prompt = pair["prompt"] if "prompt" in pair else pair["chosen"][0]["content"]
                records.append({"prompt": prompt} if i % 2 else {"messages": [{"role": "user", "content": prompt}]})
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records[:200]),
                                             encoding="utf-8")
    out = str(root / "data")
    prepare.main([f"--input={root / 'train.jsonl'}", f"--val_input={root / 'val.jsonl'}", f"--out_dir={out}",
                  f"--tokenizer={demo_pretrain}", "--stage=grpo", "--max_len=48", "--workers=1"])
    return out


# -----------------------------------------------------------------------------
# the loss, by hand


def build(data, out, **overrides):
    return train.build(train.configure([f"--{k}={v}" for k, v in {
        "data_dir": data, "out_dir": out, "stage": "rm", "dim": 32, "n_layers": 1, "n_heads": 2, "block_size": 96,
        "batch_size": 4, "verify_data": False, **overrides}.items()]))


def by_hand(run, batch, margins, center):
    """The step's summed loss from the model's hidden states: each row's score is the head's dot product with the
    hidden state of its last token before the padding, which is the document's last token."""
    h = run.raw_model.hidden_states(batch.x)
    lengths = [len(run.train_batches.split.document(d)[0]) for u in batch.units.tolist() for d in (2 * u, 2 * u + 1)]
    lengths = lengths[0::2] + lengths[1::2]  # chosen rows first, as the batch holds them
    T = batch.x.shape[1]
    r = torch.stack([h[i, min(n, T) - 1] @ run.raw_model.score.weight[0] for i, n in enumerate(lengths)])
    rc, rr = r.chunk(2)
    return (-F.logsigmoid(rc - rr - margins) + center * (rc + rr) ** 2).sum(), rc, rr


def test_the_loss_is_bradley_terry_of_the_last_tokens_scores(demo_dpo, tmp_path):
    """On pairs one per row pair (packed pairs equal them: tests/test_pack_pairs.py)."""
    run = build(demo_dpo, str(tmp_path), pack=False)
    batch = run.train_batches.get(0)
    assert losses.pair_has_targets(batch).all()
    # the last token before the padding is the newline after the reply's <|im_end|>: where transformers reads it
    last = losses.last_tokens(batch.x, run.train_batches.pad_id)
    tok = load_tokenizer(demo_dpo)
    assert all(tok.decode(batch.x[i, n - 1: n + 1].tolist()) == "<|im_end|>\n" for i, n in enumerate(last.tolist()))
    for margins, center in ((torch.zeros(4), 0.0), (torch.tensor([0.5, -1.0, 2.0, 0.0]), 0.1)):
        with torch.no_grad():
            loss, stats = losses.rm_loss(run.model, batch, run.train_batches.pad_id, margins, center)
            expected, rc, rr = by_hand(run, batch, margins, center)
        assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
        assert stats["accuracy"].item() == (rc > rr).sum().item()
        assert stats["margin"].item() == pytest.approx((rc - rr).sum().item(), abs=1e-6)
        assert stats["rewards/mean"].item() == pytest.approx(((rc + rr) / 2).sum().item(), abs=1e-6)
    # the step's loss is the mean over its pairs (the data has no margins, the coefficient is 0 by default), and
    # its figures are the scores' (of chosen and rejected rows alike)
    with torch.no_grad():
        expected, rc, rr = by_hand(run, batch, torch.zeros(4), 0.0)
    step = train.train_step(run, 0)
    assert step["loss"] == pytest.approx(expected.item() / 4, rel=1e-6)
    assert step["accuracy"] == (rc > rr).float().mean().item()
    assert step["rewards/std"] == pytest.approx(torch.cat([rc, rr]).std(unbiased=False).item(), rel=1e-4)
    assert set(losses.RM_FIGURES) <= set(step) and "rewards/square" not in step


def test_the_plan_counts_every_document_whose_scored_token_is_cut(demo_dpo, tmp_path):
    """A row's inputs are a document's first block_size tokens: one of block_size+1 tokens (whole for DPO's labels)
    loses its last token, where the score belongs, so a reward model's plan counts it with the longer ones."""
    split = shards.open_split(demo_dpo, "train")
    lengths = split.doc_ends - split.doc_starts
    block = int(lengths[0]) - 1  # the first document is exactly block_size+1 tokens long
    run = build(demo_dpo, str(tmp_path), block_size=block)
    longer = int((lengths > block).sum())
    assert longer > run.train_batches.truncated
    assert (f"; {longer:,} of {split.num_docs:,} documents are longer than block_size = {block}: each is scored at "
            f"its token {block}, not at its last") in stages.plan_rows(run)[1]


def test_margins_from_the_data_and_a_set_that_mixes_them(demo_pretrain, tmp_path):
    """A margin column: kept per pair in the .ref sidecar and subtracted in the loss; a record without one (or with
    one in a set without) is skipped and counted."""
    src = tmp_path / "pairs.jsonl"
    pairs = [{"prompt": f"{a} + {a} = ?", "chosen": str(2 * a), "rejected": str(2 * a + 1), "margin": a / 4}
             for a in range(12)]
    pairs.insert(5, {"prompt": "1 + 1 = ?", "chosen": "2", "rejected": "3"})  # no margin: skipped
    src.write_text("".join(json.dumps(p) + "\n" for p in pairs), encoding="utf-8")
    meta = prepare.main([f"--input={src}", f"--out_dir={tmp_path / 'data'}", f"--tokenizer={demo_pretrain}",
                         "--stage=rm", "--val_fraction=0", "--workers=1"])
    assert meta["stage"] == "rm" and meta["counts"]["skipped"] == {"margin_mismatch": 1}
    split = shards.open_split(tmp_path / "data", "train", verify=True)
    assert [r["margin"] for r in split.refs[0::2]] == [a / 4 for a in range(12)] == [r["margin"] for r in split.refs[1::2]]
    run = build(str(tmp_path / "data"), str(tmp_path / "run"), eval_iters=0)
    batch = run.train_batches.get(0)  # packed: each pair's margin found by its unit, wherever it lies
    assert batch.doc_index is not None and len(batch.units) > batch.x.shape[0]
    with torch.no_grad():
        loss, _ = stages.get("rm").loss(run, batch, "train")
        unpacked = run.train_batches.batch(batch.units.tolist())
        expected, _, _ = by_hand(run, unpacked, torch.tensor([u / 4 for u in batch.units.tolist()]), 0.0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    # a set without margins gets none: every pair's margin is 0
    plain = [{k: v for k, v in p.items() if k != "margin"} for p in pairs]
    plain.insert(3, {**pairs[0], "prompt": "2 + 2 = ?"})
    src.write_text("".join(json.dumps(p) + "\n" for p in plain), encoding="utf-8")
    meta = prepare.main([f"--input={src}", f"--out_dir={tmp_path / 'plain'}", f"--tokenizer={demo_pretrain}",
                         "--val_fraction=0", "--workers=1"])
    assert meta["stage"] == "dpo" and meta["counts"]["skipped"] == {"margin_mismatch": 1}
    assert shards.open_split(tmp_path / "plain", "train").refs is None


def test_a_bad_margin_on_the_first_record_does_not_drop_the_margins_of_the_rest(demo_pretrain, tmp_path):
    """The first usable record decides whether the set has a margin column; a first record whose margin is bad is
    not usable: skipped and counted (bad_margin), and the next one decides, so the others keep their margins."""
    src = tmp_path / "pairs.jsonl"
    pairs = [{"prompt": "1 + 1 = ?", "chosen": "2", "rejected": "3", "margin": "1.5"}]
    pairs += [{"prompt": f"{a} + {a} = ?", "chosen": str(2 * a), "rejected": str(2 * a + 1), "margin": a / 4}
              for a in range(6)]
    src.write_text("".join(json.dumps(p) + "\n" for p in pairs), encoding="utf-8")
    meta = prepare.main([f"--input={src}", f"--out_dir={tmp_path / 'data'}", f"--tokenizer={demo_pretrain}",
                         "--stage=rm", "--val_fraction=0", "--workers=1"])
    assert meta["counts"]["kept"] == 6 and meta["counts"]["skipped"] == {"bad_margin": 1}
    split = shards.open_split(tmp_path / "data", "train")
    assert [r["margin"] for r in split.refs[0::2]] == [a / 4 for a in range(6)]


def test_muon_keeps_the_score_head_in_the_head_group():
    """optimizer=muon: a reward model's score head is its output head (group "head", AdamW), as an LM head is, not
    part of the embedding's group (whose group_lr and group_weight_decay would then set it)."""
    model = Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, max_seq_len=16, head="score"))
    groups = {name: [n for n, _ in params] for name, _, params in optimizers.named_groups(model, {"optimizer": "muon"})}
    assert groups["head"] == ["score.weight"] and groups["embed"] == ["model.embed_tokens.weight"]


def test_rm_reads_pairs_prepared_for_dpo_and_dpo_reads_them_prepared_for_rm(demo_dpo, demo_sft, tmp_path, capsys):
    import configurator

    assert shards.load_meta(demo_dpo)["stage"] == "dpo"
    stages.check_data(stages.get("rm"), "dpo", demo_dpo)
    stages.check_data(stages.get("dpo"), "rm", demo_dpo)
    with pytest.raises(configurator.ConfigError) as e:
        stages.check_data(stages.get("rm"), "sft", demo_sft)
    assert e.value.message == f"{demo_sft} was prepared for stage 'sft', not 'rm' (prepare.py --stage=rm)"


def toy_preference(root, n_train, n_val, seed=0):
    """Pairs of a sentence of made-up words in their order (chosen) against the same words shuffled (rejected)."""
    rng = random.Random(seed)
    subjects, verbs, objects = (["the cat", "a dog", "my friend", "the old man", "a child"],
                                ["sees", "likes", "finds", "carries", "draws"],
                                ["a red ball", "the green tree", "some bread", "the small boat", "a blue cup"])
    for split, n in (("train", n_train), ("val", n_val)):
        with open(root / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for _ in range(n):
                words = f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)} today".split()
                shuffled = words[:]
                while shuffled == words:
                    rng.shuffle(shuffled)
                f.write(json.dumps({"prompt": "Say something.", "chosen": " ".join(words),
                                    "rejected": " ".join(shuffled)}) + "\n")


@pytest.mark.slow
def test_a_toy_preference_is_learnt_far_above_chance(data_tok_dir, tmp_path):
    """Fluent sentences against the same words shuffled: a tiny reward model from scratch ranks held-out pairs
    (other sentences) far above chance within a few hundred steps."""
    toy_preference(tmp_path, 600, 64)
    prepare.main([f"--input={tmp_path / 'train.jsonl'}", f"--val_input={tmp_path / 'val.jsonl'}",
                  f"--out_dir={tmp_path / 'data'}", f"--tokenizer={data_tok_dir}", "--stage=rm", "--workers=1"])
    out = str(tmp_path / "run")
    run_train(rm_args(str(tmp_path / "data"), out, "--max_iters=200", "--eval_interval=200", "--batch_size=16",
                      "--eval_iters=4", "--learning_rate=3e-3", "--log_interval=50", "--block_size=48"))
    evals = [r for r in metrics(out) if "val_loss" in r]
    assert evals[0]["val_accuracy"] < 0.8 and evals[-1]["val_accuracy"] >= 0.9, evals
    assert evals[-1]["val_loss"] < 0.5 * evals[0]["val_loss"] and "val_bpb" not in evals[-1]


# -----------------------------------------------------------------------------
# export, and every start


def hf_scores(hf, hf_tok, conversations, side):
    hf_tok.padding_side = side
    b = hf_tok.apply_chat_template(conversations, tokenize=True, padding=True, return_tensors="pt", return_dict=True)
    positions = (b["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # left padding: each sequence from position 0
    with torch.no_grad():
        return hf(input_ids=b["input_ids"], attention_mask=b["attention_mask"], position_ids=positions).logits[:, 0], b


def test_export_is_a_sequence_classifier_with_our_scores_padded_on_either_side(rm_run, tmp_path):
    hf_dir = str(tmp_path / "hf")
    export.export(rm_run, hf_dir)
    with open(os.path.join(hf_dir, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    tok = load_tokenizer(rm_run)
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["id2label"] == {"0": "LABEL_0"}
    assert config["pad_token_id"] == tok.eot_id and not os.path.exists(os.path.join(hf_dir, "generation_config.json"))
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(hf_dir, dtype=torch.float32,
                                                                         local_files_only=True).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    assert hf.config.num_labels == 1 and hf_tok.chat_template == tok.chat_template
    conversations = [
        [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I am a small model."}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "12 + 30 = ?"},
         {"role": "assistant", "content": "42"}],
        [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"},
         {"role": "user", "content": "Reverse the word \"stone\", please, and say it twice."},
         {"role": "assistant", "content": "enots enots"}]]
    ours, _ = load_model(rm_run)
    with torch.no_grad():
        singles = torch.stack([ours(torch.tensor([tok.render_chat(c)[0]]))[0, -1] for c in conversations])
        right = [tok.render_chat(c)[0] for c in conversations]
        x = torch.full((3, max(map(len, right))), tok.eot_id)
        for i, ids in enumerate(right):
            x[i, : len(ids)] = torch.tensor(ids)
        batched = losses.scores(ours, x, tok.eot_id)  # ours batched, right-padded
    for side in ("right", "left"):
        theirs, b = hf_scores(hf, hf_tok, conversations, side)
        assert [ids[mask.bool()].tolist() for ids, mask in zip(b["input_ids"], b["attention_mask"])] == right
        assert (theirs - singles).abs().max().item() <= 1e-4, side
    assert (batched - singles).abs().max().item() <= 1e-5


@pytest.mark.slow
def test_every_start_an_lm_run_an_hf_directory_an_exported_rm_and_lora(lm_run, rm_run, demo_dpo, tmp_path):
    """From an LM run (the fixture), from its HF export, and from an exported reward model, which continues where
    the run it came from stopped; LoRA trains the adapters and the new head in full."""
    lm_hf, rm_hf = str(tmp_path / "lm_hf"), str(tmp_path / "rm_hf")
    export.export(lm_run, lm_hf)
    export.export(rm_run, rm_hf)
    a, b = str(tmp_path / "from_hf_lm"), str(tmp_path / "from_hf_rm")
    run_train(rm_args(demo_dpo, a, f"--init_from={lm_hf}", "--max_iters=1", "--eval_interval=1"))
    run_train(rm_args(demo_dpo, b, f"--init_from={rm_hf}", "--max_iters=1", "--eval_interval=1"))
    assert val_losses(b)[0] == pytest.approx(val_losses(rm_run)[-1], abs=1e-5)  # the rm run's weights, continued
    assert val_losses(a)[0] == pytest.approx(math.log(2), abs=0.1)  # a new head: scores near 0, loss near ln 2
    lora = build(demo_dpo, str(tmp_path / "lora"), init_from=lm_run, lora_rank=4, max_iters=2, eval_interval=2)
    trained = {n for n, p in lora.raw_model.named_parameters() if p.requires_grad}
    assert "score.weight" in trained and all(".lora_" in n or n == "score.weight" for n in trained)
    head = lora.raw_model.score.weight.detach().clone()
    train.start(lora)
    state = load_checkpoint(os.path.join(str(tmp_path / "lora"), "ckpt.pt"))
    assert "score.weight" in state["model"] and not any(k.startswith("model.embed") for k in state["model"])
    merged, _ = load_model(str(tmp_path / "lora"))
    assert merged.mcfg.head == "score" and not torch.equal(merged.score.weight, head)
    export.export(str(tmp_path / "lora"), str(tmp_path / "lora_hf"))  # merged, as any reward model


@pytest.mark.slow
def test_exact_resume_after_sigkill_and_two_ranks_equal_one_process(rm_run, lm_run, demo_dpo, tmp_path):
    args = [f"--init_from={lm_run}", "--max_iters=6", "--eval_interval=3", "--learning_rate=3e-3",
            "--gradient_accumulation_steps=2", "--device=cpu"]
    ref, killed, two, fsdp = (str(tmp_path / n) for n in ("ref", "killed", "two", "fsdp"))
    run_train(rm_args(demo_dpo, ref, *args))
    sigkill_after_checkpoint(rm_args(demo_dpo, killed, *args), 3)
    run_train(rm_args(demo_dpo, killed, *args[1:], "--init_from=resume"))
    want = train_losses(ref)
    assert sorted(want) == list(range(1, 7)) and train_losses(killed) == want
    assert val_losses(killed) == val_losses(ref)
    run_train(rm_args(demo_dpo, two, *args), nproc=2, timeout=300)
    run_train(rm_args(demo_dpo, fsdp, *args, "--fsdp=True"), nproc=2, timeout=300)
    for other in (two, fsdp):
        got = train_losses(other)
        assert sorted(got) == sorted(want) and all(abs(got[i] - want[i]) <= 1e-5 for i in want), (other, got, want)
        last = [r for r in metrics(other) if "val_loss" in r][-1]
        assert last["val_accuracy"] == [r for r in metrics(ref) if "val_loss" in r][-1]["val_accuracy"]


# -----------------------------------------------------------------------------
# GRPO against a reward model


def grpo_rm_args(data, out, reward, lm, *extra):
    return [f"--data_dir={data}", f"--out_dir={out}", "--stage=grpo", f"--reward={reward}", f"--init_from={lm}",
            *TINY[4:], "--block_size=96", "--batch_size=2", "--grpo_group=4", "--max_new_tokens=12",
            "--eval_iters=2", *extra]


def test_prompts_alone_prepare_for_grpo(prompts_only):
    split = shards.open_split(prompts_only, "train")
    assert split.num_docs == 200 and all(r["answer"] is None for r in split.refs)
    text = load_tokenizer(prompts_only).decode(split.document(0)[0].tolist())
    assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_grpo_logs_the_rewards_the_reward_model_gives_directly(prompts_only, rm_run, lm_run, tmp_path):
    """The rewards of a fixed batch (iteration 0's rollouts) against the reward model itself, loaded on its own,
    scoring each conversation alone; and the conversation is the one the chat template renders for the prompt and
    the reply (the reply's ids as its text encodes them: a sampled reply's ids need not be)."""
    run = train.build(train.configure(grpo_rm_args(prompts_only, str(tmp_path), f"rm:{rm_run} + 0.5 * think_format",
                                                   lm_run, "--verify_data=False")))
    batches, group = run.train_batches, run.cfg["grpo_group"]
    plan = stages.plan_rollouts(run)[-1]  # the reward model in the plan, trained at the policy's block_size
    assert plan.startswith(f"reward model rm:{rm_run}, ") and "frozen, float32;" in plan
    rm_model = run.reward.reward_models[rm_run].model
    assert "trained at 96 positions, beyond which it extrapolates (block_size 128)" in stages.frozen_line(
        f"reward model rm:{rm_run}", rm_model, 128, "scores")
    docs = [batches.unit(r) for r in range(batches.B)]
    prompts = [batches.split.document(d)[0].tolist() for d in docs]
    completions = grpo.generate(run, [p for p in prompts for _ in range(group)], seed=run.cfg["seed"] * 1_000_003)
    rm, _ = load_model(rm_run)
    tok = load_tokenizer(rm_run)
    direct, rendered = [], 0
    with torch.no_grad():
        for i, c in enumerate(completions):
            prompt = prompts[i // group]
            direct.append(rm(torch.tensor([conversation(tok, prompt, c)]))[0, -1].item())
            text = tok.decode(c[:-1] if c and c[-1] in (tok.im_end_id, tok.eot_id) else c)
            messages = [{"role": "user", "content": batches.split.refs[docs[i // group]]["prompt"]},
                        {"role": "assistant", "content": text}]
            ids = tok.render_chat(messages)[0]
            if ids[: len(prompt)] == prompt:  # (else the reply's first characters merge with the header's newline)
                reply = ids[len(prompt): -2]
                assert conversation(tok, prompt, reply) == conversation(tok, prompt, reply + [tok.im_end_id]) == ids
                rendered += 1
    assert rendered >= 1
    batch, sums = grpo.rollout(run, batches, 0, group)
    assert sums["rm_scored"] == len(direct) and sums["rm_score"] == pytest.approx(sum(direct), abs=1e-4)
    assert sums["answered"] == 0  # no references: no accuracy
    step = train.train_step(run, 0)
    assert step["rm_score"] == pytest.approx(sum(direct) / len(direct), abs=1e-5) and step["accuracy"] is None
    assert step["completion_len"] == pytest.approx(sum(map(len, completions)) / len(completions))
    assert not any(p is q for p in run.optimizer.param_groups[0]["params"] for q in
                   run.reward.reward_models[rm_run].model.parameters())  # never in the optimizer
    assert all(not p.requires_grad for p in run.reward.reward_models[rm_run].model.parameters())


@pytest.mark.slow
def test_grpo_with_a_reward_model_resumes_exactly_and_two_ranks_equal_one(prompts_only, rm_run, lm_run, tmp_path):
    args = ["--max_iters=4", "--eval_interval=2", "--learning_rate=1e-2", "--gradient_accumulation_steps=2",
            "--device=cpu", "--log_interval=1"]
    reward = f"rm:{rm_run}"
    ref, killed, two = (str(tmp_path / n) for n in ("ref", "killed", "two"))
    run_train(grpo_rm_args(prompts_only, ref, reward, lm_run, *args))
    rows = [r for r in metrics(ref) if "rm_score" in r]
    assert len(rows) == 4 and all("completion_len" in r and "accuracy" not in r for r in rows)
    assert "val_rm_score" in [r for r in metrics(ref) if "val_loss" in r][-1]
    sigkill_after_checkpoint(grpo_rm_args(prompts_only, killed, reward, lm_run, *args), 2)
    state = load_checkpoint(os.path.join(killed, "ckpt.pt"))
    assert state["frozen"]["reward_models"][os.path.abspath(rm_run)]["path"] == os.path.abspath(rm_run)
    run_train(grpo_rm_args(prompts_only, killed, reward, "resume", *args))
    assert train_losses(killed) == train_losses(ref)
    assert [r["rm_score"] for r in metrics(killed) if "rm_score" in r] == [r["rm_score"] for r in rows]
    run_train(grpo_rm_args(prompts_only, two, reward, lm_run, *args), nproc=2, timeout=300)
    l1, l2 = train_losses(ref), train_losses(two)
    assert sorted(l1) == sorted(l2) and all(abs(l1[i] - l2[i]) <= 1e-5 for i in l1), (l1, l2)
    assert [r["rm_score"] for r in metrics(two) if "rm_score" in r] == pytest.approx([r["rm_score"] for r in rows],
                                                                                   abs=1e-5)


@pytest.mark.slow
def test_a_resumed_grpo_run_whose_reward_model_changed_is_refused(prompts_only, rm_run, lm_run, tmp_path):
    rm = str(tmp_path / "rm")
    shutil.copytree(rm_run, rm)
    out = str(tmp_path / "grpo")
    args = ["--max_iters=1", "--eval_interval=1", "--eval_iters=1"]
    run_train(grpo_rm_args(prompts_only, out, f"rm:{rm}", lm_run, *args))
    state = load_checkpoint(os.path.join(rm, "ckpt.pt"))
    state["model"]["score.weight"] = state["model"]["score.weight"] * 2
    save_checkpoint(rm, state)
    p = run_train(grpo_rm_args(prompts_only, out, f"rm:{rm}", "resume", "--max_iters=2", "--eval_interval=1",
                               "--eval_iters=1"), check=False)
    line = one_line_exit_2(p)
    assert f"the reward model rm:{rm}" in line and "has changed since" in line


# -----------------------------------------------------------------------------
# bad input: one line, exit 2, before any work


@pytest.mark.slow
def test_bad_reward_models_are_one_clear_line(prompts_only, rm_run, lm_run, data_tok_dir, tmp_path):
    other = str(tmp_path / "other_vocab")  # the reward model with another tokenizer's files
    shutil.copytree(rm_run, other)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(os.path.join(data_tok_dir, name), os.path.join(other, name))
    cases = {f"rm:{other}": "tokens) is not the one", f"rm:{tmp_path / 'nothing'}": "holds no model",
             f"rm:{lm_run}": "is a language model, not a reward model",
             "exact_answer + 0.1 * think_format": "exact_answer reads reference answers, and 200 prompts"}
    for reward, message in cases.items():
        p = run_train(grpo_rm_args(prompts_only, str(tmp_path / "run"), reward, lm_run, "--max_iters=1"), check=False)
        assert message in one_line_exit_2(p), (reward, p.stderr)


@pytest.mark.slow
def test_a_reward_model_where_a_language_model_is_expected_is_one_clear_line(rm_run, demo_sft, tmp_path):
    commands = [[sys.executable, "sample.py", f"--out_dir={rm_run}", "--prompt=hi"],
                [sys.executable, "serve.py", f"--out_dir={rm_run}", "--port=8765"],
                [sys.executable, "eval.py", f"--out_dir={rm_run}", "--tasks=demo_add", "--include_path=data/lm_eval"],
                [sys.executable, "train.py", f"--data_dir={demo_sft}", f"--out_dir={tmp_path / 'sft'}", "--stage=sft",
                 f"--init_from={rm_run}", *SMALL]]
    for cmd in commands:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert f"{rm_run} is a reward model" in one_line_exit_2(p), cmd
    p = subprocess.run([sys.executable, "export.py", f"--out_dir={rm_run}", f"--gguf={tmp_path / 'x.gguf'}"],
                       cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert "is a reward model" in p.stderr and p.returncode == 2


@pytest.mark.slow
def test_a_preference_file_with_one_side_empty(demo_pretrain, tmp_path):
    """A pair whose reply is empty is skipped and counted with its line (strict: the run stops there); a file of
    such pairs has no usable record: one line, exit 2."""
    good = {"prompt": "1 + 2 = ?", "chosen": "3", "rejected": "4"}
    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in [good, {**good, "rejected": ""}, good]), encoding="utf-8")
    meta = prepare.main([f"--input={src}", f"--out_dir={tmp_path / 'a'}", f"--tokenizer={demo_pretrain}",
                         "--stage=rm", "--val_fraction=0", "--workers=1"])
    assert meta["counts"]["kept"] == 2 and meta["counts"]["skipped"] == {"empty_content": 1}
    assert meta["counts"]["skipped_examples"]["empty_content"] == [f"{src}:2"]
    for extra, where in (["--strict=True"], f"{src}:2: empty_content"), ([], "no usable record in the input"):
        if not extra:
            src.write_text(json.dumps({**good, "chosen": " "}) + "\n", encoding="utf-8")
        p = subprocess.run([sys.executable, "prepare.py", f"--input={src}", f"--out_dir={tmp_path / 'b'}",
                            f"--tokenizer={demo_pretrain}", "--stage=rm", "--workers=1", *extra], cwd=ROOT,
                           capture_output=True, text=True)
        assert where in one_line_exit_2(p)
