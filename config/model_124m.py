# GPT-2-small-sized LLaMA: ~124M parameters with a 50k vocabulary (tied head).
dim = 768
n_layers = 12
n_heads = 12
n_kv_heads = 12
ffn_dim = 2048
# the recipe, from published rules (not measured here; docs/BENCHMARKS.md): Muon's learning rate transfers across
# width under its shape adjustment (Keller Jordan's Muon and nanochat keep 0.02 at every depth); the AdamW groups
# take GPT-3's rate for 125M (Brown et al. 2020, table 2.1), which wants ~0.5M tokens per step
# (e.g. --block_size=1024 --batch_size=16 --gradient_accumulation_steps=32)
optimizer = "muon"
muon_lr = 0.02
learning_rate = 6e-4
min_lr = 6e-5
