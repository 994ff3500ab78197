"""
Multiple-choice scoring by log-likelihood, the way lm-evaluation-harness scores
an `output_type: multiple_choice` task on an exported model, so that our own
number and lm_eval's agree item for item (tests/test_lm_eval.py):

- each choice is the continuation `delimiter + choice` of the context (the
  context's trailing spaces move to the continuation);
- its tokens are those of encode(context + continuation) past encode(context),
  both started as a document with <|endoftext|> (what the exported tokenizer
  adds by default, as pretraining put it between documents);
- the choice's score is the summed log-probability of those tokens; acc takes
  the highest score, acc_norm the highest score per character of the choice.
"""

import numpy as np
import torch


@torch.no_grad()
def choice_logprobs(model, tokenizer, context, choices, delimiter=" "):
    """Summed log-probability of each choice after the context (a list of floats)."""
    context_ids = [tokenizer.eot_id] + tokenizer.encode(context.rstrip())  # trailing spaces go with the choice
    scores = []
    for choice in choices:
        whole = [tokenizer.eot_id] + tokenizer.encode(context + delimiter + choice)
        x, y = torch.tensor([whole[:-1]]), torch.tensor([whole[1:]])
        losses = model(x, targets=y)[0]  # cross-entropy of every next token
        scores.append(-float(losses[len(context_ids) - 1:].sum()))
    return scores


def multiple_choice(model, tokenizer, items, delimiter=" "):
    """{"acc", "acc_norm"} over items {"context", "choices", "gold" (the index of the right choice)}."""
    acc, acc_norm = [], []
    for item in items:
        scores = np.array(choice_logprobs(model, tokenizer, item["context"], item["choices"], delimiter))
        lengths = np.array([len(c) for c in item["choices"]], dtype=np.float64)
        acc.append(float(np.argmax(scores) == item["gold"]))
        acc_norm.append(float(np.argmax(scores / lengths) == item["gold"]))
    return {"acc": float(np.mean(acc)), "acc_norm": float(np.mean(acc_norm))}
