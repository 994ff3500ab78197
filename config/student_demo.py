# Demo students (demo.py): a model a quarter the size of the demo's, from scratch on the chat set, the same steps
# twice: alone (plain SFT) and distilled from the demo's SFT model (demo.py adds --teacher=out/demo/sft).
#   python train.py config/student_demo.py --out_dir=out/demo/student_sft
#   python train.py config/student_demo.py --out_dir=out/demo/student_kd --teacher=out/demo/sft
stage = "sft"
data_dir = "data/demo_sft"
out_dir = "out/demo/student_sft"
dim = 64
n_layers = 2
n_heads = 2
n_kv_heads = 1
block_size = 128
batch_size = 32
max_iters = 60
optimizer = "adamw"  # fine-tuning keeps AdamW: Muon's recipe was measured on pretraining only (docs/BENCHMARKS.md)
learning_rate = 5e-3
min_lr = 5e-4
warmup_iters = 10
weight_decay = 0.0
eval_interval = 30
eval_iters = 5  # 5 x 32 rows: every held-out conversation
log_interval = 10
