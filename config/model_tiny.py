# Tiny model for CPU demos and tests: ~1M parameters, trains in minutes on 2 cores.
dim = 128
n_layers = 4
n_heads = 4
n_kv_heads = 2
# the recipe (docs/BENCHMARKS.md, "Quality per token"): measured here, the best of a sweep on the demo corpus
# (AdamW at 4 learning rates, Muon at 4 and 2 variants, 2 seeds at the best); the demo pretrains with it
optimizer = "muon"
muon_lr = 0.01  # the hidden matrices (Muon)
learning_rate = 3e-3  # the embedding, head and norms (AdamW); also AdamW's best alone at this size
min_lr = 3e-4
