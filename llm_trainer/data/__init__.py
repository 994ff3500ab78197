"""Data: the prepared shard format, input records, the tokenizer with its chat template and masks, training rows."""
