# The demo's tool-use stage: the SFT model learns to call the calculator for additions (data/demo/tool_train.jsonl,
# OpenAI-format conversations with the calculator's schema in the system turn) and to answer with its result.
stage = "sft"
init_from = "out/demo/sft"
data_dir = "data/demo_tools"
out_dir = "out/demo/tools"
# the system turn that offers the tool is ~290 tokens of the demo's tokenizer (Qwen2.5's words and the schema), a
# conversation 300-460: twice the 256 positions pretraining saw, with YaRN
block_size = 512
rope_scaling = {"type": "yarn", "factor": 2.0, "original_max_seq_len": 256}
batch_size = 16
max_iters = 20  # 1.3 epochs of the 240 conversations (the budget): 7/40 held-out prompts get a valid call; 30 steps: 40/40 (docs/BENCHMARKS.md)
learning_rate = 2e-3
min_lr = 2e-4
warmup_iters = 5
weight_decay = 0.0
optimizer = "adamw"  # fine-tuning keeps AdamW: Muon's recipe was measured on pretraining only (docs/BENCHMARKS.md)
eval_interval = 20
eval_iters = 1  # 1 x 16 rows: every held-out tool conversation
log_interval = 10
