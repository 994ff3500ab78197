"""
Export a run directory to a HuggingFace transformers directory (LlamaForCausalLM).

    python export.py --out_dir=out/demo/sft --hf_dir=hf/sft
    python export.py --out_dir=out/demo/sft --hf_dir=hf/sft_bf16 --dtype=bfloat16
    python export.py --out_dir=out/lora_sft --hf_dir=hf/lora_adapter --merge=False    # a PEFT adapter

Writes config.json, generation_config.json, model.safetensors and the tokenizer
files with the chat template. No custom code: `AutoModelForCausalLM` and
`AutoTokenizer.from_pretrained(hf_dir)` load it as a plain Llama, and give the
same logits and the same greedy text as sample.py (tests/test_export.py).

A LoRA run exports merged (merge=True, the default: a plain Llama whose weights hold the adapters),
or as a PEFT adapter (merge=False): adapter_config.json + adapter_model.safetensors, which
`peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), hf_dir)` loads; base is
the HF directory the run adapted, or, for a run directory, its export written to hf_dir/base.

The reverse needs no script: `checkpoint.load_model(hf_dir)` (used by
`init_from=<hf dir>` in train.py and `--hf_dir` in sample.py) reads any Llama
directory with safetensors weights.
"""

import glob
import json
import os
import shutil

import checkpoint
import configurator
from common import DTYPES
from files import write_json
from generation import is_chat_model
from model import LORA_PLACES, to_hf_state_dict
from tokenizer import load_tokenizer

# -----------------------------------------------------------------------------
out_dir = ""  # the run directory (ckpt.pt + tokenizer files) to export
hf_dir = ""  # the directory to write
dtype = "float32"  # float32 | bfloat16 | float16: the dtype of the saved weights
merge = True  # a LoRA run: its adapters merged into plain weights (True) or a PEFT adapter directory (False)
# -----------------------------------------------------------------------------
_DEFAULTS = configurator.defaults(globals())


def hf_weights(model, dtype):
    """Our weights under LlamaForCausalLM names, each its own contiguous tensor (safetensors refuses shared memory)."""
    return {name: t.detach().to("cpu", DTYPES[dtype], copy=True).contiguous()
            for name, t in to_hf_state_dict(model).items()}


def write_tokenizer(run_dir, hf_dir, tokenizer):
    """The run's tokenizer files, with the chat template both in tokenizer_config.json and in chat_template.jinja."""
    tokenizer.save(hf_dir)  # a complete, consistent set; the run's own files below take precedence
    for name in checkpoint.TOKENIZER_FILES:
        if os.path.isfile(os.path.join(run_dir, name)):
            shutil.copyfile(os.path.join(run_dir, name), os.path.join(hf_dir, name))
    config_path = os.path.join(hf_dir, "tokenizer_config.json")
    jinja_path = os.path.join(hf_dir, "chat_template.jinja")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    if config.get("chat_template"):
        with open(jinja_path, "w", encoding="utf-8") as f:
            f.write(config["chat_template"])
    elif os.path.isfile(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            config["chat_template"] = f.read()
        write_json(config_path, config)


def export(run_dir, hf_dir, dtype="float32"):
    """Write the HF directory for the model in run_dir; return the names of the files now in hf_dir."""
    from safetensors.torch import save_file

    if dtype not in DTYPES:
        configurator.fail(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if os.path.abspath(run_dir) == os.path.abspath(hf_dir):
        configurator.fail("hf_dir must differ from out_dir")
    model, info = checkpoint.load_model(run_dir, "cpu")
    tokenizer = load_tokenizer(run_dir)
    chat = is_chat_model(run_dir, info)
    os.makedirs(hf_dir, exist_ok=True)
    stale = [p for p in glob.glob(os.path.join(hf_dir, "*.safetensors")) if os.path.basename(p) != "model.safetensors"]
    if stale:
        configurator.fail(f"{hf_dir} already holds other weights ({os.path.basename(stale[0])}); "
                          "export into an empty directory")

    eot, im_end = tokenizer.eot_id, tokenizer.im_end_id
    eos = im_end if chat else eot
    write_json(os.path.join(hf_dir, "config.json"), checkpoint.hf_config_dict(model.cfg, eot, eos, eot, dtype))
    write_json(os.path.join(hf_dir, "generation_config.json"), {
        "bos_token_id": eot, "eos_token_id": [im_end, eot] if chat else eot, "pad_token_id": eot,
    })
    save_file(hf_weights(model, dtype), os.path.join(hf_dir, "model.safetensors"), metadata={"format": "pt"})
    write_tokenizer(run_dir, hf_dir, tokenizer)
    return sorted(os.listdir(hf_dir))


def export_adapter(run_dir, hf_dir, dtype="float32"):
    """Write a LoRA run's adapters as a PEFT adapter directory (and its base as an HF directory where it is a run
    directory); return the names of the files now in hf_dir."""
    from safetensors.torch import save_file

    state = checkpoint.load_checkpoint(os.path.join(run_dir, checkpoint.CKPT_NAME))
    if not state.get("lora_base"):
        configurator.fail(f"{run_dir} is not a LoRA run (it was trained with lora_rank=0): export it with merge=True")
    checkpoint.with_lora_base(state)  # the base must still be the one the adapters were trained on
    base = state["lora_base"]["path"]
    if not checkpoint.is_hf_dir(base):  # PEFT loads its base from an HF directory: write one
        export(base, os.path.join(hf_dir, "base"), dtype)
        base = os.path.abspath(os.path.join(hf_dir, "base"))
    tensors = {}
    for name, t in state["model"].items():  # model.layers.0.self_attn.qkv_proj.lora_A.q -> ...self_attn.q_proj...
        module, kind = name.split(".lora_")
        side, part = kind.split(".")
        fused, hf_name = LORA_PLACES[part]
        tensors[f"base_model.model.{module[: -len(fused)]}{hf_name}.lora_{side}.weight"] = (
            t.to(DTYPES[dtype]).contiguous())
    mc = state["model_config"]
    os.makedirs(hf_dir, exist_ok=True)
    save_file(tensors, os.path.join(hf_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
    write_json(os.path.join(hf_dir, "adapter_config.json"), {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "r": mc["lora_rank"],
        "lora_alpha": mc["lora_alpha"], "lora_dropout": mc["lora_dropout"], "bias": "none", "inference_mode": True,
        "target_modules": sorted({LORA_PLACES[p][1].split(".")[-1] for p in mc["lora_targets"]}),
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True})
    write_tokenizer(run_dir, hf_dir, load_tokenizer(run_dir))
    return sorted(os.listdir(hf_dir))


def main(argv=None):
    config = configurator.configure(_DEFAULTS, argv)
    configurator.print_config(config)
    if not config["out_dir"] or not config["hf_dir"]:
        configurator.fail("both --out_dir (the run directory) and --hf_dir (the directory to write) are required")
    written = (export if config["merge"] else export_adapter)(config["out_dir"], config["hf_dir"], config["dtype"])
    print(f"exported {config['out_dir']} -> {config['hf_dir']} ({config['dtype']}): {', '.join(written)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
