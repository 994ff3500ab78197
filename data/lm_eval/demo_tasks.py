"""Scoring of the demo_tasks task (demo_tasks.yaml): a reply's answer is what follows </think> when there is one;
the identity answer must contain the bot's name, every other answer must equal the expected one. The think form is
rewards.think_format's (the GRPO reward), imported from the repository root this file lives under."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from llm_trainer.training.rewards import think_format  # noqa: E402


def final_answer(reply):
    return reply.rsplit("</think>", 1)[-1].strip()


def process_results(doc, results):
    reply = results[0]
    final = final_answer(reply)
    correct = doc["answer"] in final if doc["task"] == "identity" else final == doc["answer"]
    return {"exact_match": float(correct), "think_well_formed": think_format(doc["prompt"], reply, doc["answer"])}
