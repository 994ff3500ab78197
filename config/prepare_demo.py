# Prepare the pretraining part of the embedded demo corpus (data/demo) and train its tokenizer.
#   python prepare.py config/prepare_demo.py
input = "data/demo/pretrain.jsonl"
out_dir = "data/demo_pretrain"
tokenizer = "train"
vocab_size = 4096
val_fraction = 0.02
