"""Generate the demo chat data: SFT, reasoning, DPO, and held-out task prompts.

    python data/demo/make_chat.py                      # writes into data/demo/
    python data/demo/make_chat.py --seed 7 --bot_name Pico --author "Ada Lab" --out_dir /tmp/x

Everything is made from templates and a seeded random generator, so a given
(seed, bot_name, author, corpus) always gives the same bytes. The tasks have
exact, checkable answers so that a tiny model's progress can be scored:

    identity  "who are you?"            -> a reply naming the bot and its author
    add       "What is 147 + 85?"       -> "232"
    reverse   'Reverse the word "cat".' -> "tac"
    count     '"hello"有几个字符？'       -> "5"
    poem      "“床前明月光”的下一句是什么？" -> "疑是地上霜"  (couplets of tang300)

The tool files teach the calculator (llm_trainer/inference/tools.py): OpenAI-format
conversations whose additions call it and answer with its result, some with a
follow-up addition, and a few other tasks answered without a call although the
tool is offered. They are drawn after everything else, so the other files do
not change with them.

Held-out rule: the items of the val files (number pairs, words, strings,
couplets, identity phrasings) are drawn first and never used for training, so
no user prompt of a *_val file appears in a *_train file; generate() asserts it.
"""
import argparse
import json
import random
import re
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_CORPUS = HERE / "pretrain.jsonl"
DEFAULT_SEED = 1234
DEFAULT_BOT_NAME = "MiniLlama"
DEFAULT_AUTHOR = "Tiny Llama Trainer"

# How many of each kind. Train sizes are conversations; val is one prompt per item.
SFT_TRAIN = {"identity": 500, "add": 900, "reverse": 650, "count": 600, "poem": 700, "multi": 650}
REASON_TRAIN = {"identity": 150, "add": 600, "reverse": 400, "count": 400, "poem": 450}
DPO_TRAIN = 1000
VAL = {"identity": 20, "add": 40, "reverse": 30, "count": 30, "poem": 30}
TOOL_TRAIN = {"add": 200, "other": 40}  # "other": identity, reverse, count or poem, answered without a call
TOOL_VAL = 16  # held-out additions as tool conversations (all 40 are scored; these give a val loss)
GRPO_VAL = 300  # held-out counting prompts that score the GRPO stage (enough that a real gain is > 2 standard errors)
GRPO_VAL_SEED = 2626  # their own generator: drawing them leaves every other file's bytes as they were
TOOL_FOLLOW_UP_SHARE = 0.3  # share of tool additions followed by "now add c to that", a second call
PROMPT_FORM_SHARE = 0.1  # share of DPO pairs written as {"prompt", "chosen", "rejected"} strings
SYSTEM_SHARE = 0.1       # share of single-turn train conversations that get a system message

# ---------------------------------------------------------------- templates
# Train and val share the task templates; what is held out is the item.
# Identity is the exception: there the phrasing is the item.

IDENTITY_TRAIN = {
    "en": ["Who are you?", "What is your name?", "Who made you?", "Hi, who are you?",
           "Introduce yourself.", "Tell me about yourself.", "What should I call you?",
           "Who created you?", "Who built you?", "Are you a human?", "What are you?",
           "Hello! What's your name?", "Who trained you?", "Can you tell me your name?",
           "Which model are you?", "Who developed you?"],
    "zh": ["你好，你是谁？", "你是谁？", "你叫什么名字？", "谁创造了你？", "谁开发了你？",
           "介绍一下你自己。", "请做个自我介绍。", "你是人类吗？", "我该怎么称呼你？",
           "你是什么模型？", "你好！", "嗨，你叫什么？", "是谁训练了你？", "你是哪个团队做的？",
           "你是什么？", "能告诉我你的名字吗？"],
}
IDENTITY_VAL = {
    "en": ["May I know who you are?", "Please introduce yourself briefly.", "Who is your creator?",
           "What's your name, assistant?", "Hey there, what are you called?",
           "Who are you and who made you?", "Tell me your name, please.", "Which team built you?",
           "Are you a chatbot? What is your name?", "Identify yourself."],
    "zh": ["请问你是哪位？", "你的名字是什么？", "你的创造者是谁？", "简单介绍一下你自己吧。",
           "你好呀，请问怎么称呼？", "你是谁开发的？", "说说你是谁。", "你是一个聊天机器人吗？叫什么名字？",
           "嘿，你是谁呀？", "你由谁制作？"],
}
IDENTITY_ANSWERS = {
    "en": ["I am {bot}, a small language model made by {author}.",
           "My name is {bot}. I was built by {author}.",
           "I'm {bot}, an AI assistant created by {author}.",
           "Hi! I'm {bot}, a tiny chat model trained by {author}."],
    "zh": ["我是{bot}，一个由{author}开发的小型语言模型。",
           "我叫{bot}，是{author}训练的AI助手。",
           "你好！我是{bot}，由{author}创建。",
           "我是{bot}，{author}做的一个小模型。"],
}
IDENTITY_REASONING = {
    "en": "The user asks who I am. I am {bot}, made by {author}.",
    "zh": "用户在问我的身份。我是{bot}，由{author}开发。",
}
# Wrong identity answers for DPO: no name, no author.
IDENTITY_REJECTED = {
    "en": ["I'm just a program, I don't have a name.", "I don't know."],
    "zh": ["我只是一个程序，没有名字。", "我不知道。"],
}

TASK_TEMPLATES = {
    "add": {
        "en": ["What is {a} + {b}?", "Compute {a} + {b}.", "{a} + {b} = ?", "Add {a} and {b}."],
        "zh": ["{a}加{b}等于多少？", "计算：{a} + {b}", "{a}+{b}=？", "请算出{a}与{b}的和。"],
    },
    "reverse": {
        "en": ['Reverse the word "{w}".', 'Spell "{w}" backwards.', "Write {w} in reverse order."],
        "zh": ["把单词“{w}”倒过来写。", "请反转“{w}”的字母顺序。", "“{w}”倒序是什么？"],
    },
    "count": {
        "en": ['How many characters are in "{s}"?', 'Count the characters in "{s}".',
               'What is the length of "{s}"?'],
        "zh": ["“{s}”有几个字符？", "数一数“{s}”有多少个字符。", "“{s}”的长度是多少？"],
    },
    "poem": {
        "en": ['What line comes after "{line}"?', "Continue the poem: {line}"],
        "zh": ["“{line}”的下一句是什么？", "请接下句：{line}", "{line}，下一句是？"],
    },
}

SYSTEM_PROMPTS = {
    "en": ["You are {bot}, a small helpful assistant made by {author}.",
           "You are a helpful assistant. Answer briefly."],
    "zh": ["你是{bot}，一个由{author}开发的小助手。", "你是一个乐于助人的助手，回答要简短。"],
}
FOLLOW_UP_ADD = {"en": "Now add {c} to that.", "zh": "再加上{c}呢？"}
# the schema llm_trainer/inference/tools.py offers for its calculator (tests/test_tools.py checks they agree)
CALCULATOR = {"type": "function", "function": {
    "name": "calculator", "description": "Evaluate an arithmetic expression.",
    "parameters": {"type": "object", "properties": {
        "expression": {"type": "string", "description": "e.g. 147 + 85"}},
        "required": ["expression"]}}}
THANKS = {"en": (["Thanks!", "Thank you."], "You're welcome!"),
          "zh": (["谢谢！", "谢谢你。"], "不客气！")}
UNHELPFUL = {"en": "I don't know.", "zh": "我不知道。"}

# ---------------------------------------------------------------- item pools


def read_corpus(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


TANG_POEM = re.compile(r"^《(?P<title>[^》\n]+)》\n作者：(?P<author>[^\n]+)\n(?P<body>.*)$", re.S)
COUPLET = re.compile(r"^(?P<first>[\u4e00-\u9fff]{4,9})，(?P<second>[\u4e00-\u9fff]{4,9})[。！？；]$")


def tang300_couplets(texts):
    """(first, second, title, poet) for every "A，B。" line of the tang300 poems.

    tang300 records are the ones shaped "《title》\\n作者：poet\\n..." (song100
    writes "题目:" and the `chinese` file neither). A first half that opens two
    different couplets is dropped: its answer would be ambiguous. Sorted, so
    the result does not depend on the corpus order.
    """
    couplets = set()
    for text in texts:
        m = TANG_POEM.match(text)
        if not m:
            continue
        for line in m["body"].split("\n"):
            c = COUPLET.match(line.strip())
            if c:
                couplets.add((c["first"], c["second"], m["title"], m["author"]))
    openers = Counter(first for first, *_ in couplets)
    return sorted(c for c in couplets if openers[c[0]] == 1)


def english_words(texts, min_len, max_len, min_count=3):
    """Lower-case words seen at least min_count times in the English fortunes.

    Real words rather than random letters, so the tasks look like what a user
    would ask; sorted by frequency then spelling, for determinism.
    """
    counts = Counter()
    for text in texts:
        counts.update(re.findall(r"(?<![A-Za-z'])[a-z]+(?![A-Za-z'])", text))
    words = [w for w, n in counts.items() if n >= min_count and min_len <= len(w) <= max_len]
    return sorted(words, key=lambda w: (-counts[w], w))


def split_held_out(rng, items, n_val):
    """Shuffle items and cut off n_val of them for validation."""
    items = list(items)
    rng.shuffle(items)
    return items[:n_val], items[n_val:]


def random_addends(rng):
    """Two numbers of 2 or 3 digits each."""
    return tuple(rng.randint(10, 99) if rng.random() < 0.4 else rng.randint(100, 999)
                 for _ in range(2))


def chinese_snippet(rng, couplets):
    """A 2-8 character piece of one half of a train couplet, for the counting task.

    Train couplets only, and never across the two halves, so that counting
    prompts do not show the answer of a held-out poem prompt.
    """
    half = rng.choice(rng.choice(couplets)[:2])
    n = rng.randint(2, len(half))
    start = rng.randint(0, len(half) - n)
    return half[start:start + n]


class Pools:
    """The held-out val items and the train items of every task."""

    def __init__(self, rng, texts):
        couplets = tang300_couplets(texts)
        reverse_words = [w for w in english_words(texts, 3, 7)[:800] if w != w[::-1]]
        count_words = english_words(texts, 2, 10)[:1500]
        if len(couplets) < 200 or len(reverse_words) < 200:
            raise SystemExit("corpus too small: need the tang300 poems and the English fortunes")

        self.val_poem, self.train_poem = split_held_out(rng, couplets, VAL["poem"])
        self.val_reverse, self.train_reverse = split_held_out(rng, reverse_words, VAL["reverse"])
        self.val_add = []
        while len(self.val_add) < VAL["add"]:
            pair = random_addends(rng)
            if frozenset(pair) not in map(frozenset, self.val_add):
                self.val_add.append(pair)
        self.val_count = []
        while len(self.val_count) < VAL["count"]:
            s = (rng.choice(count_words) if rng.random() < 0.5
                 else chinese_snippet(rng, self.train_poem))
            if s not in self.val_count:
                self.val_count.append(s)
        self.count_words = [w for w in count_words if w not in self.val_count]

    def train_item(self, rng, kind):
        """A random train item of one kind, never one of the val items."""
        if kind == "poem":
            return rng.choice(self.train_poem)
        if kind == "reverse":
            return rng.choice(self.train_reverse)
        if kind == "add":
            held_out = {frozenset(p) for p in self.val_add}
            while True:  # a + b and b + a are the same question
                pair = random_addends(rng)
                if frozenset(pair) not in held_out:
                    return pair
        if kind == "count":
            while True:
                s = (rng.choice(self.count_words) if rng.random() < 0.5
                     else chinese_snippet(rng, self.train_poem))
                if s not in self.val_count:
                    return s
        raise ValueError(kind)

# ---------------------------------------------------------------- one task
# A task is a dict: kind, lang, prompt, answer (the exact short reply),
# reasoning (a short worked solution), rejected (a plausible wrong reply).


def add_reasoning(a, b, lang):
    """Column addition from the right, with carries, e.g. 7+5=12, write 2, carry 1."""
    da, db = str(a)[::-1], str(b)[::-1]
    steps, carry = [], 0
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        total = x + y + carry
        expr = f"{x}+{y}" + (f"+{carry}" if carry else "") + f"={total}"
        carry = total // 10
        if lang == "en":
            steps.append(f"{expr}, write {total % 10}" + (", carry 1" if carry else ""))
        else:
            steps.append(f"{expr}，写{total % 10}" + ("进1" if carry else ""))
    if lang == "en":
        if carry:
            steps.append("write the last carry 1")
        return "Add digits from the right: " + "; ".join(steps) + f". So {a} + {b} = {a + b}."
    if carry:
        steps.append("最高位写进位1")
    return "从个位开始逐位相加：" + "；".join(steps) + f"。所以{a}+{b}={a + b}。"


def wrong_sum(rng, a, b):
    """A believable mistake: off by one or ten, or the sum without carries."""
    no_carry = int("".join(str((int(x) + int(y)) % 10) for x, y in
                           zip(str(a).zfill(3), str(b).zfill(3))))
    candidates = [a + b + 1, a + b - 1, a + b + 10, a + b - 10, no_carry]
    return str(rng.choice([c for c in candidates if c != a + b]))


def wrong_reversal(rng, word):
    """The word unchanged, or its reversal with two neighbouring letters swapped."""
    rev = word[::-1]
    i = rng.randrange(len(rev) - 1)
    swapped = rev[:i] + rev[i + 1] + rev[i] + rev[i + 2:]
    return rng.choice([c for c in (word, swapped) if c != rev] or [UNHELPFUL["en"]])


def make_task(rng, kind, item, lang, pools, bot, author):
    """Fill a random template of `kind` for `item` in `lang`."""
    if kind == "identity":
        answer = rng.choice(IDENTITY_ANSWERS[lang]).format(bot=bot, author=author)
        return dict(kind=kind, lang=lang, prompt=item, answer=answer,
                    reasoning=IDENTITY_REASONING[lang].format(bot=bot, author=author),
                    rejected=rng.choice(IDENTITY_REJECTED[lang]), score=bot)
    template = rng.choice(TASK_TEMPLATES[kind][lang])
    if kind == "add":
        a, b = item
        task = dict(prompt=template.format(a=a, b=b), answer=str(a + b),
                    reasoning=add_reasoning(a, b, lang), rejected=wrong_sum(rng, a, b))
    elif kind == "reverse":
        letters = ", ".join(item)
        backwards = ", ".join(item[::-1])
        reasoning = (f"The letters are {letters}. Backwards: {backwards}. So the answer is {item[::-1]}."
                     if lang == "en" else
                     f"字母依次是 {letters}。倒过来是 {backwards}。答案是 {item[::-1]}。")
        task = dict(prompt=template.format(w=item), answer=item[::-1], reasoning=reasoning,
                    rejected=wrong_reversal(rng, item))
    elif kind == "count":
        tally = " ".join(f"{ch}({i})" for i, ch in enumerate(item, 1))
        n = len(item)
        reasoning = (f"Count one by one: {tally}. There are {n} characters." if lang == "en"
                     else f"逐个数：{tally}。共{n}个字符。")
        wrong = n + 1 if n <= 2 or rng.random() < 0.5 else n - 1
        task = dict(prompt=template.format(s=item), answer=str(n), reasoning=reasoning,
                    rejected=str(wrong))
    elif kind == "poem":
        first, second, title, poet = item
        reasoning = (f"This line is from 《{title}》 by {poet}. The next line is {second}."
                     if lang == "en" else f"这句出自{poet}的《{title}》，下一句是“{second}”。")
        other = rng.choice(pools.train_poem)[1]
        task = dict(prompt=template.format(line=first), answer=second, reasoning=reasoning,
                    rejected=other if other != second else UNHELPFUL[lang])
    else:
        raise ValueError(kind)
    if rng.random() < 0.15:  # some pairs teach "a short wrong-looking answer is worse"
        task["rejected"] = UNHELPFUL[lang]
    return dict(kind=kind, lang=lang, score=task["answer"], **task)

# ---------------------------------------------------------------- records


def user(text):
    return {"role": "user", "content": text}


def assistant(text, reasoning=None):
    msg = {"role": "assistant"}
    if reasoning is not None:
        msg["reasoning_content"] = reasoning
    msg["content"] = text
    return msg


def maybe_system(rng, lang, bot, author, share):
    if rng.random() < share:
        return [{"role": "system",
                 "content": rng.choice(SYSTEM_PROMPTS[lang]).format(bot=bot, author=author)}]
    return []


def random_train_task(rng, kind, lang, pools, bot, author):
    item = (rng.choice(IDENTITY_TRAIN[lang]) if kind == "identity"
            else pools.train_item(rng, kind))
    return make_task(rng, kind, item, lang, pools, bot, author)


def multi_turn(rng, pools, bot, author):
    """2-3 user turns in one language; an addition may get a follow-up "add c to that".

    Only the first turn may ask who the bot is: asking twice reads oddly.
    """
    lang = rng.choice(["en", "zh"])
    msgs = maybe_system(rng, lang, bot, author, share=0.3)
    for turn in range(rng.randint(2, 3)):
        kind = rng.choice(["identity", "add", "reverse", "count", "poem"][turn > 0:])
        task = random_train_task(rng, kind, lang, pools, bot, author)
        msgs += [user(task["prompt"]), assistant(task["answer"])]
        if kind == "add" and rng.random() < 0.5:
            c = rng.randint(1, 99)
            msgs += [user(FOLLOW_UP_ADD[lang].format(c=c)), assistant(str(int(task["answer"]) + c))]
    if rng.random() < 0.3:
        thanks, welcome = THANKS[lang]
        msgs += [user(rng.choice(thanks)), assistant(welcome)]
    return {"conversations": msgs}


def sft_record(task, system=()):
    return {"conversations": [*system, user(task["prompt"]), assistant(task["answer"])]}


def reason_record(task, system=()):
    return {"conversations": [*system, user(task["prompt"]),
                              assistant(task["answer"], reasoning=task["reasoning"])]}


def dpo_record(task, prompt_form):
    if prompt_form:
        return {"prompt": task["prompt"], "chosen": task["answer"], "rejected": task["rejected"]}
    return {"chosen": [user(task["prompt"]), assistant(task["answer"])],
            "rejected": [user(task["prompt"]), assistant(task["rejected"])]}


def calculator_call(i, a, b):
    """An assistant message calling the calculator for a + b (OpenAI's shape: arguments as JSON text), and the tool
    message answering it."""
    call_id = f"call_{i}"
    arguments = json.dumps({"expression": f"{a} + {b}"})
    return [{"role": "assistant", "content": None, "tool_calls": [
                {"id": call_id, "type": "function", "function": {"name": "calculator", "arguments": arguments}}]},
            {"role": "tool", "tool_call_id": call_id, "content": str(a + b)}]


def tool_record(rng, task, follow_up=False):
    """A conversation offered the calculator: an addition calls it (and a follow-up addition calls it again), any
    other task is answered directly."""
    messages = [user(task["prompt"])]
    if task["kind"] != "add":
        return {"tools": [CALCULATOR], "messages": messages + [assistant(task["answer"])]}
    a, b = map(int, re.findall(r"\d+", task["prompt"]))
    messages += calculator_call(0, a, b) + [assistant(str(a + b))]
    if follow_up:
        c = rng.randint(1, 99)
        messages += [user(FOLLOW_UP_ADD[task["lang"]].format(c=c))] + calculator_call(1, a + b, c)
        messages.append(assistant(str(a + b + c)))
    return {"tools": [CALCULATOR], "messages": messages}


def build_tools(rng, pools, bot, author, val_tasks):
    """The tool conversations: train ones of train items, and (for a val loss) the first held-out additions."""
    train = []
    for kind in kinds_in_order(rng, TOOL_TRAIN):
        lang = rng.choice(["en", "zh"])
        if kind == "other":
            kind = rng.choice(["identity", "reverse", "count", "poem"])
        task = random_train_task(rng, kind, lang, pools, bot, author)
        train.append(tool_record(rng, task, follow_up=kind == "add" and rng.random() < TOOL_FOLLOW_UP_SHARE))
    return train, [tool_record(rng, t) for t in val_tasks if t["kind"] == "add"][:TOOL_VAL]


def kinds_in_order(rng, sizes):
    """Each kind repeated sizes[kind] times, shuffled so kinds are mixed."""
    kinds = [k for k, n in sizes.items() for _ in range(n)]
    rng.shuffle(kinds)
    return kinds


def build_train(rng, pools, bot, author):
    sft, reason, dpo = [], [], []
    for kind in kinds_in_order(rng, SFT_TRAIN):
        if kind == "multi":
            sft.append(multi_turn(rng, pools, bot, author))
            continue
        lang = rng.choice(["en", "zh"])
        task = random_train_task(rng, kind, lang, pools, bot, author)
        sft.append(sft_record(task, maybe_system(rng, lang, bot, author, SYSTEM_SHARE)))
    for kind in kinds_in_order(rng, REASON_TRAIN):
        lang = rng.choice(["en", "zh"])
        task = random_train_task(rng, kind, lang, pools, bot, author)
        reason.append(reason_record(task, maybe_system(rng, lang, bot, author, SYSTEM_SHARE)))
    dpo_sizes = {k: DPO_TRAIN // len(VAL) for k in VAL}
    for kind in kinds_in_order(rng, dpo_sizes):
        task = random_train_task(rng, kind, rng.choice(["en", "zh"]), pools, bot, author)
        dpo.append(dpo_record(task, prompt_form=rng.random() < PROMPT_FORM_SHARE))
    return sft, reason, dpo


def build_val(rng, pools, bot, author):
    """One task per held-out item; sft/reason/dpo val all ask exactly these prompts."""
    tasks = []
    for lang in ("en", "zh"):
        tasks += [make_task(rng, "identity", p, lang, pools, bot, author) for p in IDENTITY_VAL[lang]]
    for kind, items in (("add", pools.val_add), ("reverse", pools.val_reverse),
                        ("count", pools.val_count), ("poem", pools.val_poem)):
        tasks += [make_task(rng, kind, item, rng.choice(["en", "zh"]), pools, bot, author)
                  for item in items]
    rng.shuffle(tasks)
    scoring = [{"task": t["kind"], "prompt": t["prompt"], "answer": t["score"]} for t in tasks]
    n_prompt_form = round(len(tasks) * PROMPT_FORM_SHARE)
    dpo = [dpo_record(t, prompt_form=i < n_prompt_form) for i, t in enumerate(tasks)]
    return ([sft_record(t) for t in tasks], [reason_record(t) for t in tasks], dpo, scoring, tasks)

def build_grpo_val(pools, train_files, bot, author, seed=GRPO_VAL_SEED):
    """GRPO_VAL counting tasks ({"task", "prompt", "answer"}) of distinct strings that no train file counts, drawn
    with their own seeded generator after everything else."""
    rng = random.Random(seed)
    quoted = re.compile(r"[“\"]([^”\"]+)[”\"]")
    trained = {m.group(1) for records in train_files.values() for p in user_prompts(records)
               for m in [quoted.search(p)] if m}
    strings = []
    while len(strings) < GRPO_VAL:
        s = pools.train_item(rng, "count")  # (never a string of tasks_val.jsonl either)
        if s not in trained and s not in strings:
            strings.append(s)
    tasks = [make_task(rng, "count", s, rng.choice(["en", "zh"]), pools, bot, author) for s in strings]
    return [{"task": "count", "prompt": t["prompt"], "answer": t["answer"]} for t in tasks]

# ---------------------------------------------------------------- checks and output


def user_prompts(records):
    """Every user-side prompt string of a list of sft/reason/dpo/task records."""
    prompts = set()
    for r in records:
        if isinstance(r.get("prompt"), str):
            prompts.add(r["prompt"])
        for key in ("conversations", "messages", "chosen", "rejected"):
            if isinstance(r.get(key), list):
                prompts.update(m["content"] for m in r[key] if m["role"] == "user")
    return prompts


def check_held_out(train_files, val_files):
    train = set().union(*(user_prompts(r) for r in train_files.values()))
    val = set().union(*(user_prompts(r) for r in val_files.values()))
    leaked = sorted(train & val)
    if leaked:  # raised, not asserted, so that python -O still checks
        raise AssertionError(f"{len(leaked)} val prompts appear in train, e.g. {leaked[:3]}")


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def generate(out_dir, seed=DEFAULT_SEED, bot_name=DEFAULT_BOT_NAME, author=DEFAULT_AUTHOR,
             corpus=DEFAULT_CORPUS):
    """Write the ten chat/task files into out_dir; returns {file name: record count}."""
    rng = random.Random(seed)
    pools = Pools(rng, read_corpus(corpus))  # val items are drawn first, then train avoids them
    sft, reason, dpo = build_train(rng, pools, bot_name, author)
    sft_val, reason_val, dpo_val, tasks_val, val_tasks = build_val(rng, pools, bot_name, author)
    tool, tool_val = build_tools(rng, pools, bot_name, author, val_tasks)

    train_files = {"sft_train.jsonl": sft, "reason_train.jsonl": reason, "dpo_train.jsonl": dpo,
                   "tool_train.jsonl": tool}
    grpo_val = build_grpo_val(pools, train_files, bot_name, author)
    val_files = {"sft_val.jsonl": sft_val, "reason_val.jsonl": reason_val,
                 "dpo_val.jsonl": dpo_val, "tasks_val.jsonl": tasks_val, "tool_val.jsonl": tool_val,
                 "grpo_val.jsonl": grpo_val}
    check_held_out(train_files, val_files)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {**train_files, **val_files}
    for name, records in files.items():
        write_jsonl(out_dir / name, records)
    return {name: len(records) for name, records in files.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ap.add_argument("--bot_name", default=DEFAULT_BOT_NAME)
    ap.add_argument("--author", default=DEFAULT_AUTHOR)
    ap.add_argument("--corpus", default=str(DEFAULT_CORPUS),
                    help="pretrain.jsonl holding the tang300 poems and English fortunes")
    ap.add_argument("--out_dir", default=str(HERE))
    args = ap.parse_args(argv)
    counts = generate(args.out_dir, args.seed, args.bot_name, args.author, args.corpus)
    for name, n in counts.items():
        print(f"{name:20s} {n:6d} records")


if __name__ == "__main__":
    main()
