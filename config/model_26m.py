# MiniMind-sized model: ~26M parameters with a 6,400-token vocabulary.
dim = 512
n_layers = 8
n_heads = 8
n_kv_heads = 2
# the recipe (docs/BENCHMARKS.md, "Quality per token"): measured here on the prose corpus at a short CPU budget
# (40 steps of 2,048 tokens: Muon 0.25 bpb below AdamW at its best of 5e-4..4e-3, 2 seeds); Newton-Schulz costs
# a fixed ~1.8 s per step on 2 CPU cores: +4.6% of a step at 32K tokens (measured), so use >= 16K tokens per step on a CPU
optimizer = "muon"
muon_lr = 0.02  # the hidden matrices (Muon)
learning_rate = 2e-3  # the embedding, head and norms (AdamW)
min_lr = 2e-4
