"""Build data/prose/prose.jsonl, a second pretraining corpus of real English prose: the Perl documentation that
Debian's `perl-doc` package ships (bookworm: 5.36.0-7+deb12u4), about 8 MB of text in some 200 manual pages
(tutorials, the FAQ, the language reference). Licence: as Perl itself, GPL-1+ or Artistic (the package's
/usr/share/doc/perl-doc/copyright). The benchmarks of docs/BENCHMARKS.md use it beside the demo corpus; nothing
of it is committed.

    mkdir -p /tmp/perl-doc && cd /tmp/perl-doc
    apt-get update                       # if apt-get download cannot find the package
    apt-get download perl-doc && dpkg -x perl-doc_*.deb x
    cd -                                 # back to the repository root
    .venv/bin/python data/make_prose.py /tmp/perl-doc/x
    .venv/bin/python prepare.py --input=data/prose/prose.jsonl --out_dir=data/prose_pretrain --tokenizer=train \\
        --vocab_size=4096 --val_fraction=0.02

Every usr/share/perl/*/pod/*.pod but the release notes (perl*delta.pod: lists of changes, not prose) becomes
plain text: POD commands give their heading or item text, formatting codes their text (B<bold> -> bold,
L<text|link> -> text, E<lt> -> <; X<> index entries go), verbatim (indented) blocks, mostly code, are dropped.
A record is one =head1 section of a page, its paragraphs joined; sections under 200 characters are dropped. The
records are shuffled with a fixed seed: the same package gives the same bytes.
"""

import argparse
import html
import json
import random
import re
from pathlib import Path

ESCAPES = {"lt": "<", "gt": ">", "verbar": "|", "sol": "/"}
# innermost formatting codes first: B<...> without < or > inside, or the doubled form B<< ... >>
CODE = re.compile(r"([A-Z])<<+\s(.*?)\s>>+|([A-Z])<([^<>]*)>", re.S)


def formatted(text):
    """POD formatting codes replaced by their text, innermost first."""
    def one(m):
        letter, body = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
        if letter == "E":
            return ESCAPES.get(body, html.unescape(f"&{body};") if not body.isdigit() else chr(int(body)))
        if letter in "XZ":
            return ""
        if letter == "L":
            return body.split("|", 1)[0] if "|" in body else body.split("/", 1)[-1].strip('"')
        return body

    while True:
        new = CODE.sub(one, text)
        if new == text:
            return new
        text = new


def sections(pod):
    """The =head1 sections of a POD page as plain text: [(heading, text)]."""
    out, heading, paragraphs, skipping = [], None, [], False
    for block in re.split(r"\n\s*\n", pod):
        if not block.strip():
            continue
        if block.startswith("="):
            command, _, rest = block[1:].partition(" ")
            command = command.split("\n", 1)[0]
            if command in ("begin", "for"):
                skipping = command == "begin"
                continue
            if command == "end":
                skipping = False
                continue
            if command == "head1":
                if heading is not None:
                    out.append((heading, "\n\n".join(paragraphs)))
                heading, paragraphs = formatted(rest.strip()), []
            elif command in ("head2", "head3", "head4", "item") and rest.strip() not in ("*", ""):
                paragraphs.append(formatted(" ".join(rest.split())))
            continue
        if skipping or block[0] in " \t":  # a verbatim block: code, not prose
            continue
        paragraphs.append(formatted(" ".join(block.split())))
    if heading is not None:
        out.append((heading, "\n\n".join(paragraphs)))
    return out


def records(root):
    for path in sorted(Path(root).glob("usr/share/perl/*/pod/*.pod")):
        if re.fullmatch(r"perl\d+delta\.pod", path.name):
            continue
        page = path.stem
        for heading, text in sections(path.read_text(encoding="utf-8", errors="replace")):
            if heading != "NAME" and len(text) >= 200:
                yield {"text": f"{page}: {heading.capitalize()}\n\n{text}"}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("root", help="the unpacked perl-doc package (dpkg -x perl-doc_*.deb ROOT)")
    ap.add_argument("--out", default="data/prose/prose.jsonl")
    ap.add_argument("--seed", type=int, default=1337)
    args = ap.parse_args()
    recs = list(records(args.root))
    if not recs:
        raise SystemExit(f"error: no usr/share/perl/*/pod/*.pod under {args.root}: unpack perl-doc there first")
    random.Random(args.seed).shuffle(recs)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in recs)
    size = sum(len(r["text"].encode()) for r in recs)
    print(f"{args.out}: {len(recs)} records, {size / 1e6:.1f} MB of text")


if __name__ == "__main__":
    main()
