# Demo reward model (demo.py): the DPO demo's preference pairs (the set prepared for dpo: stage rm reads it), from
# the demo SFT run, whose backbone gets a scalar head read at the last token of each conversation.
#   python train.py config/rm_demo.py
stage = "rm"
init_from = "out/demo/sft"
data_dir = "data/demo_dpo"
out_dir = "out/demo/rm"
block_size = 128  # the SFT model's context
batch_size = 5  # rows of whole pairs (pack=True, rm's default): ~17 pairs a step, as DPO's
max_iters = 60
optimizer = "adamw"  # fine-tuning keeps AdamW: Muon's recipe was measured on pretraining only (docs/BENCHMARKS.md)
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 5
weight_decay = 0.0
eval_interval = 60
eval_iters = 30  # 30 x 5 pairs: every held-out pair, once
log_interval = 10
