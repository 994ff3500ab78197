"""Build data/demo/pretrain.jsonl from the Debian fortune packages.

The demo corpus is real text in two languages: English fortunes (BSD
`fortunes`, `fortunes-min`) and Chinese classical poetry and sayings
(`fortunes-zh`: 唐诗三百首 tang300, 宋词 song100, the `chinese` collection).
See data/demo/README.md for how to fetch and unpack the packages.

    python data/demo/make_corpus.py /tmp/fortunes-x

Output: one {"text": ...} per fortune, UTF-8 (ensure_ascii=False), shuffled
with a fixed seed so the two languages are mixed, at most --max_bytes bytes.
The same input always gives the same bytes.
"""
import argparse
import json
import random
import re
import unicodedata
from pathlib import Path

# Poems that must survive the size cut: make_chat.py builds its poem tasks
# from tang300, and both are small.
KEEP_ALL = ("tang300", "song100")
# ascii-art holds pictures drawn with punctuation, which teach a tiny model
# nothing but long runs of spaces and slashes.
SKIP = ("ascii-art",)

# A fortune separator is a line holding only "%".
SEPARATOR = re.compile(r"^%[ \t]*$", re.MULTILINE)
# Colour codes as in "\x1b[1;33m ... \x1b[m". The final letter is optional
# because the `chinese` file has a few broken codes like "\x1b[;" + "\x1b[m".
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]?")
# Control characters that are neither newline nor tab (bell, stray C1 codes).
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
# Accent marks that the old files overstrike onto a letter: e'\be is é.
OVERSTRIKE_ACCENTS = {"'": "\u0301", "`": "\u0300", "^": "\u0302", ",": "\u0327",
                      '"': "\u0308", "~": "\u0303"}


def find_fortune_files(src_dir):
    """Plain fortune files in .../games/fortunes/ (not .../doc/fortunes/), sorted.

    Skips the .dat indexes and symlinks (Debian ships "x.u8 -> x" links, which
    would only duplicate every file).
    """
    files = []
    for path in Path(src_dir).rglob("*"):
        if (path.parent.name == "fortunes" and path.parent.parent.name == "games"
                and path.is_file() and not path.is_symlink()
                and path.suffix != ".dat" and path.name not in SKIP):
            files.append(path)
    return sorted(files, key=lambda p: (p.name, str(p)))


def decode(raw):
    """UTF-8 if it is, else GB18030 (a superset of GBK/GB2312), else Latin-1."""
    for encoding in ("utf-8", "gb18030"):
        try:
            return raw.decode(encoding)
        except UnicodeDecodeError:
            pass
    return raw.decode("latin-1")


def apply_overstrike(line):
    """Render backspace overstriking the way a terminal would show it.

    The English files underline with "_\\bx" or "____\\b\\b\\b\\bword" and put
    accents on with "e'\\b" style pairs; a character typed over another one
    replaces it, except that an underscore never hides a letter and an accent
    mark combines with the letter.
    """
    if "\b" not in line:
        return line
    cells, pos = [], 0
    for ch in line:
        if ch == "\b":
            pos = max(pos - 1, 0)
            continue
        if pos == len(cells):
            cells.append(ch)
        else:
            cells[pos] = overstrike_cell(cells[pos], ch)
        pos += 1
    return "".join(cells)


def overstrike_cell(old, new):
    if new == "_":
        return old
    if old == "_" or old == new:
        return new
    if old in OVERSTRIKE_ACCENTS:
        return unicodedata.normalize("NFC", new + OVERSTRIKE_ACCENTS[old])
    if new in OVERSTRIKE_ACCENTS:
        return unicodedata.normalize("NFC", old + OVERSTRIKE_ACCENTS[new])
    return new


def fix_mojibake(text):
    """Undo UTF-8 text that was decoded as Latin-1 (once or twice) upstream.

    A few English fortunes hold "donâ\\x80\\x99t" for "don't". C1 control
    characters never occur in real text, so they mark the damaged ones.
    """
    for _ in range(2):
        if not re.search(r"[\x80-\x9f]", text):
            break
        try:
            text = text.encode("latin-1").decode("utf-8")
        except (UnicodeEncodeError, UnicodeDecodeError):
            break
    return text


def clean(fortune):
    text = ANSI_ESCAPE.sub("", fortune)
    text = fix_mojibake(text)
    text = "\n".join(apply_overstrike(line).rstrip() for line in text.split("\n"))
    text = CONTROL.sub("", text)
    return text.strip()


def read_fortunes(path):
    """Cleaned, non-empty fortunes of one file, in file order."""
    text = decode(path.read_bytes()).replace("\r\n", "\n")
    return [t for t in (clean(f) for f in SEPARATOR.split(text)) if t]


def jsonl_line(text):
    return json.dumps({"text": text}, ensure_ascii=False) + "\n"


def select(records, max_bytes, seed):
    """Shuffle (source, text) records; cut to max_bytes keeping all KEEP_ALL poems.

    The cut is a seeded shuffle of the other records, taken in order until the
    next one would not fit, so it samples every source file evenly.
    """
    rng = random.Random(seed)
    keep = [r for r in records if r[0] in KEEP_ALL]
    rest = [r for r in records if r[0] not in KEEP_ALL]
    rng.shuffle(rest)
    used = sum(len(jsonl_line(t).encode()) for _, t in keep)
    chosen = list(keep)
    for source, text in rest:
        size = len(jsonl_line(text).encode())
        if used + size > max_bytes:
            break
        chosen.append((source, text))
        used += size
    rng.shuffle(chosen)
    return chosen


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("src_dir", help="directory where the .deb packages were unpacked (dpkg -x)")
    ap.add_argument("--out", default=str(Path(__file__).with_name("pretrain.jsonl")))
    ap.add_argument("--max_bytes", type=int, default=2_200_000)
    ap.add_argument("--seed", type=int, default=1337)
    args = ap.parse_args()

    files = find_fortune_files(args.src_dir)
    if not files:
        raise SystemExit(f"no fortune files found under {args.src_dir}")
    records, seen, per_file = [], set(), {}
    for path in files:
        fortunes = read_fortunes(path)
        fresh = [t for t in fortunes if t not in seen]  # exact duplicates: first copy wins
        seen.update(fresh)
        records += [(path.name, t) for t in fresh]
        per_file[path.name] = per_file.get(path.name, 0) + len(fresh)

    chosen = select(records, args.max_bytes, args.seed)
    with open(args.out, "w", encoding="utf-8", newline="\n") as f:
        for _, text in chosen:
            f.write(jsonl_line(text))

    kept = {}
    for source, _ in chosen:
        kept[source] = kept.get(source, 0) + 1
    for name in sorted(per_file):
        print(f"{name:16s} {per_file[name]:6d} fortunes, {kept.get(name, 0):6d} kept")
    print(f"wrote {len(chosen)} of {len(records)} fortunes to {args.out} "
          f"({Path(args.out).stat().st_size} bytes)")


if __name__ == "__main__":
    main()
