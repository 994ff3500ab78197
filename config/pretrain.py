# Pretraining on a prepared corpus. Combine with a size preset, which brings its recipe (optimizer, learning rates):
#   torchrun --nproc_per_node=8 train.py config/model_26m.py config/pretrain.py --data_dir=data/mine
stage = "pretrain"
out_dir = "out/pretrain"
block_size = 512
batch_size = 32
gradient_accumulation_steps = 8
max_iters = 20000
warmup_iters = 1000
eval_interval = 1000
log_interval = 50
