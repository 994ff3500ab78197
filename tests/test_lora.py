"""LoRA for the post-training stages: only the adapters train, the checkpoint holds them and names its base,
exports merged (transformers) or as a PEFT adapter (peft), resumes exactly, and 2 ranks equal one process."""

import json
import math
import os

import pytest
import torch

import export
import train
from llm_trainer.core.checkpoint import load_checkpoint, load_model, save_checkpoint
from tests.helpers import (TINY, grad_norms, metrics, sigkill_after_checkpoint, train_in_process, train_losses,
                           two_ranks_equal_one_process, val_losses)

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def base(pretrain_run):
    """The model the adapters train on: the session's tiny pretrained run (conftest.py)."""
    return pretrain_run


def lora_args(data, out, init, *extra):
    return [f"--data_dir={data}", f"--out_dir={out}", "--stage=sft", f"--init_from={init}", *TINY, "--lora_rank=4",
            "--lora_alpha=8", "--learning_rate=1e-2", *extra]


def test_adapters_start_at_zero_and_only_they_train(base, demo_sft, tmp_path):
    run = train.build(train.configure(lora_args(demo_sft, str(tmp_path), base, "--lora_targets=q,v,gate",
                                                "--grad_clip=0.0")))
    plain, _ = load_model(base)
    batch = run.train_batches.get(0)
    with torch.no_grad():
        assert torch.equal(run.raw_model(batch.x), plain(batch.x))  # B = 0: the LoRA model is its base
    trainable = {n for n, p in run.raw_model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert {n.split(".lora_")[1].split(".")[1] for n in trainable} == {"q", "v", "gate"}  # each its own adapter
    in_optimizer = {id(p) for g in run.optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for n, p in run.raw_model.named_parameters() if n in trainable}
    before = {n: p.detach().clone() for n, p in run.raw_model.named_parameters()}
    train.train_step(run, 0)
    for n, p in run.raw_model.named_parameters():
        if n in trainable and ".lora_B" in n:
            assert not torch.equal(p, before[n]), n  # B moved off zero
        elif n not in trainable:
            assert torch.equal(p, before[n]), n  # the base is bit-identical


@pytest.fixture(scope="module")
def lora_run(base, demo_sft, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("lora_run"))
    train_in_process(lora_args(demo_sft, out, base, "--max_iters=12", "--eval_interval=12"))
    return out


def test_the_checkpoint_holds_the_adapters_and_names_its_base(lora_run, base):
    state = load_checkpoint(os.path.join(lora_run, "ckpt.pt"))
    assert state["model"] and all(".lora_" in k for k in state["model"])
    assert state["lora_base"]["path"] == os.path.abspath(base) and len(state["lora_base"]["sha256"]) == 64
    assert os.path.getsize(os.path.join(lora_run, "ckpt.pt")) < os.path.getsize(os.path.join(base, "ckpt.pt")) / 3


def yarn_lora(demo_sft, init, out):
    """LoRA at twice its base's context with YaRN: an adapter's base must compute with the run's RoPE settings."""
    scaling = {"type": "yarn", "factor": 2.0, "original_max_seq_len": 64}
    train_in_process(lora_args(demo_sft, out, init, "--max_iters=2", "--eval_interval=2", "--block_size=128",
                               f"--rope_scaling={scaling}"))
    return out


@pytest.fixture(scope="module")
def yarn_lora_run(base, demo_sft, tmp_path_factory):
    return yarn_lora(demo_sft, base, str(tmp_path_factory.mktemp("yarn_lora_run")))


@pytest.fixture(scope="module")
def yarn_lora_on_hf_run(base, demo_sft, tmp_path_factory):
    root = tmp_path_factory.mktemp("yarn_lora_on_hf_run")
    export.export(base, str(root / "hf"))
    return yarn_lora(demo_sft, str(root / "hf"), str(root / "run"))


@pytest.mark.slow
@pytest.mark.parametrize("run_name", ["lora_run", "yarn_lora_run", "yarn_lora_on_hf_run"])
def test_merged_export_and_peft_adapter_give_the_trained_model_logits(run_name, request, tmp_path):
    lora_run = request.getfixturevalue(run_name)
    state = load_checkpoint(os.path.join(lora_run, "ckpt.pt"))
    cfg = train.ModelConfig(**state["model_config"])
    trained = train.Transformer(cfg)
    base_state, _ = load_model(state["lora_base"]["path"])
    trained.load_state_dict({**base_state.state_dict(), **state["model"]})  # the LoRA model itself, not merged
    trained.eval()
    idx = torch.randint(0, cfg.vocab_size, (2, cfg.max_seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = trained(idx)
        merged_dir, adapter_dir = str(tmp_path / "merged"), str(tmp_path / "adapter")
        export.export(lora_run, merged_dir)
        hf = transformers.AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32, local_files_only=True)
        assert (hf(idx).logits - want).abs().max().item() <= 1e-5
        assert "lora" not in " ".join(os.listdir(merged_dir))  # a plain Llama directory
        export.export_adapter(lora_run, adapter_dir)
        with open(os.path.join(adapter_dir, "adapter_config.json"), encoding="utf-8") as f:
            base_dir = json.load(f)["base_model_name_or_path"]
        assert base_dir == os.path.join(adapter_dir, "base")  # a run directory, or other RoPE settings: written
        base_hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, local_files_only=True)
        assert base_hf.config.max_position_embeddings == cfg.max_seq_len
        rope = base_hf.config.rope_scaling or {}
        assert rope.get("rope_type", "default") == (cfg.rope_scaling or {}).get("type", "default")
        with_adapter = peft.PeftModel.from_pretrained(base_hf, adapter_dir, local_files_only=True).eval()
        assert (with_adapter(idx).logits - want).abs().max().item() <= 1e-5


def test_sample_loads_a_lora_run_directly(lora_run):
    from llm_trainer.inference import generation

    model, tok, info = generation.load(lora_run)
    assert info["chat"] and not any(".lora_" in k for k in model.state_dict())  # merged for generation
    assert isinstance(generation.reply(model, tok, [{"role": "user", "content": "hi"}], temperature=0.0,
                                       max_new_tokens=5), str)


@pytest.mark.slow
def test_exact_resume_after_sigkill(base, demo_sft, tmp_path):
    args = [a for a in lora_args(demo_sft, "", base, "--max_iters=12", "--eval_interval=4", "--lora_dropout=0.1")
            if a != "--out_dir="]
    ref, out = str(tmp_path / "ref"), str(tmp_path / "killed")
    train_in_process([*args, f"--out_dir={ref}"])
    sigkill_after_checkpoint([*args, f"--out_dir={out}"], 8)
    train_in_process([*args, f"--out_dir={out}", "--init_from=resume"])
    assert train_losses(out) == train_losses(ref) and val_losses(out) == val_losses(ref)
    a, b = load_checkpoint(os.path.join(ref, "ckpt.pt")), load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())


@pytest.mark.slow
def test_two_ranks_equal_one_process(base, demo_sft, tmp_path):
    """With dropout on: its masks follow the global micro-batch, not the rank."""
    args = [a for a in lora_args(demo_sft, "", base, "--max_iters=3", "--eval_interval=3",
                                 "--gradient_accumulation_steps=2", "--device=cpu", "--lora_dropout=0.1")
            if a != "--out_dir="]
    runs, _ = two_ranks_equal_one_process(args, tmp_path)
    g1 = grad_norms(runs["one"])
    for other in (runs["ddp"], runs["fsdp"]):
        assert all(abs(g1[i] - grad_norms(other)[i]) <= 1e-5 * g1[i] for i in g1), (other, g1, grad_norms(other))
    a, b = (load_checkpoint(os.path.join(runs[n], "ckpt.pt")) for n in ("one", "fsdp"))
    assert all(torch.allclose(v, b["model"][k], atol=1e-5) for k, v in a["model"].items())


@pytest.mark.slow
def test_lora_on_an_hf_directory_and_dpo_without_a_second_model(base, demo_sft, demo_dpo_small, tmp_path):
    """An HF directory made by our export stands in for a downloaded Llama; DPO's reference is the base with the
    adapters off: the loss is log 2 at step 0, where the adapters are zero."""
    hf_dir = str(tmp_path / "hf")
    export.export(base, hf_dir)
    out = str(tmp_path / "sft")
    train_in_process(lora_args(demo_sft, out, hf_dir, "--max_iters=2", "--eval_interval=2"))
    assert load_checkpoint(os.path.join(out, "ckpt.pt"))["lora_base"]["path"] == os.path.abspath(hf_dir)
    export.export_adapter(out, str(tmp_path / "adapter"))  # the same RoPE settings: the adapter names the base
    with open(tmp_path / "adapter" / "adapter_config.json", encoding="utf-8") as f:
        assert json.load(f)["base_model_name_or_path"] == os.path.abspath(hf_dir)
    assert not os.path.exists(tmp_path / "adapter" / "base")
    dpo = str(tmp_path / "dpo")
    train_in_process([f"--data_dir={demo_dpo_small}", f"--out_dir={dpo}", "--stage=dpo", f"--init_from={hf_dir}", *TINY,
                      "--lora_rank=4", "--max_iters=1", "--eval_interval=1", "--eval_iters=4"])
    rows = metrics(dpo)
    assert rows[0]["val_loss"] == pytest.approx(math.log(2), abs=1e-6)
    run = train.build(train.configure([f"--data_dir={demo_dpo_small}", f"--out_dir={tmp_path / 'x'}", "--stage=dpo",
                                       f"--init_from={hf_dir}", "--lora_rank=4", "--verify_data=False"]))
    assert run.reference.model is None and run.reference.shared is run.model  # no second model in memory


def test_a_base_that_changed_is_refused(base, demo_sft, tmp_path):
    import shutil

    copy = str(tmp_path / "base")
    shutil.copytree(base, copy)
    out = str(tmp_path / "run")
    train_in_process(lora_args(demo_sft, out, copy, "--max_iters=2", "--eval_interval=2"))
    state = load_checkpoint(os.path.join(copy, "ckpt.pt"))
    state["model"]["model.norm.weight"] = state["model"]["model.norm.weight"] * 2
    save_checkpoint(copy, state)
    p = train_in_process(lora_args(demo_sft, out, copy, "--max_iters=4", "--init_from=resume"), check=False)
    assert p.returncode == 2 and "the base of this LoRA run" in p.stderr and "has changed since" in p.stderr, p.stderr


@pytest.mark.parametrize("args, message", [
    (["--stage=pretrain", "--lora_rank=4"], "lora_rank > 0 adapts a trained model"),
    (["--lora_rank=4", "--lora_targets=attention,qkv"], "'qkv' matches no projection"),
    (["--lora_rank=-1"], "lora_rank must be >= 0"),
    (["--lora_rank=4", "--init_from=scratch"], "set init_from to a run or HF directory"),
])
def test_bad_lora_config_is_one_line_exit_2(args, message, demo_sft, base, tmp_path):
    p = train_in_process([f"--data_dir={demo_sft}", f"--out_dir={tmp_path / 'run'}", "--stage=sft",
                          f"--init_from={base}", *TINY, *args], check=False)
    assert p.returncode == 2 and message in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_grpo_with_lora_and_a_kl_to_the_base(base, toy_grpo, tmp_path):
    data, reward = toy_grpo
    out = str(tmp_path / "grpo")
    train_in_process([f"--data_dir={data}", f"--out_dir={out}", "--stage=grpo", f"--reward={reward}",
                      f"--init_from={base}", *TINY, "--lora_rank=4", "--grpo_kl=0.1", "--grpo_group=4",
                      "--max_new_tokens=8", "--max_iters=2", "--eval_interval=2", "--warmup_iters=0"])
    first = [r for r in metrics(out) if "loss" in r][0]
    assert first["kl"] == pytest.approx(0, abs=1e-7)  # the first step's policy is its base: the reference
    assert all(".lora_" in k for k in load_checkpoint(os.path.join(out, "ckpt.pt"))["model"])
