# Demo reasoning distillation (demo.py): <think>...</think> answers, the reasoning tags weighted 10x,
# continuing the demo SFT run.
#   python prepare.py --input=data/demo/reason_train.jsonl --val_input=data/demo/reason_val.jsonl \
#       --tokenizer=data/demo_pretrain --max_len=160 --out_dir=data/demo_reason
#   python train.py config/distill_demo.py
stage = "sft"
init_from = "out/demo/sft"
data_dir = "data/demo_reason"
out_dir = "out/demo/distill"
think_tag_weight = 10.0
block_size = 160  # the longest reasoning conversation is ~140 tokens
batch_size = 32
max_iters = 100  # rows are packed: about 3 epochs of the 2,000 conversations
optimizer = "adamw"  # fine-tuning keeps AdamW: Muon's recipe was measured on pretraining only (docs/BENCHMARKS.md)
learning_rate = 2e-3
min_lr = 2e-4
warmup_iters = 20
weight_decay = 0.0
eval_interval = 50
eval_iters = 5
log_interval = 20
