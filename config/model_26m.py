# MiniMind-sized model: ~26M parameters with a 6,400-token vocabulary.
dim = 512
n_layers = 8
n_heads = 8
n_kv_heads = 2
