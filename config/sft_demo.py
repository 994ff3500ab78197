# Demo SFT (demo.py): the chat set, continuing the demo pretraining run.
#   python prepare.py --input=data/demo/sft_train.jsonl --val_input=data/demo/sft_val.jsonl \
#       --tokenizer=data/demo_pretrain --max_len=128 --out_dir=data/demo_sft
#   python train.py config/sft_demo.py
stage = "sft"
init_from = "out/demo/pretrain"
data_dir = "data/demo_sft"
out_dir = "out/demo/sft"
block_size = 128  # rows hold whole conversations; 99% of the demo conversations are shorter
batch_size = 32
max_iters = 120  # rows are packed: 2.7 epochs of the 4,000 conversations
optimizer = "adamw"  # fine-tuning keeps AdamW: Muon's recipe was measured on pretraining only (docs/BENCHMARKS.md)
learning_rate = 2e-3
min_lr = 2e-4
warmup_iters = 20
weight_decay = 0.0
eval_interval = 40
eval_iters = 5  # 5 x 32 rows: every held-out conversation
log_interval = 20
