# ~0.5B parameters with a 32k vocabulary (untied head); train with fsdp=True on several GPUs if memory is short.
dim = 1280
n_layers = 24
n_heads = 20
n_kv_heads = 4
ffn_dim = 3456
tie_embeddings = False
rope_theta = 1e6
# the recipe, from published rules (not measured here; docs/BENCHMARKS.md): Muon 0.02 (transfers across width);
# the AdamW groups GPT-3's rate between its 350M (3e-4) and 760M (2.5e-4), ~0.5M tokens per step
optimizer = "muon"
muon_lr = 0.02
learning_rate = 3e-4
min_lr = 3e-5
