# Supervised fine-tuning on chat data, continuing a pretraining run.
stage = "sft"
init_from = "out/pretrain"
out_dir = "out/sft"
data_dir = "data/sft"
block_size = 512
batch_size = 32
gradient_accumulation_steps = 4
max_iters = 5000
optimizer = "adamw"  # fine-tuning keeps AdamW: Muon's recipe was measured on pretraining only (docs/BENCHMARKS.md)
learning_rate = 2e-4
min_lr = 2e-5
warmup_iters = 100
weight_decay = 0.0
eval_interval = 500
log_interval = 50
