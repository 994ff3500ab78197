# ~0.5B parameters with a 32k vocabulary (untied head); train with fsdp=True on several GPUs if memory is short.
dim = 1280
n_layers = 24
n_heads = 20
n_kv_heads = 4
ffn_dim = 3456
tie_embeddings = False
rope_theta = 1e6
