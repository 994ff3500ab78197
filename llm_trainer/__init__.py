"""
llm-trainer's library: what the commands at the top level (prepare.py, train.py, sample.py, serve.py, eval.py,
export.py, bench.py, demo.py) share. Layered bottom to top; a module imports only from its own layer or below,
and from the two top-level files the design card names (model.py, configurator.py):

    core/       common (device, dtype, autocast), files (atomic writes, JSON, digests), distributed
                (process group, DDP / FSDP2), checkpoint (ckpt.pt, HF directories, a run's start)
    data/       shards (the prepared format), records (input formats), tokenizer (ChatML, loss masks),
                batches (what a row is: a window, a document or a pair)
    inference/  generation (a model loaded to generate: prompts, KV-cache decoding, streamed text)
    training/   losses, metrics (the log), rewards and grpo (GRPO's rewards and rollouts)
    stages      one definition per stage, above the layers it names (train.py and prepare.py look it up)
"""
