"""What the test files share (fixtures are in conftest.py): the tiny model, train.py run as a user runs it (a
subprocess, torchrun) or in this process, what a run directory records, a hand-made run directory, and texts."""

import contextlib
import glob
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import prepare
from llm_trainer.core import checkpoint
from llm_trainer.data import shards
from llm_trainer.data.tokenizer import train_tokenizer
from llm_trainer.inference.generation import complete_prompt_ids, generate_text
from model import ModelConfig, Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "data", "demo")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}  # a subprocess's: one thread, unbuffered
TINY = ["--dim=64", "--n_layers=2", "--n_heads=4", "--n_kv_heads=2", "--block_size=64", "--batch_size=4",
        "--warmup_iters=2", "--eval_iters=2", "--log_interval=1", "--verify_data=True"]
# bench.py at its smallest: a tiny model on a few random batches
BENCH_SMALL = ["--device=cpu", "--model=tiny", "--dim=32", "--n_layers=2", "--n_heads=4", "--n_kv_heads=2",
               "--vocab_size=256", "--block_size=32", "--batch_size=2", "--gradient_accumulation_steps=2",
               "--warmup_steps=1", "--steps=1", "--rounds=2", "--data_batches=2", "--decode_tokens=4",
               "--prepare_mb=0.05", "--threads=1"]

# -----------------------------------------------------------------------------
# train.py: in a subprocess or under torchrun (where the process is what is tested), or in this process


def run_train(args, cwd=ROOT, nproc=1, check=True, **kwargs):
    """`python train.py args`, or torchrun with nproc ranks: the CompletedProcess."""
    cmd = [sys.executable, "train.py", *args]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "train.py", *args]
    env = {**kwargs.pop("env", os.environ), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, **kwargs)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def train_in_process(args, check=True, env=None):
    """train.main(args) in this process, a CompletedProcess as run_train's: returncode (0, or the code it exits
    with), stdout, stderr. Bit for bit what run_train gives (one thread, as run_train's OMP_NUM_THREADS=1), about 3 s
    sooner (no interpreter and torch to start). env: variables set for the run (TRAIN_FAULTS); they and the thread
    count are put back (train.py puts back the signal handlers it installs)."""
    import train

    threads, saved_env = torch.get_num_threads(), dict(os.environ)
    out, err, code = io.StringIO(), io.StringIO(), 0
    try:
        os.environ.update(env or {})
        torch.set_num_threads(1)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                train.main([str(a) for a in args])
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else int(e.code is not None)
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        torch.set_num_threads(threads)
    p = subprocess.CompletedProcess(["train.py", *args], code, out.getvalue(), err.getvalue())
    if check and code != 0:
        raise AssertionError(f"train.main({args}) exited {code}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def two_ranks_equal_one_process(args, tmp_path, keys=("loss",), fsdp=True, tol=1e-5):
    """args (no out_dir) trained in this process ("one"), under torchrun with 2 ranks ("ddp") and, with fsdp, 2 ranks
    under FSDP2 ("fsdp"): every 2-rank run logs the steps 1..max_iters as one process does, each step's keys and
    every val_loss within tol of one process's. Returns the run directories by name and the one-process run's
    CompletedProcess, for a test's own checks on top (weights, grad norms, ...)."""
    dirs = {name: str(tmp_path / name) for name in ("one", "ddp", "fsdp")[: 3 if fsdp else 2]}
    one = train_in_process([*args, f"--out_dir={dirs['one']}"])
    for name, extra in (("ddp", []), ("fsdp", ["--fsdp=True"]))[: len(dirs) - 1]:
        run_train([*args, f"--out_dir={dirs[name]}", *extra], nproc=2, timeout=300)
    max_iters = int([a for a in args if a.startswith("--max_iters=")][-1].split("=", 1)[1])
    want = [r for r in metrics(dirs["one"]) if "loss" in r]
    assert [r["iter"] for r in want] == list(range(1, max_iters + 1)) and val_losses(dirs["one"])
    for name in list(dirs)[1:]:
        got = [r for r in metrics(dirs[name]) if "loss" in r]
        assert [r["iter"] for r in got] == [r["iter"] for r in want], name
        for a, b in zip(want, got):
            for k in keys:
                assert abs(a[k] - b[k]) <= tol, (name, a["iter"], k, a[k], b[k])
        assert val_losses(dirs[name]) == pytest.approx(val_losses(dirs["one"]), abs=tol), name
    return dirs, one


def build_run(data_dir, out_dir, **overrides):
    """train.build of a one-layer sft run (other keys as overrides): a Run to step and evaluate by hand."""
    import train

    return train.build(train.configure([f"--{k}={v}" for k, v in {
        "data_dir": data_dir, "out_dir": out_dir, "stage": "sft", "dim": 32, "n_layers": 1, "n_heads": 2,
        "block_size": 96, "warmup_iters": 0, "grad_clip": 0.0, "verify_data": False, **overrides}.items()]))


def spawn(cmd, **kwargs):
    """cmd started in the repository root, one thread, its stdout and stderr merged in a pipe."""
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **kwargs)


def torchrun(args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *args]


def wait_for(proc, prefix, count=1):
    """Read proc's output up to its count-th line starting with prefix; return what was read."""
    seen, lines = 0, []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(prefix):
            seen += 1
            if seen == count:
                return "".join(lines)
    raise AssertionError(f"the process ended (rc {proc.wait()}) before {prefix!r} x{count}:\n{''.join(lines)[-3000:]}")


def sigkill_after_checkpoint(args, it):
    """Run train.py with args and SIGKILL it once it has saved its checkpoint at iteration it."""
    p = spawn([sys.executable, "train.py", *args])
    lines = []
    for line in p.stdout:
        lines.append(line)
        if f"saved checkpoint at iter {it}" in line:
            p.send_signal(signal.SIGKILL)
            break
    p.wait()
    assert p.returncode == -signal.SIGKILL, "".join(lines)[-3000:]
    out = [a for a in args if a.startswith("--out_dir=")][-1].split("=", 1)[1]
    assert checkpoint.load_checkpoint(os.path.join(out, "ckpt.pt"))["iter"] == it


# -----------------------------------------------------------------------------
# what a run directory records

TIMING_KEYS = {"tokens_per_s", "target_tokens_per_s", "dt_ms", "mem_mb", "mfu", "gen_s"}


def metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def train_losses(out_dir):
    return {r["iter"]: r["loss"] for r in metrics(out_dir) if "loss" in r and not r.get("skipped")}


def grad_norms(out_dir):
    return {r["iter"]: r["grad_norm"] for r in metrics(out_dir) if "grad_norm" in r}


def val_losses(out_dir):
    return [r["val_loss"] for r in metrics(out_dir) if "val_loss" in r]


def records(out_dir):
    """metrics.jsonl as {(iter, "train"|"eval"): record without timing fields}."""
    return {(r["iter"], "eval" if "val_loss" in r else "train"): {k: v for k, v in r.items() if k not in TIMING_KEYS}
            for r in metrics(out_dir)}


def state_of(out_dir):
    return checkpoint.load_checkpoint(os.path.join(out_dir, "ckpt.pt"))


def final_weights(out_dir):
    return state_of(out_dir)["model"]


def assert_same_state(a, b):
    """Model weights and optimizer moments bit for bit."""
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for key in sa:
        for name, t in sa[key].items():
            assert torch.equal(torch.as_tensor(t), torch.as_tensor(sb[key][name])), (key, name)


def all_checkpoints_load(out_dir):
    """Every ckpt*.pt of out_dir loads; returns {file name: iter}."""
    found = {}
    for path in glob.glob(os.path.join(out_dir, "ckpt*.pt")):
        found[os.path.basename(path)] = checkpoint.load_checkpoint(path)["iter"]  # fails (exit 2) if unreadable
    return found


# -----------------------------------------------------------------------------
# a run directory made by hand (no train.py, no prepared data), and generation as sample.py does it


def demo_lines(n=300):
    """A few hundred short lines of the demo corpus: English, Chinese, chat replies."""
    lines = []
    for name in ("pretrain.jsonl", "sft_train.jsonl"):
        with open(os.path.join(DEMO, name), encoding="utf-8") as f:
            for _, line in zip(range(n // 2), f):
                record = json.loads(line)
                if "text" in record:
                    lines.append(record["text"])
                else:
                    lines.extend(m["content"] for m in record["conversations"])
    return lines


def make_run_dir(path, stage="sft", tie_embeddings=True, n_kv_heads=2, steps=30, seed=0):
    """A run directory as train.py writes it, from a few AdamW steps on a tiny model (weights off their init)."""
    torch.manual_seed(seed)
    lines = demo_lines()
    tok = train_tokenizer(lines, 400)
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads,
                      max_seq_len=256, rope_theta=5e5, tie_embeddings=tie_embeddings)
    model = Transformer(cfg)
    stream = []
    for line in lines:
        stream += tok.encode(line) + [tok.eot_id]
    data = torch.tensor(stream[: 8 * 65]).view(8, 65)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        logits = model(data[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), data[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    os.makedirs(path, exist_ok=True)
    checkpoint.save_checkpoint(str(path), {
        "model": model.state_dict(), "model_config": cfg.to_dict(), "stage": stage, "iter": steps,
        "config": {"block_size": 256, "stage": stage}, "optimizer": opt.state_dict(),
    })
    tok.save(str(path))
    return str(path)


def chat_run_dir(path, tok, rows, steps, batch=16, lr=3e-3, context=1024, seed=0):
    """A run directory (an sft run) whose tiny model was trained `steps` AdamW steps on chat rows (ids, loss mask: as
    tok.render_chat gives them), `batch` rows drawn at random a step, the loss on the masked tokens only."""
    torch.manual_seed(seed)
    width = max(len(ids) for ids, _ in rows) + 1
    ids = torch.tensor([r + [tok.eot_id] * (width - len(r)) for r, _ in rows])
    mask = torch.tensor([m + [0] * (width - len(m)) for _, m in rows])
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=context)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    order = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        b = torch.randint(0, len(rows), (batch,), generator=order)
        loss = (model(ids[b, :-1], targets=ids[b, 1:]) * mask[b, 1:]).sum() / mask[b, 1:].sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    os.makedirs(path, exist_ok=True)
    checkpoint.save_checkpoint(str(path), {"model": model.state_dict(), "model_config": cfg.to_dict(), "stage": "sft",
                                           "iter": steps, "config": {"block_size": context, "stage": "sft"}})
    tok.save(str(path))
    return str(path)


def complete(model, tokenizer, text, **sampling):
    """The continuation of plain text (without the text itself), as sample.py's complete mode prints it; keywords as
    generation.generate_text."""
    return generate_text(model, tokenizer, complete_prompt_ids(tokenizer, text), (tokenizer.eot_id,), **sampling)


# -----------------------------------------------------------------------------
# texts

HARD_TEXTS = [
    "你好，世界！“引号”‘单引’；冒号：问号？（括号）【方括号】《书名号》……——、。",
    "emoji 🙂🚀 skin 👍🏽 family 👨\u200d👩\u200d👧 flag 🇨🇳",
    "   leading spaces, trailing spaces   ",
    "\n\nnewlines\r\nand\ttabs\n\n\n",
    "ｆｕｌｌ　ｗｉｄｔｈ　ＡＢＣ　１２３ and NBSP\u00a0here and ﬁ ligature",
    "<|im_end|> typed by a user, <think> too, and <|endoftext|>",
    "",
]

TOY_REWARD = '''
def share_of_a(prompt, completion, reference):
    """The share of the completion's characters that are the letter a: an easy, dense reward."""
    return completion.count("a") / max(len(completion), 1)
'''


# -----------------------------------------------------------------------------
# prepare.py in this process, and a SentencePiece model to load


def write_jsonl(path, records):
    """Write records (dicts/lists as JSON; bytes as they are) one per line."""
    with open(path, "wb") as f:
        for r in records:
            f.write((r if isinstance(r, bytes) else json.dumps(r, ensure_ascii=False).encode()) + b"\n")
    return path


def run_prepare(out_dir, **config):
    """prepare.main() with --key=value arguments; one worker unless asked."""
    config = {"out_dir": out_dir, "workers": 1, **config}
    return prepare.main([f"--{k}={v}" for k, v in config.items()])


def documents(out_dir, split="train"):
    s = shards.open_split(out_dir, split, verify=True)
    return [tuple(a.tolist() for a in s.document(i)) for i in range(s.num_docs)]


def train_sentencepiece(tmp_path, model_type, corpus):
    """A SentencePiece model (vocab 500, byte fallback) trained on corpus, saved as tmp_path/sp.model."""
    spm = pytest.importorskip("sentencepiece")
    (tmp_path / "corpus.txt").write_text("\n".join(corpus * 30), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "sp"),
                                   vocab_size=500, model_type=model_type, byte_fallback=True,
                                   hard_vocab_limit=False, minloglevel=2)
    return spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))


# -----------------------------------------------------------------------------
# serve.py on 127.0.0.1, and its chat page in a headless browser


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """serve.py in a subprocess on 127.0.0.1, up once /health answers."""

    def __init__(self, run_dir, *args):
        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "serve.py", f"--out_dir={run_dir}", f"--port={self.port}",
                                      "--device=cpu", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.close()
        raise AssertionError(f"serve.py did not come up:\n{self.proc.communicate()[0][-3000:]}")

    def client(self, key="unused"):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)

    def close(self):
        self.proc.terminate()
        self.proc.wait(timeout=20)


def chromium():
    """(browser, driver) executables of the system's Chromium, or None."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def say(driver, text):
    """Type a message, send it, wait for its reply to end; the reply's box."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    turns = len(driver.find_elements(By.CSS_SELECTOR, ".assistant"))
    driver.execute_script("document.getElementById('input').value = arguments[0];", text)
    driver.find_element(By.ID, "send").click()
    return WebDriverWait(driver, 60).until(
        lambda d: len(d.find_elements(By.CSS_SELECTOR, ".assistant")) == turns + 1 and
        d.find_element(By.ID, "send").is_enabled() and d.find_elements(By.CSS_SELECTOR, ".assistant")[-1])


def test_the_chat_page_streams_a_reply_in_a_real_browser(page, tmp_path):
    from selenium.webdriver.common.by import By

    box = say(page, "你好，你是谁？")
    assert box.find_element(By.CSS_SELECTOR, ".answer").text.strip()
    assert page.find_element(By.CSS_SELECTOR, ".user").text == "你好，你是谁？"
    page.save_screenshot(str(tmp_path / "chat_page.png"))
    assert (tmp_path / "chat_page.png").stat().st_size > 1000


def test_the_chat_page_trims_its_history_and_keeps_no_failed_turn(page):
    from selenium.webdriver.common.by import By

    box = say(page, "很长的问题 " * 150)  # alone more than the context: refused, and not kept
    assert box.find_elements(By.CSS_SELECTOR, ".error")
    for i in range(6):  # the conversation outgrows the context of 256 tokens
        box = say(page, f"Question {i}: tell me about the sea, the stars and the night. 请详细说明大海和星星。")
        assert not box.find_elements(By.CSS_SELECTOR, ".error"), box.text
    notes = page.find_elements(By.CSS_SELECTOR, ".note")
    assert notes and "no longer fit the model's context of 256 tokens" in notes[-1].text
