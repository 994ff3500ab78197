# Reinforcement learning on verifiable rewards (GRPO) from a distilled (or SFT) run. The data: prompts with
# reference answers, {"prompt": "70 + 718 = ?", "answer": "788"} (or chats, whose last reply is the reference):
#   python prepare.py --input=raw/math_prompts.jsonl --stage=grpo --tokenizer=data/pretrain --max_len=256 \
#       --out_dir=data/grpo
#   python train.py config/grpo.py
stage = "grpo"
init_from = "out/distill"
out_dir = "out/grpo"
data_dir = "data/grpo"
reward = "exact_answer + 0.1 * think_format"  # or a function of yours: "my_rewards.py:score"
block_size = 1024
max_new_tokens = 512
batch_size = 16  # prompts per micro-batch, each with grpo_group completions
grpo_group = 8
gradient_accumulation_steps = 4
grpo_kl = 0.02
temperature = 1.0
max_iters = 500
optimizer = "adamw"  # fine-tuning keeps AdamW: Muon's recipe was measured on pretraining only (docs/BENCHMARKS.md)
learning_rate = 1e-6
min_lr = 1e-7
warmup_iters = 10
weight_decay = 0.0
eval_interval = 50
eval_iters = 8
log_interval = 5
