# Direct preference optimisation from an SFT run; the reference is the SFT weights, frozen.
stage = "dpo"
init_from = "out/sft"
out_dir = "out/dpo"
data_dir = "data/dpo"
dpo_beta = 0.1
dpo_loss = "sigmoid"
block_size = 512
batch_size = 8  # rows of whole pairs (pack=True): each holds as many pairs as fit in 2 x 513 tokens
gradient_accumulation_steps = 8
max_iters = 1000
optimizer = "adamw"  # fine-tuning keeps AdamW: Muon's recipe was measured on pretraining only (docs/BENCHMARKS.md)
learning_rate = 5e-7
min_lr = 5e-8
warmup_iters = 50
weight_decay = 0.0
eval_interval = 100
log_interval = 10
