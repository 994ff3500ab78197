# bench.py at MiniMind size: the 26M preset (dim 512, 8 layers, GQA 8/2, vocab 6,400) at MiniMind's pretraining
# length and batch. Small models are launch-bound: compare compile modes.
#   python bench.py config/bench_26m.py --device=cuda --compare_hf=True --compile_mode=max-autotune-no-cudagraphs
#   python bench.py config/bench_26m.py --device=cuda --compare_hf=True --compile_mode=reduce-overhead
model = "26m"
block_size = 512
batch_size = 32
compile = True
