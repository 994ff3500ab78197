# bench.py at GPT-2-small size: the 124M preset (dim 768, 12 layers, vocab 50,304) at seq 1024, the shape of
# the MFU goal. dtype stays auto: bf16 on a GPU that has it.
#   python bench.py config/bench_124m.py --device=cuda --compile=True --compare_hf=True
model = "124m"
block_size = 1024
batch_size = 16
gradient_accumulation_steps = 4  # 65,536 tokens per optimizer step
compile = True
