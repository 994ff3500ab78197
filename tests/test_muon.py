"""optimizer=muon: Muon's update is its definition, only 2-D hidden matrices reach it, it resumes exactly after a
SIGKILL, 2 ranks (DDP, FSDP2) equal one process, LoRA trains with it, and bad settings are one line, exit 2."""

import json
import math
import os

import pytest
import torch

import bench
import train
from llm_trainer.core import checkpoint
from llm_trainer.training import optimizers
from llm_trainer.training.optimizers import Muon, newton_schulz
from model import ModelConfig, Transformer
from tests.helpers import (TINY, final_weights, sigkill_after_checkpoint, train_in_process, train_losses,
                           two_ranks_equal_one_process, val_losses)

A, B, C = 3.4445, -4.7750, 2.0315  # torch.optim.Muon's documented Newton-Schulz coefficients (Keller Jordan's)


def reference_orthogonalise(g, steps=5):
    """Newton-Schulz by its definition, in float64: X = G / |G|_F, wide; X <- aX + (bA + cA^2)X, A = X X^T."""
    x = g.double()
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    x = x / x.norm()
    for _ in range(steps):
        a = x @ x.T
        x = A * x + (B * a + C * a @ a) @ x
    return x.T if tall else x


def reference_muon(w, grads, lr, wd, momentum, adjust, blocks):
    """The weights after Muon's steps on grads, by its definition: the buffer is an exponential average
    (B <- mu B + (1 - mu) g, as torch.optim.Muon computes it), the Nesterov update (1 - mu) g + mu B, orthogonalised
    per block, each block's step scaled by its shape (original: sqrt(max(1, rows/cols)); match_rms_adamw:
    0.2 sqrt(max(rows, cols))), decoupled weight decay."""
    w, buf = w.double().clone(), torch.zeros_like(w, dtype=torch.float64)
    for g in grads:
        g = g.double()
        buf = momentum * buf + (1 - momentum) * g
        update = (1 - momentum) * g + momentum * buf
        steps = []
        for m in update.split(blocks):
            rows, cols = m.shape
            scale = math.sqrt(max(1, rows / cols)) if adjust == "original" else 0.2 * math.sqrt(max(rows, cols))
            steps.append(scale * reference_orthogonalise(m))
        w = w * (1 - lr * wd) - lr * torch.cat(steps)
    return w


@pytest.mark.parametrize("adjust", ["original", "match_rms_adamw"])
@pytest.mark.parametrize("blocks", [[12], [6, 3, 3]], ids=["whole", "q-k-v blocks"])
def test_update_is_its_definition(adjust, blocks):
    torch.manual_seed(0)
    w0 = torch.randn(12, 8)
    grads = [torch.randn(12, 8) for _ in range(3)]
    p = torch.nn.Parameter(w0.clone())
    opt = Muon([p], blocks={p: blocks}, lr=0.02, weight_decay=0.1, momentum=0.95, adjust_lr_fn=adjust)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    want = reference_muon(w0, grads, 0.02, 0.1, 0.95, adjust, blocks)
    assert (p.detach().double() - want).abs().max() < 1e-6
    assert (p.detach().double() - w0.double()).abs().max() > 1e-2  # it moved: the comparison is not vacuous


def test_bfloat16_iteration_is_torchs():
    """On CUDA the iteration runs in bfloat16 as torch.optim.Muon's does: the same operations, the same bits."""
    from torch.optim._muon import _zeropower_via_newtonschulz

    torch.manual_seed(0)
    for shape in ((24, 16), (16, 24)):
        g = torch.randn(shape)
        assert torch.equal(newton_schulz(g, dtype=torch.bfloat16), _zeropower_via_newtonschulz(g, (A, B, C), 5, 1e-7))


def preset_model(name, **lora):
    """The preset's model on the meta device (no memory: the 1b preset has a billion weights)."""
    b = bench.configure([f"--model={name}"])
    shape = {k: b[k] for k in ("vocab_size", "dim", "n_layers", "n_heads", "rope_theta", "tie_embeddings")}
    with torch.device("meta"):
        return Transformer(ModelConfig(n_kv_heads=b["n_kv_heads"] or None, ffn_dim=b["ffn_dim"] or None, **shape,
                                       **lora))


def muon_cfg(**keys):
    return {**train._DEFAULTS, "optimizer": "muon", **keys}


@pytest.mark.parametrize("preset", ["tiny", "26m", "124m", "500m", "1b"])
def test_only_hidden_matrices_reach_muon(preset):
    model = preset_model(preset)
    layers = range(model.mcfg.n_layers)
    groups = {name: (kind, [n for n, _ in params]) for name, kind, params in optimizers.named_groups(model, muon_cfg())}
    projections = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
    assert groups["hidden"] == ("muon", [f"model.layers.{i}.{p}.weight" for i in layers for p in projections])
    assert groups["embed"] == ("adamw", ["model.embed_tokens.weight"])  # the head too when tied: one tensor
    assert ("head" in groups) == (not model.mcfg.tie_embeddings)
    if "head" in groups:
        assert groups["head"] == ("adamw", ["lm_head.weight"])
    norms = [f"model.layers.{i}.{n}.weight" for i in layers for n in ("input_layernorm", "post_attention_layernorm")]
    assert groups["norms"] == ("adamw", norms + ["model.norm.weight"])
    params = dict(model.named_parameters())
    assert all(params[n].dim() == 2 for n in groups["hidden"][1])
    assert sum(len(ns) for _, ns in groups.values()) == len(params)  # every weight in exactly one group
    # q, k, v and gate, up: the blocks each fused matrix stacks
    blocks = optimizers.fused_blocks(model)
    attn = model.model.layers[0].self_attn
    assert blocks[attn.qkv_proj.weight] == [model.mcfg.n_heads * model.mcfg.head_dim] + 2 * [
        model.mcfg.n_kv_heads * model.mcfg.head_dim]
    assert blocks[model.model.layers[0].mlp.gate_up_proj.weight] == [model.mcfg.ffn_dim] * 2


def test_lora_adapters_train_with_adamw():
    model = preset_model("tiny", lora_rank=4, lora_targets=("q", "v", "down"))
    for n, p in model.named_parameters():
        p.requires_grad_(".lora_" in n)
    groups = optimizers.named_groups(model, muon_cfg())
    assert [(name, kind) for name, kind, _ in groups] == [("adapters", "adamw")]
    assert {n for n, _ in groups[0][2]} == {n for n, _ in model.named_parameters() if ".lora_" in n}


def test_a_hidden_weight_muon_cannot_take_is_refused(capsys):
    """A 3-D weight inside a block (experts stacked, say) is not a matrix: one line naming the key and the weight."""
    model = preset_model("tiny")
    model.model.layers[0].mlp.register_parameter("experts", torch.nn.Parameter(torch.empty(2, 4, 4, device="meta")))
    with pytest.raises(SystemExit) as e:
        optimizers.named_groups(model, muon_cfg())
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1
    assert "optimizer=muon" in err and "model.layers.0.mlp.experts" in err and "(2, 4, 4)" in err


@pytest.mark.parametrize("args, message", [
    (["--optimizer=sgd"], "optimizer must be one of adamw, muon, got 'sgd'"),
    (["--optimizer=muon", "--group_lr={'heads': 0.01}"], "group_lr: no group 'heads'"),
    (["--optimizer=muon", "--group_lr={'head': 0.01}"], "group_lr: no group 'head'"),  # tied: the head is embed
    (["--optimizer=adamw", "--group_weight_decay={'hidden': 0.0}"], "group_weight_decay: no group 'hidden'"),
    (["--optimizer=muon", "--group_lr={'embed': -1.0}"], "group_lr['embed'] must be a number > 0"),
    (["--optimizer=muon", "--muon_momentum=1.0"], "muon_momentum in [0, 1)"),
    (["--optimizer=muon", "--muon_adjust_lr=rms"], "muon_adjust_lr must be one of original, match_rms_adamw"),
])
def test_bad_optimizer_settings_are_one_line_exit_2(args, message, demo_pretrain, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        train.main([f"--data_dir={demo_pretrain}", f"--out_dir={out}", *TINY, *args])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not (out / "ckpt.pt").exists()


def test_a_checkpoint_resumed_with_the_other_optimizer_is_refused(demo_pretrain, tmp_path, capsys):
    out = str(tmp_path / "run")
    args = [f"--data_dir={demo_pretrain}", f"--out_dir={out}", *TINY, "--max_iters=1", "--eval_iters=0"]
    train.main([*args, "--optimizer=muon"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train.main([*args, "--optimizer=adamw", "--init_from=resume", "--max_iters=2"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    assert "trained with optimizer=muon, not adamw" in err and "--optimizer=muon" in err
    assert f"--init_from={out}" in err
    assert checkpoint.load_checkpoint(os.path.join(out, "ckpt.pt"))["iter"] == 1  # untouched
    train.main([*args, f"--out_dir={tmp_path / 'new'}", "--optimizer=adamw", f"--init_from={out}"])  # as it says


def test_the_plan_lists_the_groups(demo_pretrain, tmp_path, capsys):
    train.main([f"--data_dir={demo_pretrain}", f"--out_dir={tmp_path}", *TINY, "--max_iters=1", "--eval_iters=0",
                "--optimizer=muon", "--muon_lr=0.03", "--group_lr={'embed': 0.005}", "--weight_decay=0.05"])
    line = next(s for s in capsys.readouterr().out.splitlines() if s.startswith("optimizer: "))
    assert line == ("optimizer: hidden Muon lr 0.03 wd 0.05, embed AdamW lr 0.005 wd 0.05, "
                    "norms AdamW lr 0.0006 wd 0")


def muon_args(data, *extra):
    return [f"--data_dir={data}", "--device=cpu", *TINY, "--optimizer=muon", "--learning_rate=3e-3",
            "--muon_lr=0.02", *extra]


@pytest.mark.slow
def test_exact_resume_after_sigkill(demo_pretrain, tmp_path):
    """The Muon momentum buffers and AdamW moments are in the checkpoint: bit for bit as if never stopped."""
    args = muon_args(demo_pretrain, "--max_iters=16", "--eval_interval=4", "--dropout=0.1")
    ref, out = str(tmp_path / "ref"), str(tmp_path / "killed")
    train_in_process([*args, f"--out_dir={ref}"])
    sigkill_after_checkpoint([*args, f"--out_dir={out}"], 8)
    saved = checkpoint.load_checkpoint(os.path.join(out, "ckpt.pt"))["optimizer"]["state"]
    assert "momentum_buffer" in saved["model.layers.0.self_attn.qkv_proj.weight"]
    assert "exp_avg" in saved["model.embed_tokens.weight"]
    train_in_process([*args, f"--out_dir={out}", "--init_from=resume"])
    want, got = train_losses(ref), train_losses(out)
    assert sorted(got) == sorted(want) == list(range(1, 17))
    assert all(got[i] == want[i] for i in want)
    for k, v in final_weights(ref).items():
        assert torch.equal(v, final_weights(out)[k]), k
    v = val_losses(ref)
    assert v[-1] < v[0] - 0.2, v  # and it learns (6.92 -> 6.68 nats in 16 steps)


@pytest.mark.slow
def test_two_ranks_ddp_and_fsdp_equal_one_process(demo_pretrain, tmp_path):
    """FSDP2 shards every matrix by rows: Muon gathers the update, orthogonalises it whole, keeps its rows."""
    args = muon_args(demo_pretrain, "--max_iters=4", "--eval_interval=2", "--gradient_accumulation_steps=2")
    runs, _ = two_ranks_equal_one_process(args, tmp_path)
    one = runs["one"]
    torch.manual_seed(1337)  # the weights the runs started from (train.make_model)
    start = Transformer(ModelConfig(**checkpoint.load_checkpoint(os.path.join(one, "ckpt.pt"))["model_config"]))
    for run in (runs["ddp"], runs["fsdp"]):
        for k, v in final_weights(one).items():
            assert torch.allclose(v, final_weights(run)[k], atol=1e-5), (run, k)
    moved = (final_weights(one)["model.layers.0.mlp.down_proj.weight"] - start.state_dict()[
        "model.layers.0.mlp.down_proj.weight"]).abs().max()
    assert moved > 1e-3  # the weights moved by far more than the tolerance


@pytest.mark.slow
def test_a_lora_run_with_optimizer_muon(demo_pretrain, demo_sft, tmp_path):
    """The adapters train with AdamW (the optimizers module says why), the base stays frozen, the loss falls."""
    base = str(tmp_path / "base")
    train.main(muon_args(demo_pretrain, f"--out_dir={base}", "--max_iters=20", "--eval_interval=20"))
    run = train.build(train.configure([f"--data_dir={demo_sft}", f"--out_dir={tmp_path / 'lora'}", "--stage=sft",
                                       f"--init_from={base}", *TINY, "--optimizer=muon", "--lora_rank=4",
                                       "--learning_rate=1e-2", "--max_iters=12"]))
    assert [s["name"] for s in run.optimizer.specs] == ["adapters"]
    assert not any(isinstance(o, Muon) for o in run.optimizer)
    before = {n: p.detach().clone() for n, p in run.raw_model.named_parameters()}
    losses = [train.train_step(run, it)["loss"] for it in range(12)]
    assert min(losses[-3:]) < losses[0]
    for n, p in run.raw_model.named_parameters():
        assert torch.equal(p, before[n]) == (".lora_" not in n), n



def test_reach_interpolates_between_evaluations():
    curve = {"tokens": [0, 100, 200, 300], "seconds": [0.0, 1.0, 2.0, 3.0], "val_bpb": [4.0, 3.0, 2.0, 1.5]}
    assert bench.reach(curve, 2.5, "tokens") == 150
    assert bench.reach(curve, 2.0, "seconds") == 2.0
    assert bench.reach(curve, 4.5, "tokens") == 0
    assert bench.reach(curve, 1.0, "tokens") is None


@pytest.mark.slow
def test_bench_quality_reports_every_recipe_against_the_tuned_baseline(demo_pretrain, tmp_path, capsys):
    path, runs = tmp_path / "q.json", tmp_path / "runs"
    args = ["--quality=True", "--model=tiny", "--dim=32", "--n_layers=2", "--n_heads=4", "--n_kv_heads=2",
            "--vocab_size=0", f"--data_dir={demo_pretrain}", "--device=cpu", "--block_size=32", "--batch_size=4",
            "--quality_iters=6", "--quality_eval_interval=3", "--quality_eval_iters=1", "--seeds=[1, 2]",
            "--baseline_lrs=[1e-3, 1e-2]", "--train_keys={'warmup_iters': 1}", f"--quality_dir={runs}",
            "--recipes={'adamw': {'optimizer': 'adamw'}, 'muon': {'optimizer': 'muon', 'learning_rate': 1e-2}}"]
    fig = bench.main([*args, f"--json={path}"])
    out = capsys.readouterr().out
    assert out.count(" seed ") == 6  # 2 learning rates x 2 seeds of the baseline, then muon x 2 seeds: each once
    record = json.loads(path.read_text())
    assert path.with_suffix(".png").stat().st_size > 10_000  # the plot beside the JSON
    sweep = fig["quality.sweep"]
    assert fig["quality.baseline_lr"] == float(min(sweep, key=sweep.get))  # the best of the sweep
    base = fig["quality.adamw"]["seeds"]
    assert [r["token_ratio"] for r in base] == [1.0, 1.0]  # the baseline reaches its own final bpb at its end
    for row in fig["quality.muon"]["seeds"]:
        run = record["notes"]["runs"][f"muon/{row['seed']}"]
        assert run["tokens"] == [0, 384, 768] and len(run["val_bpb"]) == 3
        assert row["final_bpb"] == run["val_bpb"][-1]
        want = bench.reach(run, row["target_bpb"], "tokens")
        assert row["token_ratio"] == (768 / want if want else None)
        assert run["groups"][0]["name"] == "hidden" and run["optimizer_ms"] > 0
    bench.main(args)  # every run is in quality_dir: nothing is trained again
    assert " seed " not in capsys.readouterr().out
