# Reasoning distillation: SFT on <think>...</think> answers, the reasoning tags weighted 10x.
stage = "sft"
init_from = "out/sft"
out_dir = "out/distill"
data_dir = "data/reason"
think_tag_weight = 10.0
block_size = 1024
batch_size = 16
gradient_accumulation_steps = 8
max_iters = 2000
optimizer = "adamw"  # fine-tuning keeps AdamW: Muon's recipe was measured on pretraining only (docs/BENCHMARKS.md)
learning_rate = 1e-4
min_lr = 1e-5
warmup_iters = 50
weight_decay = 0.0
eval_interval = 250
log_interval = 50
