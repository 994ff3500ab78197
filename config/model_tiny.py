# Tiny model for CPU demos and tests: ~1M parameters, trains in minutes on 2 cores.
dim = 128
n_layers = 4
n_heads = 4
n_kv_heads = 2
