# A reward model from an SFT run: its backbone with a scalar head (score, dim -> 1) read at the last token of each
# conversation, trained on preference pairs with the Bradley-Terry loss. The data: the pairs prepared for DPO
# (prepare.py --stage=rm makes the same set; a "margin" column, when the pairs have one, is kept and used):
#   python prepare.py --input=raw/dpo.jsonl --out_dir=data/dpo --tokenizer=data/pretrain --max_len=512
#   python train.py config/rm.py
#   python export.py --out_dir=out/rm --hf_dir=hf/rm      # transformers' LlamaForSequenceClassification
stage = "rm"
init_from = "out/sft"
out_dir = "out/rm"
data_dir = "data/dpo"
center_rewards_coefficient = 0.0  # TRL's: 0.01 keeps the scores centred on 0
block_size = 512
batch_size = 8  # pairs
gradient_accumulation_steps = 8
max_iters = 1000
optimizer = "adamw"  # fine-tuning keeps AdamW: Muon's recipe was measured on pretraining only (docs/BENCHMARKS.md)
learning_rate = 1e-5
min_lr = 1e-6
warmup_iters = 50
weight_decay = 0.0
eval_interval = 100
log_interval = 10
