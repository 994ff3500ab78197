"""
Export a run directory to a HuggingFace transformers directory (LlamaForCausalLM).

    python export.py --out_dir=out/demo/sft --hf_dir=hf/sft
    python export.py --out_dir=out/demo/sft --hf_dir=hf/sft_bf16 --dtype=bfloat16

Writes config.json, generation_config.json, model.safetensors and the tokenizer
files with the chat template. No custom code: `AutoModelForCausalLM` and
`AutoTokenizer.from_pretrained(hf_dir)` load it as a plain Llama, and give the
same logits and the same greedy text as sample.py (tests/test_export.py).

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
from model import to_hf_state_dict
from tokenizer import load_tokenizer

# -----------------------------------------------------------------------------
out_dir = ""  # the run directory (ckpt.pt + tokenizer files) to export
hf_dir = ""  # the directory to write
dtype = "float32"  # float32 | bfloat16 | float16: the dtype of the saved weights
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


def main(argv=None):
    config = configurator.configure(_DEFAULTS, argv)
    configurator.print_config(config)
    if not config["out_dir"] or not config["hf_dir"]:
        configurator.fail("both --out_dir (the run directory) and --hf_dir (the directory to write) are required")
    written = export(config["out_dir"], config["hf_dir"], config["dtype"])
    print(f"exported {config['out_dir']} -> {config['hf_dir']} ({config['dtype']}): {', '.join(written)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
