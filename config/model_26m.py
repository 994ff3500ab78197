# MiniMind-sized model: ~26M parameters with a 6,400-token vocabulary.
dim = 512
n_layers = 8
n_heads = 8
n_kv_heads = 2
# the recipe (docs/BENCHMARKS.md, "Quality per token"): measured here, on the prose corpus at a short CPU budget
optimizer = "muon"
muon_lr = 0.02  # the hidden matrices (Muon)
learning_rate = 2e-3  # the embedding, head and norms (AdamW); also AdamW's best alone at this size
min_lr = 2e-4
