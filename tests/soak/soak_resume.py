"""
On-demand soak test of crash recovery (not collected by pytest: it takes minutes).

    python tests/soak/soak_resume.py                      # 20 SIGKILLs of one process, then 6 torchrun interruptions
    python tests/soak/soak_resume.py --kills=50 --seed=7 --torchrun_interruptions=0

1. One training run (tiny model, checkpoint_interval=1, dropout on) is SIGKILLed `kills` times at seeded random
   moments, about half of them inside a checkpoint write, each time resumed with init_from=resume. After every
   kill every ckpt*.pt must load; at the end the per-iteration losses, learning rates, grad norms and val losses
   in metrics.jsonl, the weights and the optimizer state must equal an uninterrupted run's bit for bit.
   Then the same for a DPO run (`dpo_kills`) and a GRPO run with a KL (`grpo_kills`), both started from the
   first run's weights: their reference must be those starting weights after every resume.
2. The same under torchrun (2 ranks, gloo), interrupted in turn by SIGTERM to the agent, SIGTERM to rank 1
   only, SIGKILL of the whole process group, and SIGKILL of rank 1 only (the agent then stops rank 0).

Exit status 0 when every check held; the first failed check raises. tests/test_reliability.py runs the short
version of 1 (5 kills) and one SIGTERM of 2 in the normal suite.
"""

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from llm_trainer.core import checkpoint  # noqa: E402
import configurator  # noqa: E402
import demo  # noqa: E402
import prepare  # noqa: E402
from tests.helpers import (TINY, TOY_REWARD, all_checkpoints_load, assert_same_state, records, run_train,  # noqa: E402
                           spawn, state_of, torchrun, wait_for)

# -----------------------------------------------------------------------------
kills = 20  # SIGKILLs of the single-process run
max_iters = 150
dpo_kills = 8  # SIGKILLs of a DPO run from the first run's weights (0: skip)
dpo_max_iters = 40
grpo_kills = 5  # SIGKILLs of a GRPO run with grpo_kl > 0 from the first run's weights (0: skip)
grpo_max_iters = 24
torchrun_interruptions = 6  # 0: skip the torchrun part
torchrun_max_iters = 30
seed = 0
work_dir = ""  # "" : a temporary directory, removed at the end when every check held
# -----------------------------------------------------------------------------
_DEFAULTS = configurator.defaults(globals())


def log(message):
    print(f"[soak {time.strftime('%H:%M:%S')}] {message}", flush=True)


def prepared_demo(work):
    data = os.path.join(work, "data")
    if not os.path.exists(os.path.join(data, "meta.json")):
        prepare.main([f"--input={ROOT}/data/demo/pretrain.jsonl", f"--out_dir={data}", "--tokenizer=train",
                      "--vocab_size=1024", "--val_fraction=0.05", "--workers=1"])
    return data


def check_after_interruption(out, what):
    saved = all_checkpoints_load(out)
    assert checkpoint.resume_checkpoint_path(out) == (os.path.join(out, "ckpt.pt") if saved else None), saved
    assert not saved or saved["ckpt.pt"] == max(saved.values()), saved
    torn = os.path.exists(os.path.join(out, "ckpt.pt.tmp"))
    log(f"{what}: checkpoints {sorted(saved.values())}{', killed inside a write' if torn else ''}")
    return torn


def killed_and_resumed(name, args, work, rng, kills):
    """Run args uninterrupted, then SIGKILLed `kills` times and resumed, and check both end the same; returns the
    uninterrupted run's directory."""
    ref, out = os.path.join(work, f"{name}_ref"), os.path.join(work, name)
    run_train([*args, f"--out_dir={ref}"])
    torn = 0
    for k in range(kills):
        # the first launch (and any before a first checkpoint) starts from args' init_from, the others resume
        resume = ["--init_from=resume"] if checkpoint.resume_checkpoint_path(out) else []
        proc = spawn([sys.executable, "train.py", *args, f"--out_dir={out}", *resume, "--checkpoint_interval=1",
                      "--keep_last=2"])
        if k % 2:
            wait_for(proc, "train iter", rng.randint(1, 4))
            time.sleep(rng.uniform(0, 0.004))
        else:
            wait_for(proc, "train iter")
            time.sleep(rng.uniform(0, 0.4))
        proc.kill()
        proc.communicate()
        assert proc.returncode == -signal.SIGKILL, f"{name}: kill {k} came after the run had finished: raise max_iters"
        torn += check_after_interruption(out, f"{name}: kill {k + 1}/{kills}")
    run_train([*args, f"--out_dir={out}", "--init_from=resume"])
    want, got = records(ref), records(out)
    assert got.keys() == want.keys() and all(got[k] == want[k] for k in want), f"{name}: metrics differ"
    assert_same_state(state_of(ref), state_of(out))
    log(f"{name}: {kills} kills ({torn} inside a checkpoint write), resumed bit for bit")
    return ref


def single_process(data, work, rng):
    args = [f"--data_dir={data}", f"--max_iters={max_iters}", "--eval_interval=25", "--dropout=0.1", *TINY]
    return killed_and_resumed("pretrain", args, work, rng, kills)


def post_training(data, start, work, rng):
    """A DPO run and a GRPO run with a KL, from `start`: a resume must rebuild their reference from it."""
    if dpo_kills:
        dpo = os.path.join(work, "data_dpo")
        if not os.path.exists(os.path.join(dpo, "meta.json")):
            prepare.main([f"--input={ROOT}/data/demo/dpo_train.jsonl", f"--val_input={ROOT}/data/demo/dpo_val.jsonl",
                          f"--out_dir={dpo}", f"--tokenizer={data}", "--max_len=64", "--workers=1"])
        args = [f"--data_dir={dpo}", "--stage=dpo", f"--init_from={start}", f"--max_iters={dpo_max_iters}",
                "--eval_interval=10", "--learning_rate=3e-3", *TINY]
        killed_and_resumed("dpo", args, work, rng, dpo_kills)
    if grpo_kills:
        grpo = os.path.join(work, "data_grpo")
        if not os.path.exists(os.path.join(grpo, "meta.json")):
            prompts = demo.count_prompts(work)
            prepare.main([f"--input={prompts}/count_train.jsonl", f"--val_input={prompts}/count_val.jsonl",
                          f"--out_dir={grpo}", f"--tokenizer={data}", "--max_len=56", "--stage=grpo", "--workers=1"])
        reward = os.path.join(work, "reward_a.py")
        with open(reward, "w", encoding="utf-8") as f:
            f.write(TOY_REWARD)  # dense, so that the policy moves off its reference
        args = [f"--data_dir={grpo}", "--stage=grpo", f"--init_from={start}", f"--max_iters={grpo_max_iters}",
                "--eval_interval=8", "--learning_rate=1e-2", f"--reward={reward}:share_of_a", "--grpo_kl=0.1",
                "--grpo_group=4", "--max_new_tokens=8", *TINY]
        killed_and_resumed("grpo", args, work, rng, grpo_kills)


def _children(pid):
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return found


def _rank_of(pid):
    with open(f"/proc/{pid}/environ", "rb") as f:
        env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
    return int(env.get(b"RANK", b"-1"))


def distributed(data, work, rng):
    args = [f"--data_dir={data}", f"--max_iters={torchrun_max_iters}", "--eval_interval=10", "--device=cpu",
            "--gradient_accumulation_steps=2", "--dropout=0.1", *TINY]
    ref, out = os.path.join(work, "ddp_ref"), os.path.join(work, "ddp")
    run_train([*args, f"--out_dir={ref}"], nproc=2)
    ways = ["SIGTERM to the agent", "SIGTERM to rank 1", "SIGKILL to every process", "SIGKILL to rank 1"]
    for k in range(torchrun_interruptions):
        way = ways[k % len(ways)]
        proc = spawn(torchrun([*args, f"--out_dir={out}", "--init_from=resume", "--checkpoint_interval=1"]))
        wait_for(proc, "train iter", rng.randint(1, 3))
        time.sleep(rng.uniform(0, 0.2))
        workers = {_rank_of(p): p for p in _children(proc.pid)}
        if way == "SIGTERM to the agent":
            proc.send_signal(signal.SIGTERM)
        elif way == "SIGTERM to rank 1":
            os.kill(workers[1], signal.SIGTERM)
        elif way == "SIGKILL to every process":  # one by one: torchrun puts its workers in sessions of their own
            for pid in [proc.pid, *workers.values()]:
                os.kill(pid, signal.SIGKILL)
        else:
            os.kill(workers[1], signal.SIGKILL)
        rest = proc.communicate(timeout=300)[0]
        if way.startswith("SIGTERM"):  # a graceful stop: both ranks stop after the same step, which is saved
            assert rest.count("stopped by signal") == 2, rest[-3000:]
            assert way == "SIGTERM to the agent" or proc.returncode == 0, (proc.returncode, rest[-3000:])
        check_after_interruption(out, f"torchrun {k + 1}/{torchrun_interruptions}, {way} (rc {proc.returncode})")
    run_train([*args, f"--out_dir={out}", "--init_from=resume"], nproc=2)
    assert records(out) == records(ref), "torchrun metrics differ"
    assert_same_state(state_of(ref), state_of(out))
    log(f"torchrun: {torchrun_interruptions} interruptions, resumed bit for bit")


def main():
    globals().update(configurator.configure(_DEFAULTS))  # the functions above read the settings as globals
    work = work_dir or tempfile.mkdtemp(prefix="soak_resume_")
    os.makedirs(work, exist_ok=True)
    rng = random.Random(seed)
    log(f"working in {work}, seed {seed}")
    data = prepared_demo(work)
    start = single_process(data, work, rng)
    post_training(data, start, work, rng)
    if torchrun_interruptions:
        distributed(data, work, rng)
    if not work_dir:
        shutil.rmtree(work)
    log("all checks held")


if __name__ == "__main__":
    try:
        main()
    except subprocess.TimeoutExpired as e:
        sys.exit(f"timed out: {e}")
