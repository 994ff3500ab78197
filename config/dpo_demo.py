# Demo DPO (demo.py): preference pairs, starting from the demo SFT run, which is also the frozen reference.
# From SFT rather than the distilled model: the pairs' replies are plain answers without <think>, the
# format the SFT model writes, so the preference is about right vs wrong answers, not about the format.
#   python prepare.py --input=data/demo/dpo_train.jsonl --val_input=data/demo/dpo_val.jsonl \
#       --tokenizer=data/demo_pretrain --max_len=128 --out_dir=data/demo_dpo
#   python train.py config/dpo_demo.py
stage = "dpo"
init_from = "out/demo/sft"
data_dir = "data/demo_dpo"
out_dir = "out/demo/dpo"
block_size = 128  # the SFT model's context: the DPO model (exported, chatted with) keeps it
batch_size = 5  # rows of whole pairs (pack=True, dpo's default): ~3.5 pairs of ~72 tokens in each row of 258, ~17 pairs a step
max_iters = 80
# Packed (5 rows, ~17 pairs a step, as 16 pairs were before): lr 1e-4, beta 0.3: 62.7%, margin 2.12, in 24.5 s.
# Tried unpacked, 16 pairs a step (held-out reward accuracy after 80 steps; identity questions still answered, of 20):
#   lr 1e-4, beta 0.3: 65.6%, 18    lr 1e-4, beta 0.1: 58.8%, 17    lr 5e-5, beta 0.1: 57.5%, 18
#   lr 1e-3, beta 0.1 (from an earlier SFT run): 67.5%, 16, and broken replies such as "10000"
dpo_beta = 0.3
optimizer = "adamw"  # fine-tuning keeps AdamW: Muon's recipe was measured on pretraining only (docs/BENCHMARKS.md)
learning_rate = 1e-4
min_lr = 1e-5
warmup_iters = 10
weight_decay = 0.0
eval_interval = 40
eval_iters = 30  # 30 x 5 pairs: every held-out pair, once
log_interval = 10
