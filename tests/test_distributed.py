"""Distributed runs never hang: every rank runs the same collectives (FSDP evaluation with any eval_iters), a stuck
run fails with one clear line within its timeout, and two nodes on one machine equal one process, also after the
second node is SIGKILLed and the run resumed."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import train
from llm_trainer.core.checkpoint import load_checkpoint
from tests.helpers import ENV, ROOT, TINY, final_weights, metrics, run_train, train_in_process, train_losses, val_losses

pytestmark = pytest.mark.slow  # every test here starts torchrun

STALL = {**ENV, "TRAIN_FAULTS": '{"stall": [1, 5]}'}  # rank 1 stalls in the step from iteration 5 (train.py)
COLLECTIVE_FAILED = "a collective did not complete during"


def pretrain_args(data, out, *extra):
    return [f"--data_dir={data}", f"--out_dir={out}", "--device=cpu", "--gradient_accumulation_steps=2", *TINY,
            *extra]


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_evaluation_with_fewer_batches_than_ranks_equals_one_process(fsdp, demo_pretrain, tmp_path):
    """eval_iters not a multiple of the ranks, or fewer than them, hung FSDP: ranks ran different numbers of
    forwards, each an all-gather. Now the last round is padded with a batch that is not counted. Here fewer than the
    ranks (eval_iters 1: rank 1 only pads); not a multiple (3: a full round, then a padded one) in
    test_two_nodes_equal_one_process, a multiple (2) in tests/test_train.py::test_torchrun_two_ranks_equal_one_process,
    each under DDP and FSDP."""
    args = pretrain_args(demo_pretrain, str(tmp_path / "two"), "--max_iters=1", "--eval_interval=1", "--eval_iters=1")
    run_train([*args, f"--fsdp={fsdp}"], nproc=2, timeout=120)
    # the same run in this process (its own out_dir: the other holds a run): evaluate, one step, evaluate
    one = train.build(train.configure([*args, f"--out_dir={tmp_path / 'one'}"]))
    before = train.evaluate(one)["val_loss"]
    train.train_step(one, 0)
    assert val_losses(str(tmp_path / "two")) == pytest.approx([before, train.evaluate(one)["val_loss"]], abs=1e-6)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_nodes(args, port, env=ENV):
    """Two torchrun agents on this machine, one process each, meeting at 127.0.0.1:port (c10d rendezvous),
    as on two nodes; node 0 hosts the rendezvous. Each in its own process group, so a node can be killed whole."""
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
               f"--rdzv-conf=is_host={'true' if node == 0 else 'false'}", "train.py", *args]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, start_new_session=True))
    return procs


def finish(procs, timeout=180):
    out = [p.communicate(timeout=timeout)[0] for p in procs]
    return [p.returncode for p in procs], out


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_nodes_equal_one_process(fsdp, demo_pretrain, tmp_path):
    args = ["--max_iters=4", "--eval_interval=2", "--eval_iters=3"]
    one, nodes = str(tmp_path / "one"), str(tmp_path / "nodes")
    train_in_process(pretrain_args(demo_pretrain, one, *args))
    codes, out = finish(start_nodes(pretrain_args(demo_pretrain, nodes, *args, f"--fsdp={fsdp}"), free_port()))
    assert codes == [0, 0], out
    l1, l2 = train_losses(one), train_losses(nodes)
    assert sorted(l1) == sorted(l2) == [1, 2, 3, 4]
    assert all(abs(l1[i] - l2[i]) <= 1e-5 for i in l1), (l1, l2)
    assert val_losses(nodes) == pytest.approx(val_losses(one), abs=1e-6)
    for k, v in final_weights(one).items():
        assert torch.allclose(v, final_weights(nodes)[k], atol=1e-5), k


def test_second_node_sigkilled_resumes_to_the_uninterrupted_result(demo_pretrain, tmp_path):
    args = ["--max_iters=8", "--eval_interval=2", "--eval_iters=3", "--dropout=0.1", "--dist_timeout_s=60"]
    ref, out = str(tmp_path / "ref"), str(tmp_path / "killed")
    codes, logs = finish(start_nodes(pretrain_args(demo_pretrain, ref, *args), free_port()))
    assert codes == [0, 0], logs
    # rank 1 stalls in the step from iteration 5 (fault injection): the kill lands while rank 0 waits for it there
    node0, node1 = start_nodes(pretrain_args(demo_pretrain, out, *args), free_port(), env=STALL)
    seen = []
    for line in node0.stdout:  # node 0 holds rank 0, which writes the checkpoints
        seen.append(line)
        if line.startswith("saved checkpoint at iter 4"):
            time.sleep(1)
            for pid in (worker_pid(node1, 1), node1.pid):  # the whole second node: its worker and its agent
                os.kill(pid, signal.SIGKILL)
            break
    rest = node0.communicate(timeout=120)[0]
    node1.wait(timeout=30)
    assert node0.returncode != 0 and COLLECTIVE_FAILED in rest, "".join(seen) + rest
    assert load_checkpoint(os.path.join(out, "ckpt.pt"))["iter"] == 4  # the last good checkpoint, intact
    codes, logs = finish(start_nodes(pretrain_args(demo_pretrain, out, *args, "--init_from=resume"), free_port()))
    assert codes == [0, 0], logs
    want, got = train_losses(ref), train_losses(out)
    assert sorted(got) == sorted(want) and all(got[i] == want[i] for i in want)  # bit for bit
    assert val_losses(out) == val_losses(ref)
    for k, v in final_weights(ref).items():
        assert torch.equal(v, final_weights(out)[k]), k


def worker_pid(agent, rank):
    """The pid of the torchrun worker of `rank` started by the agent process `agent`."""
    for _ in range(200):
        children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(agent.pid)], capture_output=True,
                                  text=True).stdout.split()
        for pid in children:
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    if f"RANK={rank}".encode() in f.read().split(b"\0"):
                        return int(pid)
            except OSError:
                continue
        time.sleep(0.05)
    raise AssertionError("no worker found")


def test_a_stalled_rank_ends_the_run_with_a_clear_line_within_the_timeout(demo_pretrain, tmp_path):
    """Rank 1 stalls in the step from iteration 5 (fault injection); rank 0 waits in the step's first collective. It
    is sent SIGTERM there, which Python cannot act on inside a collective: the timeout still ends it, with one
    line naming the rank and the phase, exit 3, the checkpoint of iteration 4 intact."""
    timeout_s = 8
    out = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           *pretrain_args(demo_pretrain, out, "--max_iters=8", "--eval_interval=4", "--fsdp=True",
                          f"--dist_timeout_s={timeout_s}")]
    agent = subprocess.Popen(cmd, cwd=ROOT, env=STALL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    rank0 = worker_pid(agent, 0)
    seen = []
    for line in agent.stdout:
        seen.append(line)
        if line.startswith("saved checkpoint at iter 4"):
            break
    time.sleep(1)  # rank 0 is now waiting for rank 1 in step 5
    os.kill(rank0, signal.SIGTERM)
    sent = time.time()
    rest = agent.communicate(timeout=120)[0]
    lines = [line for line in rest.splitlines() if line.startswith("error: rank 0 of 2")]
    assert len(lines) == 1 and COLLECTIVE_FAILED + " the training step from iteration 5 to 6" in lines[0], "".join(seen) + rest
    assert f"dist_timeout_s={timeout_s}" in lines[0] and "--init_from=resume" in lines[0]
    assert "exitcode  : 3" in rest and agent.returncode != 0
    assert time.time() - sent < timeout_s + 20  # bounded: the timeout, not forever
    assert load_checkpoint(os.path.join(out, "ckpt.pt"))["iter"] == 4
    assert max(r["iter"] for r in metrics(out)) == 5  # nothing of the stalled step was logged


def test_a_failed_checkpoint_write_stops_every_rank(demo_pretrain, tmp_path):
    """Rank 0 cannot write the checkpoint (a directory where its temporary file goes): every rank stops with exit
    2 at once, none waits for rank 0 in the next collective."""
    out = tmp_path / "run"
    (out / "ckpt.pt.tmp").mkdir(parents=True)
    t0 = time.time()
    p = run_train(pretrain_args(demo_pretrain, str(out), "--max_iters=4", "--eval_interval=2",
                                "--dist_timeout_s=300"), nproc=2, check=False, timeout=120)
    assert p.returncode != 0 and "could not write checkpoint" in p.stderr, p.stderr
    assert "rank 1: the checkpoint write failed on another rank" in p.stderr
    assert time.time() - t0 < 100  # nobody waited for the 300 s timeout
