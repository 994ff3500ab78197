# GPT-2-small-sized LLaMA: ~124M parameters with a 50k vocabulary (tied head).
dim = 768
n_layers = 12
n_heads = 12
n_kv_heads = 12
ffn_dim = 2048
