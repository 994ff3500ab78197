# Reinforcement learning against a reward model (GRPO, reward="rm:DIR") from an SFT run: open-ended prompts, no
# reference answers. The reward model shares the policy's tokenizer (checked) and scores each completion with its
# prompt as a conversation, frozen. The data: prompts alone, {"prompt": "..."} or chats whose last message is the
# user's:
#   python prepare.py --input=raw/prompts.jsonl --stage=grpo --tokenizer=data/pretrain --max_len=256 \
#       --out_dir=data/prompts
#   python train.py config/grpo_rm.py
stage = "grpo"
init_from = "out/sft"
out_dir = "out/grpo_rm"
data_dir = "data/prompts"
reward = "rm:out/rm"  # a weighted sum works too: "rm:out/rm + 0.5 * think_format"
block_size = 512
max_new_tokens = 256
batch_size = 16  # prompts per micro-batch, each with grpo_group completions
grpo_group = 8
gradient_accumulation_steps = 4
grpo_kl = 0.05  # a reward model can be gamed: the KL to the start keeps the policy near what it scores well
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
