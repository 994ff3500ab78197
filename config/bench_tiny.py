# bench.py on a CPU: the tiny preset (dim 128, 4 layers, vocab 4,096) in fp32, the size of the CPU demo.
#   python bench.py config/bench_tiny.py --compare_hf=True
model = "tiny"
device = "cpu"
block_size = 256
batch_size = 8
steps = 1  # ours and HF alternate step by step: a shared machine's load changes slow both alike
rounds = 12
