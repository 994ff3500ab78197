"""
Export a run directory to a HuggingFace transformers directory (LlamaForCausalLM; a reward model, stage rm:
LlamaForSequenceClassification with one label).

    python export.py --out_dir=out/demo/sft --hf_dir=hf/sft
    python export.py --out_dir=out/demo/sft --hf_dir=hf/sft_bf16 --dtype=bfloat16
    python export.py --out_dir=out/lora_sft --hf_dir=hf/lora_adapter --merge=False    # a PEFT adapter
    python export.py --out_dir=out/demo/sft --gguf=sft.gguf --gguf_type=q8_0           # llama.cpp, ollama

Writes config.json, generation_config.json, model.safetensors and the tokenizer
files with the chat template. No custom code: `AutoModelForCausalLM` and
`AutoTokenizer.from_pretrained(hf_dir)` load it as a plain Llama, and give the
same logits and the same greedy text as sample.py (tests/test_export.py).

A reward model exports as `LlamaForSequenceClassification` (num_labels=1; pad_token_id <|endoftext|>, which no
rendered conversation holds, so transformers reads each score at the last token that is not padding, on either
side) with the tokenizer files and chat template of a chat export: `AutoModelForSequenceClassification` gives our
scores of chat-rendered conversations (tests/test_rm.py), and init_from=<its directory> continues training it. It
exports merged (a LoRA rm run's adapters and head in its weights), not as a PEFT adapter or GGUF.

A LoRA run exports merged (merge=True, the default: a plain Llama whose weights hold the adapters),
or as a PEFT adapter (merge=False): adapter_config.json + adapter_model.safetensors, which
`peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), hf_dir)` loads; base is
the HF directory the run adapted, or its export written to hf_dir/base with the run's RoPE settings
(context length, rope_scaling) where it is a run directory or the run trained with other ones.

GGUF (llama.cpp's format, which ollama and LM Studio read) is written with the gguf package, llama.cpp's
own Python library: the Llama architecture, the byte-level BPE tokenizer with llama.cpp's "gpt-2"
pre-tokenizer (the regex prepare.py's tokenizer splits with), the special tokens, the chat template and
RoPE scaling (linear or YaRN; llama.cpp has no dynamic NTK). Weights are f32, f16, bf16 or q8_0 (norms
stay f32). tests/test_gguf.py runs the file in llama.cpp (llama-cpp-python): the same greedy text.

The reverse needs no script: `checkpoint.load_model(hf_dir)` (used by
`init_from=<hf dir>` in train.py and `--hf_dir` in sample.py) reads any Llama
directory with safetensors weights.
"""

import glob
import json
import os
from dataclasses import replace

from llm_trainer.core import checkpoint
import configurator
from llm_trainer.core.common import DTYPES
from llm_trainer.core.files import replace_durably, write_json
from llm_trainer.inference.generation import is_chat_model
from model import LORA_PLACES, ModelConfig, to_hf_state_dict
from llm_trainer.data.tokenizer import load_tokenizer

# -----------------------------------------------------------------------------
out_dir = ""  # the run directory (ckpt.pt + tokenizer files) to export
hf_dir = ""  # the directory to write
gguf = ""  # a .gguf file to write (instead of, or besides, hf_dir)
gguf_type = "f16"  # f32 | f16 | bf16 | q8_0: the GGUF's weight type (norms stay f32)
dtype = "float32"  # float32 | bfloat16 | float16: the dtype of the saved weights
merge = True  # a LoRA run: its adapters merged into plain weights (True) or a PEFT adapter directory (False)
# -----------------------------------------------------------------------------
_DEFAULTS = configurator.defaults(globals())


def hf_weights(model, dtype):
    """Our weights under LlamaForCausalLM names, each its own contiguous tensor (safetensors refuses shared memory)."""
    return {name: t.detach().to("cpu", DTYPES[dtype], copy=True).contiguous()
            for name, t in to_hf_state_dict(model).items()}


def export(run_dir, hf_dir, dtype="float32", rope_from=None):
    """Write the HF directory for the model in run_dir; return the names of the files now in hf_dir. rope_from: a
    ModelConfig whose RoPE settings (with_rope_of) config.json takes instead of the model's own."""
    from safetensors.torch import save_file

    if dtype not in DTYPES:
        configurator.fail(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if os.path.abspath(run_dir) == os.path.abspath(hf_dir):
        configurator.fail("hf_dir must differ from out_dir")
    model, info = checkpoint.load_model(run_dir, "cpu")
    tokenizer = load_tokenizer(run_dir)
    reward_model = model.mcfg.head == "score"
    chat = is_chat_model(run_dir, info) or reward_model  # a reward model reads chat-rendered conversations
    os.makedirs(hf_dir, exist_ok=True)
    stale = [p for p in glob.glob(os.path.join(hf_dir, "*.safetensors")) if os.path.basename(p) != "model.safetensors"]
    if stale:
        configurator.fail(f"{hf_dir} already holds other weights ({os.path.basename(stale[0])}); "
                          "export into an empty directory")

    eot, im_end = tokenizer.eot_id, tokenizer.im_end_id
    eos = im_end if chat else eot
    mcfg = model.mcfg if rope_from is None else with_rope_of(model.mcfg, rope_from)
    write_json(os.path.join(hf_dir, "config.json"), checkpoint.hf_config_dict(mcfg, eot, eos, eot, dtype))
    if not reward_model:  # (it generates nothing)
        write_json(os.path.join(hf_dir, "generation_config.json"), {
            "bos_token_id": eot, "eos_token_id": [im_end, eot] if chat else eot, "pad_token_id": eot,
        })
    save_file(hf_weights(model, dtype), os.path.join(hf_dir, "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save(hf_dir, chat=chat)
    return sorted(os.listdir(hf_dir))


def with_rope_of(mcfg, run_mcfg):
    """mcfg with the RoPE settings of run_mcfg: the length and scaling a run trained at, which may differ from its
    base's (a LoRA run at a longer context than its base)."""
    return replace(mcfg, max_seq_len=run_mcfg.max_seq_len, rope_scaling=run_mcfg.rope_scaling,
                   rope_theta=run_mcfg.rope_theta)


def rope_settings(mcfg):
    """What of a config decides the rotary embedding: the length only matters to a scaled one."""
    return mcfg.rope_theta, mcfg.rope_scaling, mcfg.max_seq_len if mcfg.rope_scaling else None


def export_adapter(run_dir, hf_dir, dtype="float32"):
    """Write a LoRA run's adapters as a PEFT adapter directory, and its base as an HF directory with the run's RoPE
    settings where the base is a run directory or an HF directory with other ones (PeftModel computes with the
    base's config.json); return the names of the files now in hf_dir."""
    from safetensors.torch import save_file

    state = checkpoint.load_checkpoint(os.path.join(run_dir, checkpoint.CKPT_NAME))
    if not state.get("lora_base"):
        configurator.fail(f"{run_dir} is not a LoRA run (it was trained with lora_rank=0): export it with merge=True")
    if state["model_config"].get("head") == "score":
        configurator.fail(f"{run_dir} is a reward model: it exports merged (merge=True), as "
                          "LlamaForSequenceClassification, not as a PEFT adapter")
    checkpoint.check_lora_base(state["lora_base"])  # the base must still be the one the adapters were trained on
    base, run_mcfg = state["lora_base"]["path"], ModelConfig(**state["model_config"])
    if not checkpoint.is_hf_dir(base) or rope_settings(checkpoint.hf_model_config(base)) != rope_settings(run_mcfg):
        export(base, os.path.join(hf_dir, "base"), dtype, rope_from=run_mcfg)
        base = os.path.abspath(os.path.join(hf_dir, "base"))
    tensors = {}
    for name, t in state["model"].items():  # model.layers.0.self_attn.qkv_proj.lora_A.q -> ...self_attn.q_proj...
        module, kind = name.split(".lora_")
        side, part = kind.split(".")
        fused, hf_name = LORA_PLACES[part]
        tensors[f"base_model.model.{module[: -len(fused)]}{hf_name}.lora_{side}.weight"] = (
            t.to(DTYPES[dtype]).contiguous())
    mcfg = state["model_config"]
    os.makedirs(hf_dir, exist_ok=True)
    save_file(tensors, os.path.join(hf_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
    write_json(os.path.join(hf_dir, "adapter_config.json"), {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "r": mcfg["lora_rank"],
        "lora_alpha": mcfg["lora_alpha"], "lora_dropout": mcfg["lora_dropout"], "bias": "none", "inference_mode": True,
        "target_modules": sorted({LORA_PLACES[p][1].split(".")[-1] for p in mcfg["lora_targets"]}),
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True})
    load_tokenizer(run_dir).save(hf_dir, chat=True)
    return sorted(os.listdir(hf_dir))


GGUF_TYPES = {"f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16"),
              "q8_0": ("Q8_0", "MOSTLY_Q8_0")}


def export_gguf(run_dir, path, gguf_type="f16"):
    """Write the model in run_dir (a LoRA run merged) as one GGUF file for llama.cpp; return its size in bytes."""
    import gguf

    if gguf_type not in GGUF_TYPES:
        configurator.fail(f"gguf_type must be one of {', '.join(GGUF_TYPES)}, got {gguf_type!r}")
    model, info = checkpoint.load_model(run_dir, "cpu", head="lm")  # llama.cpp's Llama is a language model
    tokenizer = load_tokenizer(run_dir)
    chat, mcfg = is_chat_model(run_dir, info), model.mcfg
    check_gguf_rope_scaling(mcfg.rope_scaling)
    tmp = path + ".tmp"  # a file cut short by an error or a kill is never left under the name
    writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_name(os.path.basename(os.path.abspath(run_dir)))
    writer.add_file_type(getattr(gguf.LlamaFileType, GGUF_TYPES[gguf_type][1]))
    writer.add_context_length(mcfg.max_seq_len)
    writer.add_embedding_length(mcfg.dim)
    writer.add_block_count(mcfg.n_layers)
    writer.add_feed_forward_length(mcfg.ffn_dim)
    writer.add_head_count(mcfg.n_heads)
    writer.add_head_count_kv(mcfg.n_kv_heads)
    writer.add_key_length(mcfg.head_dim)
    writer.add_value_length(mcfg.head_dim)
    writer.add_rope_dimension_count(mcfg.head_dim)
    writer.add_rope_freq_base(mcfg.rope_theta)
    writer.add_layer_norm_rms_eps(mcfg.norm_eps)
    writer.add_vocab_size(mcfg.vocab_size)
    add_gguf_rope_scaling(writer, mcfg)
    add_gguf_tokenizer(writer, tokenizer, mcfg.vocab_size, chat)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, mcfg.n_layers)
    qtype = getattr(gguf.GGMLQuantizationType, GGUF_TYPES[gguf_type][0])
    for name, t in to_hf_state_dict(model).items():
        data = t.detach().float().numpy()
        if name.endswith(("q_proj.weight", "k_proj.weight")):  # HF's rotate-half layout -> llama.cpp's pairs
            heads = mcfg.n_heads if name.endswith("q_proj.weight") else mcfg.n_kv_heads
            data = data.reshape(heads, 2, mcfg.head_dim // 2, mcfg.dim).swapaxes(1, 2).reshape(data.shape)
        kind = qtype if data.ndim == 2 else gguf.GGMLQuantizationType.F32
        if kind == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % 32:  # q8_0 blocks are 32 wide
            kind = gguf.GGMLQuantizationType.F16
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight",)), gguf.quants.quantize(data, kind),
                          raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()
    replace_durably(tmp, path)
    return os.path.getsize(path)


def check_gguf_rope_scaling(s):
    """Refuse what llama.cpp would compute differently, before anything is written."""
    if s and s["type"] == "dynamic":
        configurator.fail("llama.cpp has no dynamic NTK RoPE scaling: export this model with --hf_dir, or train "
                          "the long-context stage with rope_scaling type linear or yarn")
    if s and "attention_factor" in s:
        configurator.fail("a YaRN attention_factor of its own is not written to GGUF (llama.cpp derives it from the "
                          "factor): export this model with --hf_dir")


def add_gguf_rope_scaling(writer, mcfg):
    import gguf

    s = mcfg.rope_scaling
    if not s:
        return
    writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR if s["type"] == "linear" else gguf.RopeScalingType.YARN)
    writer.add_rope_scaling_factor(float(s["factor"]))
    writer.add_rope_scaling_orig_ctx_len(mcfg.rope_original_len)
    if s["type"] == "yarn":
        writer.add_rope_scaling_yarn_beta_fast(float(s.get("beta_fast", 32.0)))
        writer.add_rope_scaling_yarn_beta_slow(float(s.get("beta_slow", 1.0)))


def add_gguf_tokenizer(writer, tokenizer, vocab_size, chat):
    """Byte-level BPE as llama.cpp's "gpt2" tokenizer model: tokens, merges, types, special ids, chat template.
    Documents start with <|endoftext|> as in pretraining; a chat model stops at <|im_end|>, a base model at
    <|endoftext|>."""
    import gguf

    spec = json.loads(tokenizer.to_str())
    pre = spec.get("pre_tokenizer") or {}
    if spec["model"].get("type") != "BPE" or pre.get("type") != "ByteLevel" or not pre.get("use_regex", True):
        configurator.fail("GGUF export writes byte-level BPE tokenizers with the GPT-2 split (what prepare.py "
                          f"trains); this run's tokenizer is {spec['model'].get('type')} with pre-tokenizer "
                          f"{pre.get('type')}: export it with --hf_dir and convert with llama.cpp's converter")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    # ids past the model's vocabulary: the tool tags a tokenizer saved before they existed gets added on loading
    pieces = {piece: i for piece, i in tokenizer.pieces().items() if i < vocab_size}
    for piece, i in pieces.items():
        tokens[i], types[i] = piece, gguf.TokenType.NORMAL
    for piece, i in tokenizer.special_ids.items():
        types[i] = gguf.TokenType.CONTROL
    for piece, i in tokenizer.tool_tag_ids.items():  # matched whole and shown in the text, as Qwen2.5's GGUFs have them
        if i < vocab_size:
            types[i] = gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.eot_id)
    writer.add_eos_token_id(tokenizer.im_end_id if chat else tokenizer.eot_id)
    writer.add_pad_token_id(tokenizer.eot_id)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(tokenizer.chat_template)


def main(argv=None):
    cfg = configurator.configure(_DEFAULTS, argv)
    configurator.print_config(cfg)
    if not cfg["out_dir"] or not (cfg["hf_dir"] or cfg["gguf"]):
        configurator.fail("--out_dir (the run directory) and --hf_dir (a directory to write) or --gguf (a file to "
                          "write) are required")
    if cfg["hf_dir"]:
        written = (export if cfg["merge"] else export_adapter)(cfg["out_dir"], cfg["hf_dir"], cfg["dtype"])
        print(f"exported {cfg['out_dir']} -> {cfg['hf_dir']} ({cfg['dtype']}): {', '.join(written)}")
    if cfg["gguf"]:
        size = export_gguf(cfg["out_dir"], cfg["gguf"], cfg["gguf_type"])
        print(f"exported {cfg['out_dir']} -> {cfg['gguf']} ({cfg['gguf_type']}, {size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
