# ~1B parameters (Llama-3.2-1B shape) with a 32k vocabulary; use fsdp=True under torchrun.
dim = 2048
n_layers = 16
n_heads = 32
n_kv_heads = 8
ffn_dim = 8192
rope_theta = 5e5
