"""bench.py: it runs end to end and reports every figure; its MFU is a hand count; presets give the right shape."""

import json
import os

import pytest
import torch

import bench
import configurator
from model import ModelConfig, Transformer
from tests.helpers import BENCH_SMALL as SMALL, ROOT


@pytest.fixture(autouse=True)
def keep_threads():
    """bench.py --threads sets torch's thread count for the process: give the next tests theirs back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_runs_end_to_end_and_writes_every_figure(tmp_path, capsys):
    pytest.importorskip("transformers")
    path = tmp_path / "bench.json"
    bench.main(SMALL + ["--compare_hf=True", f"--json={path}"])
    record = json.loads(path.read_text())
    fig = record["figures"]
    assert list(fig) == bench.FIGURE_KEYS
    not_on_cpu = {"train.peak_tflops", "train.ours.mfu", "train.hf.mfu", "train.ours.peak_mem_mb",
                  "train.hf.peak_mem_mb"}
    assert [k for k, v in fig.items() if v is None] == [k for k in bench.FIGURE_KEYS if k in not_on_cpu]
    assert fig["train.tokens_per_step"] == 2 * 32 * 2
    step_s = fig["train.ours.step_ms"] / 1000
    assert fig["train.ours.tokens_per_s"] == pytest.approx(fig["train.tokens_per_step"] / step_s)
    assert fig["train.ours_over_hf"] == pytest.approx(fig["train.ours.tokens_per_s"] / fig["train.hf.tokens_per_s"])
    assert fig["decode.ours_over_hf"] == pytest.approx(fig["decode.ours.tokens_per_s"] / fig["decode.hf.tokens_per_s"])
    assert fig["train.ours_over_hf_paired"] > 0
    # the baseline is the same function with the same weights
    assert fig["train.hf_max_logit_diff"] < 1e-4 and fig["decode.same_tokens"] is True
    assert record["device"] and record["torch"] and record["date"]
    assert record["command"].startswith("python bench.py --device=cpu")
    assert record["config"]["dim"] == 32 and record["config"]["compare_hf"] is True
    out = capsys.readouterr().out
    assert "ours/HF" in out and "MFU = flops_per_token" in out and "prepare.py" in out


def test_without_hf_the_baseline_figures_are_null(tmp_path):
    path = tmp_path / "bench.json"
    bench.main(SMALL + ["--rounds=1", "--data_batches=0", "--decode_tokens=0", "--prepare_mb=0", f"--json={path}"])
    fig = json.loads(path.read_text())["figures"]
    assert fig["train.ours.tokens_per_s"] > 0
    assert all(fig[k] is None for k in bench.FIGURE_KEYS if ".hf" in k or "over_hf" in k)
    assert fig["data.load_ms_per_batch"] is None and fig["prepare.mb_per_s"] is None


@pytest.mark.parametrize("tied", [True, False])
def test_mfu_is_a_hand_count(tied):
    # dim 32, 2 layers, 4 heads of 8 (2 kv heads), ffn 64, vocab 100, sequence 16
    model = Transformer(ModelConfig(vocab_size=100, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                                    tie_embeddings=tied))
    per_layer = 32 * (32 + 2 * 16) + 32 * 32 + 32 * 2 * 64 + 64 * 32  # qkv, o, gate_up, down
    n = 2 * per_layer + 100 * 32  # + the output head; not the embedding lookup, not the norms
    per_token = 6 * n + 12 * 2 * 4 * 8 * 16
    assert per_token == 142_080
    fig = bench.step_figures(model, block_size=16, tokens_per_step=64, step_seconds=0.5, peak=2.0)
    assert fig["tokens_per_s"] == 128
    assert fig["step_ms"] == 500
    assert fig["mfu"] == pytest.approx(per_token * 64 / 0.5 / 2e12)
    assert bench.step_figures(model, 16, 64, 0.5, None)["mfu"] is None


def test_presets_give_the_shape_and_later_keys_win():
    c = bench.configure(["--model=26m"])
    assert (c["dim"], c["n_layers"], c["n_heads"], c["n_kv_heads"], c["vocab_size"]) == (512, 8, 8, 2, 6400)
    assert bench.configure(["--n_layers=2", "--model=26m"])["n_layers"] == 2
    c = bench.configure([os.path.join(ROOT, "config", "bench_124m.py"), "--batch_size=2"])
    assert (c["dim"], c["n_layers"], c["ffn_dim"], c["vocab_size"], c["block_size"], c["batch_size"]) == \
        (768, 12, 2048, 50304, 1024, 2)
    with pytest.raises(configurator.ConfigError):
        bench.configure(["--model=7b"])
    with pytest.raises(configurator.ConfigError):
        bench.configure(["--model=", "--vocab_size=0"])


def test_sft_mode_compares_packed_with_padded_rows(tmp_path):
    path = tmp_path / "bench.json"
    bench.main(SMALL + ["--sft=True", "--sft_docs=200", "--block_size=64", "--rounds=2", f"--json={path}"])
    fig = json.loads(path.read_text())["figures"]
    assert list(fig) == bench.SFT_KEYS and all(v is not None for v in fig.values())
    assert fig["sft.packed.fill"] > 0.9 > 0.5 > fig["sft.padded.fill"]  # mean length a third of the block
    assert fig["sft.packed_over_padded"] == pytest.approx(
        fig["sft.packed.target_tokens_per_s"] / fig["sft.padded.target_tokens_per_s"])
    assert 15 < fig["sft.mean_length"] < 30 and fig["sft.truncated"] > 0  # long-tailed: some are cut


@pytest.mark.slow  # serve.py in a subprocess
def test_serve_mode_measures_tokens_and_time_to_first_token_and_checks_a_load(made_run, tmp_path):
    run = made_run("sft")
    path = tmp_path / "bench.json"
    bench.main(["--serve=True", f"--serve_run={run}", "--device=cpu", "--serve_clients=[1, 3]", "--rounds=1",
                "--serve_max_tokens=8", "--serve_load_clients=8", f"--json={path}"])
    fig = json.loads(path.read_text())["figures"]
    assert fig["serve.1.requests"] == 1 and fig["serve.3.requests"] == 3
    assert fig["serve.3.tokens_per_s"] > 0 and 0 < fig["serve.3.ttft_p50_ms"] <= fig["serve.3.ttft_p95_ms"]
    assert fig["load.clients"] == 8 and fig["load.valid_same_as_alone"] == fig["load.valid"] == 4
    assert fig["load.invalid_4xx"] == fig["load.invalid"] == 2 and fig["load.accepted_invalid"] == 0
    assert fig["load.left"] + fig["load.done_before_leaving"] == 2


def test_lora_mode_counts_what_each_run_keeps(tmp_path):
    path = tmp_path / "bench.json"
    bench.main(SMALL + ["--lora=True", "--lora_rank=2", "--rounds=1", f"--json={path}"])
    fig = json.loads(path.read_text())["figures"]
    assert list(fig) == bench.LORA_KEYS
    assert fig["lora.lora.trainable_params"] < fig["lora.full.trainable_params"] == fig["model.params"]
    assert fig["lora.lora.grads_mb"] < fig["lora.full.grads_mb"] and fig["lora.lora.optimizer_mb"] < fig[
        "lora.full.optimizer_mb"]
    assert fig["lora.full.optimizer_mb"] == pytest.approx(2 * fig["lora.full.grads_mb"], rel=1e-3)  # AdamW: 2 moments
    assert fig["lora.state_ratio"] == pytest.approx(fig["lora.lora.state_mb"] / fig["lora.full.state_mb"])
