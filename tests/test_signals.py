"""Signal handlers do not leak: train.main() in-process gives back the caller's, and prepare.py's worker pool ends
whatever its parent does with SIGTERM (a forked worker inherits the parent's Python handlers)."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_train_in_process_gives_back_the_signal_handlers(demo_pretrain, tmp_path):
    def mine(signum, frame):
        pass

    before = {sig: signal.signal(sig, mine) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        train.main([f"--data_dir={demo_pretrain}", f"--out_dir={tmp_path / 'run'}", "--max_iters=1",
                    "--eval_interval=1", "--eval_iters=1", "--dim=32", "--n_layers=1", "--n_heads=2",
                    "--block_size=32", "--batch_size=2", "--optimizer=adamw", "--compile=False"])
        assert signal.getsignal(signal.SIGTERM) is mine and signal.getsignal(signal.SIGINT) is mine
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


@pytest.mark.slow
def test_prepare_workers_end_when_the_parent_ignores_sigterm(demo_pretrain, tmp_path):
    """A parent whose SIGTERM handler does not exit (train.py's, say) runs prepare.py with two workers: it ends."""
    lines = [f'{{"text": "record {i} of a file split into several chunks, one a worker"}}\n' for i in range(300)]
    (tmp_path / "in.jsonl").write_text("".join(lines), encoding="utf-8")
    script = textwrap.dedent(f"""
        import signal
        import prepare
        signal.signal(signal.SIGTERM, lambda signum, frame: None)
        prepare._CHUNK_BYTES = 2000  # several chunks, so that the pool is used
        for i in range(20):  # the pool's end races its workers' last reads: several runs
            meta = prepare.main(["--input={tmp_path / 'in.jsonl'}", f"--out_dir={tmp_path / 'data'}{{i}}",
                                 "--tokenizer={demo_pretrain}", "--workers=2", "--val_fraction=0"])
            assert meta["timing"]["workers"] == 2, meta["timing"]
        print("kept", meta["counts"]["kept"])
    """)
    p = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "kept 300" in p.stdout
