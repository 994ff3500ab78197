# Demo GRPO against the demo's reward model (demo.py): the prompts of the preference pairs alone, no reference
# answers, from the SFT model (the format the pairs' replies have); reward: the reward model's score.
#   python prepare.py --input=<the prompts of data/demo/dpo_train.jsonl> --stage=grpo --max_len=96 \
#       --tokenizer=data/demo_pretrain --out_dir=data/demo_prompts     (demo.py writes the prompts first)
#   python train.py config/grpo_rm_demo.py
stage = "grpo"
init_from = "out/demo/sft"
data_dir = "data/demo_prompts"
out_dir = "out/demo/grpo_rm"
reward = "rm:out/demo/rm"
block_size = 128  # the SFT model's context: prompt (<= 96 tokens) + completion
max_new_tokens = 32  # the pairs' replies are short answers
batch_size = 8  # prompts per step, each with grpo_group completions
grpo_group = 4
temperature = 1.0
grpo_kl = 0.0
optimizer = "adamw"  # fine-tuning keeps AdamW: Muon's recipe was measured on pretraining only (docs/BENCHMARKS.md)
learning_rate = 1e-4
min_lr = 1e-5
warmup_iters = 2
weight_decay = 0.0
max_iters = 30
eval_interval = 30
eval_iters = 2  # a glimpse in the log; demo.py scores every held-out prompt before and after
log_interval = 5
