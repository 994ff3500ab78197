"""The items of the demo_add task: the held-out sums of data/demo/tasks_val.jsonl, each with the right answer and
three near misses (off by one, by ten, digits swapped or +100) in an order fixed by the numbers themselves."""


def choices_for(answer):
    a = int(answer)
    misses = [a + 1, a - 10 if a >= 10 else a + 10, int(str(a)[::-1]) if str(a)[::-1] != str(a) else a + 100]
    options = sorted(set(misses) - {a}) + [a]
    options.sort(key=lambda v: (v * 7919) % 101)  # a scrambled but fixed order
    return [str(v) for v in options], options.index(a)


def items(dataset):
    """lm_eval's process_docs: keep the sums, add "choices" and "gold"."""
    def add_choices(doc):
        choices, gold = choices_for(doc["answer"])
        return {**doc, "choices": choices, "gold": gold}

    return dataset.filter(lambda doc: doc["task"] == "add").map(add_choices)
