"""
Checkpoints: ours (out_dir/ckpt.pt) and HuggingFace Llama directories, shared by
train.py, sample.py, export.py and bench.py; and what a training run saves in
them and starts from.

Our checkpoint is a plain dict of tensors, numbers and strings, written to a
temporary file, fsynced and renamed over ckpt.pt, so a crash at any moment
leaves either the old or the new checkpoint, never a torn one. It is loaded with
torch.load(weights_only=True) and HF weights with safetensors only: a checkpoint
from the internet cannot run code.
"""

import glob
import hashlib
import json
import os
import pickle
import re
import shutil
import sys
from dataclasses import dataclass
from typing import Optional

import torch

from llm_trainer.core import distributed
from llm_trainer.core import files
from llm_trainer.core.files import sha256_file
from configurator import fail
from model import ModelConfig, Transformer, for_head, from_hf_state_dict, lora_trained, merge_lora

CKPT_NAME = "ckpt.pt"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def save_checkpoint(out_dir, state, keep_last=0):
    """Atomically write state to out_dir/ckpt.pt; keep the previous `keep_last` as ckpt_<iter>.pt.

    Any failure before the rename (disk full, unwritable directory) removes the temporary file and
    raises OSError with a clear message; ckpt.pt is then the previous checkpoint, untouched."""
    path = os.path.join(out_dir, CKPT_NAME)
    tmp = path + ".tmp"
    try:
        files.write_synced(tmp, lambda f: torch.save(state, f))
        if keep_last > 0 and os.path.exists(path):
            older = os.path.join(out_dir, f"ckpt_{_saved(path, 'iter') or 0:08d}.pt")
            if not os.path.exists(older):
                os.link(path, older)  # a second name for the old file: ckpt.pt is never missing
    except (OSError, RuntimeError) as e:
        if os.path.isfile(tmp):
            os.remove(tmp)
        cause = _os_error_behind(e)
        raise OSError(f"could not write checkpoint {path} ({cause}); the previous checkpoint is unchanged") from e
    files.replace_durably(tmp, path)
    # only this run's older checkpoints rotate: a file of another run (a run id of its own) is not ours to remove
    ours = [p for p in glob.glob(os.path.join(out_dir, "ckpt_*.pt")) if _saved(p, "run_id") == state.get("run_id")]
    for stale in sorted(ours)[:-keep_last or None]:
        os.remove(stale)


def _os_error_behind(error):
    """The OSError (disk full, permission denied) behind an error: torch.save reports a failed write of its
    file object as a RuntimeError about zip positions, with the OSError as its context."""
    e = error
    while e is not None and not isinstance(e, OSError):
        e = e.__context__
    return e or error


def _saved(path, key):
    """One entry of a saved checkpoint (its iter, its run_id), or None when the file holds none or cannot be read."""
    try:  # mmap: read it without loading the tensors
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True).get(key)
    except Exception:
        return None


def checkpoint_files(out_dir):
    """The checkpoints in out_dir: ckpt.pt and the older ckpt_<iter>.pt (a torn ckpt.pt.tmp is no checkpoint)."""
    return sorted(glob.glob(os.path.join(out_dir, CKPT_NAME)) + glob.glob(os.path.join(out_dir, "ckpt_*.pt")))


def check_out_dir(out_dir, overwrite, init_from):
    """A run that does not resume writes into out_dir: refuse one that holds another run's checkpoints (their
    rotation, or a resume after ckpt.pt is damaged, would mix the two runs), unless overwrite; and refuse to
    overwrite the checkpoints the run starts from. Nothing is deleted here (clear_out_dir, once the run is built)."""
    found = checkpoint_files(out_dir)
    if found and not overwrite:
        last = _saved(os.path.join(out_dir, CKPT_NAME), "iter")
        fail(f"out_dir {out_dir} holds the checkpoints of another run ({len(found)} file(s)"
             f"{f', ckpt.pt at iteration {last}' if last is not None else ''}): resume it with --init_from=resume, "
             "choose another out_dir, or delete them with --overwrite=True")
    if found and os.path.isdir(init_from) and os.path.samefile(init_from, out_dir):
        fail(f"init_from={init_from!r} is the out_dir whose checkpoints --overwrite=True would delete: write the new "
             "run into another out_dir")


def clear_out_dir(out_dir):
    """Delete the checkpoints check_out_dir allowed to overwrite: only once the new run has passed every check and
    loaded what it starts from, so a refused run deletes nothing."""
    for path in checkpoint_files(out_dir):
        os.remove(path)


class UnreadableCheckpoint(Exception):
    """A file that is not a checkpoint this project can load safely; str() is a one-line reason."""


def _read_checkpoint(path):
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnreadableCheckpoint(
            f"refusing to load {path}: it is not a plain checkpoint of tensors, numbers and strings "
            f"({_unpickling_reason(e)}); unpickling it fully could run arbitrary code") from None
    except Exception as e:  # torn zip, empty file, not a torch file at all: torch raises many kinds
        reason = f"{type(e).__name__}: {str(e).splitlines()[0]}" if str(e).strip() else type(e).__name__
        raise UnreadableCheckpoint(f"cannot read checkpoint {path} (torn, empty or not a PyTorch file): {reason}") from None
    if not isinstance(state, dict) or "model" not in state or "model_config" not in state:
        raise UnreadableCheckpoint(f"{path} is not a checkpoint of this project (a dict with model and model_config)")
    return state


def _unpickling_reason(error):
    """The line of torch's weights_only error that says what was refused (not its advice to disable the check)."""
    lines = [line.strip() for line in str(error).splitlines()]
    for line in lines:
        if "GLOBAL" in line or line.startswith("Unsupported"):
            return line.split("WeightsUnpickler error: ")[-1]
    return next((line for line in lines if line), "unsupported content")


def load_checkpoint(path):
    """Load a checkpoint dict with weights_only=True; refuse anything that would need arbitrary unpickling."""
    try:
        return _read_checkpoint(path)
    except UnreadableCheckpoint as e:
        fail(str(e))


def resume_checkpoint_path(out_dir):
    """ckpt.pt, or the newest readable ckpt_<iter>.pt beside it; None when there is none at all.

    When checkpoints exist but none can be read, fail rather than start again from scratch: that
    would overwrite them."""
    candidates = [os.path.join(out_dir, CKPT_NAME)]
    candidates += sorted(glob.glob(os.path.join(out_dir, "ckpt_*.pt")), reverse=True)
    errors = []
    for path in candidates:
        if os.path.exists(path):
            try:
                _read_checkpoint(path)
                return path
            except UnreadableCheckpoint as e:
                print(f"warning: skipping {e}", file=sys.stderr, flush=True)
                errors.append(str(e))
    if errors:
        fail(f"no readable checkpoint in {out_dir} to resume from ({len(errors)} unreadable; first: {errors[0]})")
    return None


# ----------------------------------------------------------------------------
# HuggingFace Llama directories: LlamaForCausalLM, and LlamaForSequenceClassification with one label (a reward
# model: model.py's head "score", HF's name for it too)


def is_hf_dir(path):
    return os.path.isfile(os.path.join(path, "config.json")) and bool(glob.glob(os.path.join(path, "*.safetensors")))


def model_config_from_hf(hf):
    """A ModelConfig from a transformers config.json dict (Llama architecture only)."""
    arch = hf.get("model_type")
    if arch != "llama":
        fail(f"only Llama-architecture models can be imported; config.json says model_type={arch!r}")
    classifier = any(a.endswith("ForSequenceClassification") for a in hf.get("architectures") or [])
    labels = len(hf["id2label"]) if hf.get("id2label") else hf.get("num_labels", 2)  # transformers' default: 2
    if classifier and labels != 1:
        fail(f"config.json is a sequence classifier with {labels} labels; a reward model has one (num_labels=1)")
    if hf.get("attention_bias") or hf.get("mlp_bias") or hf.get("hidden_act", "silu") != "silu":
        fail("this Llama variant uses biases or a non-SiLU activation, which model.py does not implement")
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = rope.get("rope_type", rope.get("type", "default"))
    max_len = hf.get("max_position_embeddings", 2048)
    scaling = None
    if kind in ("linear", "dynamic", "yarn"):
        original = rope.get("original_max_position_embeddings", max_len)
        scaling = {"type": kind, "factor": float(rope["factor"]), "original_max_seq_len": int(original)}
        for key in ("beta_fast", "beta_slow", "attention_factor"):
            if rope.get(key) is not None:
                scaling[key] = rope[key]
    elif kind != "default":
        fail(f"RoPE type {kind!r} in config.json is not supported (default, linear, dynamic, yarn are)")
    return ModelConfig(
        vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"], n_kv_heads=hf.get("num_key_value_heads"), head_dim=hf.get("head_dim"),
        ffn_dim=hf["intermediate_size"], max_seq_len=max_len, rope_theta=float(theta), rope_scaling=scaling,
        norm_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        head="score" if classifier else "lm",
    )


def hf_model_config(path):
    """The ModelConfig of the HF directory `path` (its config.json)."""
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        return model_config_from_hf(json.load(f))


def hf_config_dict(mcfg: ModelConfig, bos_id=None, eos_id=None, pad_id=None, dtype="float32"):
    """config.json for LlamaForCausalLM (a reward model: LlamaForSequenceClassification with one label, whose
    pad_token_id tells it where each sequence ends): rope_theta and rope_parameters both, so transformers 4.x and 5.x
    agree."""
    rope = {"rope_type": "default", "rope_theta": mcfg.rope_theta}
    max_len = mcfg.max_seq_len
    if mcfg.rope_scaling:
        s = mcfg.rope_scaling
        rope = {"rope_type": s["type"], "factor": float(s["factor"]), "rope_theta": mcfg.rope_theta}
        if s["type"] == "yarn":
            rope["original_max_position_embeddings"] = mcfg.rope_original_len
            rope.update({k: s[k] for k in ("beta_fast", "beta_slow", "attention_factor") if k in s})
        if s["type"] == "dynamic":
            max_len = mcfg.rope_original_len  # transformers' dynamic NTK scales beyond max_position_embeddings
    score = {"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}} if mcfg.head == "score" else {}
    return {
        "architectures": ["LlamaForSequenceClassification" if score else "LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": mcfg.vocab_size, "hidden_size": mcfg.dim, "intermediate_size": mcfg.ffn_dim,
        "num_hidden_layers": mcfg.n_layers, "num_attention_heads": mcfg.n_heads,
        "num_key_value_heads": mcfg.n_kv_heads, "head_dim": mcfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": max_len, "rms_norm_eps": mcfg.norm_eps,
        "rope_theta": mcfg.rope_theta, "rope_parameters": rope,
        "rope_scaling": rope if mcfg.rope_scaling else None,
        "tie_word_embeddings": mcfg.tie_embeddings and not score, "attention_bias": False, "mlp_bias": False,
        "attention_dropout": 0.0, "initializer_range": mcfg.init_std,
        "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id,
        "torch_dtype": dtype, "dtype": dtype, "use_cache": True, **score,
    }


def load_hf_weights(path):
    from safetensors.torch import load_file

    state = {}
    for f in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        state.update(load_file(f))
    return {re.sub(r"^(model\.)?(?=layers|embed_tokens|norm)", "model.", k): v.float() for k, v in state.items()}


# ----------------------------------------------------------------------------
# one entry point for "give me the model in this directory"


def load_model(path, device="cpu", head=None):
    """(model in fp32 eval mode, info) from a run dir (ckpt.pt) or an HF Llama dir (safetensors); head: "lm" or
    "score" refuses a model with the other head (model.HEADS) in one line.

    info: {"kind": "run"|"hf", "stage": str|None, "iter": int|None, "config": train config or {}}.
    """
    if not os.path.isdir(path):
        fail(f"model directory {path} does not exist")
    ckpt = os.path.join(path, CKPT_NAME)
    if os.path.isfile(ckpt):
        state = load_checkpoint(ckpt)
        mcfg = ModelConfig(**state["model_config"])
        model = Transformer(mcfg)
        model.load_state_dict(with_lora_base(state)["model"])
        if mcfg.lora_rank:  # generation and export want plain weights: the adapters merged
            model = merge_lora(model)
        info = {"kind": "run", "stage": state.get("stage"), "iter": state.get("iter"),
                "config": state.get("config", {}), "lora_base": state.get("lora_base")}
    elif is_hf_dir(path):
        mcfg = hf_model_config(path)
        model = Transformer(mcfg)
        weights = load_hf_weights(path)
        if mcfg.tie_embeddings:
            weights.pop("lm_head.weight", None)
        missing, unexpected = model.load_state_dict(from_hf_state_dict(weights, mcfg), strict=False)
        if missing or unexpected:
            fail(f"{path}: weights do not match config.json (missing {missing[:3]}, unexpected {unexpected[:3]})")
        info = {"kind": "hf", "stage": None, "iter": None, "config": {}, "lora_base": None}
    elif glob.glob(os.path.join(path, "*.bin")) or glob.glob(os.path.join(path, "*.pth")):
        fail(f"{path} holds pickled weights (*.bin/*.pth) but no *.safetensors: they are not loaded, since "
             f"unpickling can run code; convert them to safetensors with a tool you trust")
    else:
        fail(f"{path} holds neither {CKPT_NAME} nor an HF model (config.json + *.safetensors)")
    check_head(model.mcfg, path, head)
    return model.to(device).eval(), info


def check_head(mcfg, path, head):
    """Refuse a reward model where a language model is asked for (head "lm"), and the other way round."""
    if head == "lm" and mcfg.head == "score":
        fail(f"{path} is a reward model (stage rm: a score head, no language-model head): it scores conversations, "
             "it is no language model to generate text with, score as one or continue training as one; give a "
             "language model's run or HF directory")
    if head == "score" and mcfg.head == "lm":
        fail(f"{path} is a language model, not a reward model: train one with stage=rm (or give an HF "
             "LlamaForSequenceClassification directory with one label)")


# ----------------------------------------------------------------------------
# LoRA runs: their checkpoint holds the adapters, and names the base they adapt


def weights_sha256(path):
    """The identity of the weights in a model directory: the sha256 of its ckpt.pt, or of its *.safetensors."""
    files = [os.path.join(path, CKPT_NAME)] if os.path.isfile(os.path.join(path, CKPT_NAME)) else sorted(
        glob.glob(os.path.join(path, "*.safetensors")))
    return sha256_file(files[0]) if len(files) == 1 else ":".join(sha256_file(f) for f in files)


def weights_source(init_from, seed):
    """What a run records of weights it keeps frozen beside the ones it trains (the base of a LoRA run, the
    reference of DPO and of GRPO's KL, and so any frozen second model: a teacher, a reward model), so that a
    resumed run rebuilds them as they were: the directory and the sha256 of its weights; for init_from=scratch,
    the seed of the initialisation."""
    if init_from == "scratch":
        return {"path": "scratch", "seed": seed}
    return {"path": os.path.abspath(init_from), "sha256": weights_sha256(init_from)}


def check_source(source, what):
    """Refuse the weights a run records (weights_source) when they are gone or have changed since; what names
    them in the line, e.g. "the base of this LoRA run"."""
    if not os.path.isdir(source["path"]):
        fail(f"{what}, {source['path']}, is not there any more: restore it to go on with this run")
    if weights_sha256(source["path"]) != source["sha256"]:
        fail(f"{what}, {source['path']}, has changed since this run started from it (sha256 of its weights): "
             "restore it to go on with this run, or train again")


def frozen_weights(source, mcfg, what):
    """The state dict of the weights a source records (weights_source), checked: how a resumed run rebuilds a
    frozen model; mcfg: the shape of one initialised from scratch."""
    if source["path"] == "scratch":
        torch.manual_seed(source["seed"])  # as train.build initialises a model from scratch
        return Transformer(mcfg).state_dict()
    check_source(source, what)
    return starting_weights(source["path"]).model


def holds_model(path):
    """Whether a directory holds a model load_model reads: a run (ckpt.pt) or an HF Llama directory."""
    return os.path.isfile(os.path.join(path, CKPT_NAME)) or is_hf_dir(path)


def frozen_model(path, what, device, dtype, head="lm", recorded=None):
    """(a frozen second model kept beside the one trained: a distillation teacher, a reward model; its weights_source
    for the checkpoints): the model in a run or HF directory (a LoRA run merged), in eval mode, without gradients (so
    never in the optimizer), its parameters in dtype (its buffers, the rotary tables, stay float32). head: the head it
    must have (check_head). recorded: the source a resumed run saved for it, refused when its weights are gone or have
    changed since (check_source). What names it in those lines, e.g. "the reward model rm:out/rm"."""
    if recorded is not None:
        check_source(recorded, what)
    if not (os.path.isdir(path) and holds_model(path)):
        fail(f"{what}: {path} holds no model ({CKPT_NAME} of a run, or config.json + *.safetensors)")
    model, _ = load_model(path, device, head)
    for p in model.parameters():
        p.data = p.data.to(dtype)
    return model.eval().requires_grad_(False), weights_source(path, None)


def lora_base(path):
    """What a LoRA run records of its base: the directory and the sha256 of its weights."""
    return weights_source(path, None)


def check_lora_base(base):
    check_source(base, "the base of this LoRA run")


def with_lora_base(state):
    """A checkpoint's state with its full model weights: a LoRA checkpoint holds only its adapters, so the base
    it names is loaded and checked (a base changed since is refused)."""
    base = state.get("lora_base")
    if not base:
        return state
    check_lora_base(base)
    model, _ = load_model(base["path"])
    weights = for_head(model.state_dict(), ModelConfig(**state["model_config"]))
    return {**state, "model": {**weights, **state["model"]}}


# ----------------------------------------------------------------------------
# a training run: what it saves, and what it starts from


def save_run(run, it):
    """Save a training run at iteration `it` (train.Run); a collective: every rank calls it, rank 0 writes."""
    model_sd, optim_sd = distributed.full_state_dicts(run.model, run.optimizer)

    def write():
        if run.rank != 0:
            return
        saved = {k: v for k, v in model_sd.items() if lora_trained(k) or not run.lora_base}  # LoRA: the base is named
        state = {"model": {k: v.float() for k, v in saved.items()}, "optimizer": optim_sd,
                 "scaler": run.scaler.state_dict(), "model_config": run.raw_model.mcfg.to_dict(),
                 "iter": it, "best_val_loss": run.best_val_loss, "config": run.cfg, "stage": run.cfg["stage"],
                 "data": run.data_identity, "lora_base": run.lora_base, "frozen": run.frozen, "run_id": run.run_id}
        try:
            save_checkpoint(run.cfg["out_dir"], state, run.cfg["keep_last"])
        except OSError as e:
            fail(str(e))
        print(f"saved checkpoint at iter {it} to {os.path.join(run.cfg['out_dir'], CKPT_NAME)}", flush=True)

    distributed.together(write, run.rank, run.world, "the checkpoint write")


@dataclass
class Start:
    """What a run starts from (load_start): the weights, their shape (ModelConfig.to_dict), the data identity and
    the stage they were trained on ({} and None for HF weights); saved: for init_from=resume, the checkpoint that
    goes on (iter, optimizer, scaler, config, frozen, run_id, lora_base, best_val_loss), else None."""

    model: dict
    model_config: dict
    data: dict
    stage: Optional[str] = None
    saved: Optional[dict] = None

    @property
    def resumed(self):
        return self.saved is not None


def load_start(cfg):
    """What a run starts from: None (scratch, or resume with no checkpoint yet), else a Start."""
    src = cfg["init_from"]
    if src == "scratch":
        return None
    if src == "resume":
        path = resume_checkpoint_path(cfg["out_dir"])
        if path is None:
            print(f"init_from=resume: no checkpoint in {cfg['out_dir']} yet, starting from scratch")
            return None
        state = with_lora_base(load_checkpoint(path))
        return Start(state["model"], state["model_config"], state.get("data", {}), state.get("stage"), saved=state)
    return starting_weights(src)


def starting_weights(src):
    """The Start of the weights in a run directory (a LoRA run's adapters merged into its base) or an HF Llama
    directory: what a run starting from src starts from."""
    if os.path.isfile(os.path.join(src, CKPT_NAME)):
        state = load_checkpoint(os.path.join(src, CKPT_NAME))
        if state.get("lora_base"):  # a LoRA run continued: its base with the adapters merged
            model, _ = load_model(src)
            state = {**state, "model": model.state_dict(), "model_config": model.mcfg.to_dict()}
        return Start(state["model"], state["model_config"], state.get("data", {}), state.get("stage"))
    if os.path.isdir(src) and is_hf_dir(src):
        model, _ = load_model(src)
        return Start(model.state_dict(), model.mcfg.to_dict(), {})
    fail(f"init_from={src!r}: expected scratch, resume, a run directory with ckpt.pt, or an HF Llama directory")


def model_config(cfg, meta, start, lora_targets=(), head="lm"):
    """The model's shape: from the checkpoint being continued, else from the config; adapters from the config; the
    head the stage trains (model.HEADS)."""
    lora = {"lora_rank": cfg["lora_rank"], "lora_alpha": cfg["lora_alpha"], "lora_dropout": cfg["lora_dropout"],
            "lora_targets": tuple(lora_targets) if cfg["lora_rank"] else (), "head": head}
    if start is not None:
        mcfg = ModelConfig(**{**start.model_config, "max_seq_len": cfg["block_size"], "dropout": cfg["dropout"],
                              **lora})
        if cfg["rope_scaling"] is not None:
            mcfg.rope_scaling = dict(cfg["rope_scaling"])
        return ModelConfig(**mcfg.to_dict())
    return ModelConfig(
        vocab_size=cfg["vocab_size"] or meta["vocab_size"], dim=cfg["dim"], n_layers=cfg["n_layers"],
        n_heads=cfg["n_heads"], n_kv_heads=cfg["n_kv_heads"] or None, ffn_dim=cfg["ffn_dim"] or None,
        max_seq_len=cfg["block_size"], rope_theta=cfg["rope_theta"], rope_scaling=cfg["rope_scaling"],
        norm_eps=cfg["norm_eps"], tie_embeddings=cfg["tie_embeddings"], dropout=cfg["dropout"], **lora,
    )


def data_identity(cfg, meta):
    """What a checkpoint remembers of the data it was trained on; shards_sha256, the digest of every shard's
    checksum (meta.json), changes when the data is prepared again differently."""
    shards = hashlib.sha256(json.dumps(meta["splits"], sort_keys=True).encode()).hexdigest()
    return {"data_dir": os.path.abspath(cfg["data_dir"]), "tokenizer_sha256": meta.get("tokenizer_sha256"),
            "vocab_size": meta["vocab_size"], "shards_sha256": shards}


def check_data_identity(cfg, meta, start):
    """A checkpoint continued on data from another tokenizer would train on garbage: refuse it."""
    if start is None or not start.data:
        return
    theirs, ours = start.data.get("tokenizer_sha256"), meta.get("tokenizer_sha256")
    if theirs and ours and theirs != ours:
        fail(f"{cfg['data_dir']} was tokenized with a different tokenizer than the checkpoint in "
             f"{cfg['init_from'] if cfg['init_from'] != 'resume' else cfg['out_dir']} was trained with")


def copy_tokenizer(data_dir, out_dir):
    """A run directory is self-contained: sample.py and export.py need only it."""
    for name in TOKENIZER_FILES:
        src = os.path.join(data_dir, name)
        if os.path.exists(src):
            shutil.copyfile(src, os.path.join(out_dir, name))
