# Demo pretraining (demo.py): a tiny model from scratch on the fortunes corpus, a few minutes on 2 CPU cores.
#   python prepare.py config/prepare_demo.py
#   python train.py config/model_tiny.py config/pretrain_demo.py
stage = "pretrain"
data_dir = "data/demo_pretrain"
out_dir = "out/demo/pretrain"
block_size = 256
batch_size = 16
max_iters = 400
# the tiny preset's recipe (docs/BENCHMARKS.md): on this corpus and budget Muon reaches a tuned AdamW's final val bpb
# in under half the tokens, for ~8% more time per step
optimizer = "muon"
muon_lr = 0.01  # the hidden matrices
learning_rate = 3e-3  # the embedding, head and norms; a ~1M-parameter model takes a large step
min_lr = 3e-4
warmup_iters = 30
eval_interval = 100
eval_iters = 3  # 3 x 16 windows: the whole val split
log_interval = 20
