# Prepare the pretraining part of the embedded demo corpus (data/demo) and train its tokenizer.
#   python prepare.py config/prepare_demo.py
# demo.py then tokenizes the chat sets with this tokenizer (--tokenizer=data/demo_pretrain).
input = "data/demo/pretrain.jsonl"
out_dir = "data/demo_pretrain"
tokenizer = "train"
vocab_size = 4096
val_fraction = 0.02
