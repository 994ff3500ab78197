# ~1B parameters (Llama-3.2-1B shape) with a 32k vocabulary; use fsdp=True under torchrun.
dim = 2048
n_layers = 16
n_heads = 32
n_kv_heads = 8
ffn_dim = 8192
rope_theta = 5e5
# the recipe, from published rules (not measured here; docs/BENCHMARKS.md): Muon 0.02 (transfers across width);
# the AdamW groups GPT-3's rate for 1.3B (2e-4), ~1M tokens per step
optimizer = "muon"
muon_lr = 0.02
learning_rate = 2e-4
min_lr = 2e-5
