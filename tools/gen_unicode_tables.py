#!/usr/bin/env python3
"""Generates unicode_tables.h, the Unicode class tables of tokenizer.c's
byte-level pre-tokenizer and the tables of its NFC normalizer.

The GPT-2 pre-tokenizer regex splits text by four classes of character:
letters \\p{L}, numbers \\p{N}, white space \\s, and everything else; the
Digits pre-tokenizer (SmolLM2) isolates every character for which Rust's
char::is_numeric holds. The classes are those of the regex engine inside the
Hugging Face `tokenizers` library (Oniguruma) and of the Rust it was built
with, whose Unicode versions need not be Python's. So when `tokenizers` is
importable the classes are measured from it, one probe per code point, and
tokenizer.c then agrees with it exactly; otherwise they come from Python's
unicodedata (general categories L*, N*, and the White_Space list).

The NFC tables (Qwen2's normalizer) are canonical combining classes,
one-level canonical decompositions and the pairs NFC composes, from
unicodedata; when `tokenizers` is importable its NFC and NFD normalizers
(Rust's unicode-normalization crate) decide which marks, decompositions and
pairs are kept, so a character newer than that crate's tables stays as it
is and counts as a starter, as it does there. Hangul syllables are left to tokenizer.c's arithmetic.

  python3 tools/gen_unicode_tables.py          print unicode_tables.h
  python3 tools/gen_unicode_tables.py --write  write it
"""

import sys
import unicodedata
from pathlib import Path


WHITE_SPACE = [0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B),
               0x2028, 0x2029, 0x202F, 0x205F, 0x3000]


def code_points():
    return (c for c in range(0x110000) if not 0xD800 <= c < 0xE000)


def classes_from_unicodedata():
    letter, number, space, numeric = set(), set(), set(WHITE_SPACE), set()
    for c in code_points():
        cat = unicodedata.category(chr(c))
        if cat[0] == "L":
            letter.add(c)
        elif cat[0] == "N":
            number.add(c)
            numeric.add(c)
    return letter, number, space, numeric


def classes_from_tokenizers():
    from tokenizers import pre_tokenizers

    bl = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True).pre_tokenize_str
    digits = pre_tokenizers.Digits(individual_digits=True).pre_tokenize_str
    letter, number, other, numeric = set(), set(), set(), set()
    for c in code_points():
        ch = chr(c)
        if len(bl("a" + ch)) == 1:      # a letter run continues
            letter.add(c)
        elif len(bl("1" + ch)) == 1:    # a number run continues
            number.add(c)
        elif len(bl("!" + ch)) == 1:    # an "other" run continues
            other.add(c)
        if len(digits("a" + ch)) == 2:  # isolated by Digits
            numeric.add(c)
    space = set(code_points()) - letter - number - other
    return letter, number, space, numeric


def ranges(s):
    out = []
    for c in sorted(s):
        if out and out[-1][1] == c - 1:
            out[-1][1] = c
        else:
            out.append([c, c])
    return out


def c_table(name, s, comment):
    rs = ranges(s)
    lines = [f"/* {comment}: {len(s)} code points in {len(rs)} ranges */",
             f"static const uint32_t {name}[][2] = {{"]
    row = []
    for lo, hi in rs:
        row.append(f"{{0x{lo:X}, 0x{hi:X}}}")
        if len(row) == 6:
            lines.append("    " + ", ".join(row) + ",")
            row = []
    if row:
        lines.append("    " + ", ".join(row) + ",")
    lines.append("};")
    return "\n".join(lines) + "\n"


HANGUL = range(0xAC00, 0xAC00 + 11172)


def nfc_tables(nfc, nfd):
    """(combining classes {cp: ccc != 0}, decompositions {cp: (a,) or (a, b)},
    compositions {(a, b): c}, the worst growth in UTF-8 bytes, the code points
    that may change or be changed by a neighbour: marks, those NFC maps
    elsewhere, and those that compose with the character before, Hangul's
    vowel and trailing jamo included), as nfc and nfd (str -> str) normalize."""
    ccc = {c: unicodedata.combining(chr(c)) for c in code_points() if unicodedata.combining(chr(c))}

    def is_mark(c):   # nfc reorders or composes across it: its class is not 0 there
        text = "a" + chr(c) + ("\u0323" if ccc[c] > 220 else "\u0301")
        return nfc(text) != text

    ccc = {c: k for c, k in ccc.items() if is_mark(c)}
    decomp, compose = {}, {}
    for c in code_points():
        ch = chr(c)
        d = unicodedata.decomposition(ch)
        if c in HANGUL or not d or d.startswith("<") or nfd(ch) == ch:
            continue
        decomp[c] = tuple(int(x, 16) for x in d.split())
        if len(decomp[c]) == 2 and nfc("".join(map(chr, decomp[c]))) == ch:
            compose[decomp[c]] = c

    def full(c):
        return [x for y in decomp[c] for x in full(y)] if c in decomp else [c]

    for c in code_points():
        if c not in HANGUL:
            assert "".join(map(chr, full(c))) == nfd(chr(c)), hex(c)
    utf8 = lambda cps: len("".join(map(chr, cps)).encode())
    assert all(ccc.get(c, 0) == 0 and utf8([c]) <= utf8(ab) for ab, c in compose.items())
    growth = max(-(-utf8(full(c)) // utf8([c])) for c in decomp)
    seconds = {b for a, b in compose} | set(range(0x1161, 0x1176)) | set(range(0x11A8, 0x11C3))
    unstable = {c for c in code_points() if c in ccc or c in seconds or nfc(chr(c)) != chr(c)}
    assert min(unstable) >= 0x80
    return ccc, decomp, compose, growth, unstable


def c_rows(name, ctype, rows, comment):
    lines = [f"/* {comment}: {len(rows)} */", f"static const {ctype} {name}[][{len(rows[0])}] = {{"]
    cells = ["{" + ",".join(f"0x{x:X}" for x in r) + "}" for r in rows]
    for i in range(0, len(cells), 6):
        lines.append("    " + ",".join(cells[i:i + 6]) + ",")
    lines.append("};")
    return "\n".join(lines) + "\n"


def c_nfc(source, nfc, nfd):
    ccc, decomp, compose, growth, unstable = nfc_tables(nfc, nfd)
    differ = [c for c in code_points() if nfd(chr(c)) != unicodedata.normalize("NFD", chr(c))]
    starters = [c for c in code_points() if unicodedata.combining(chr(c)) and c not in ccc]
    if differ or starters:
        print(f"note: NFD differs from unicodedata {unicodedata.unidata_version} on {len(differ)} "
              f"({', '.join('%X' % c for c in differ[:6])}...); {len(starters)} of its marks are starters "
              f"({', '.join('%X' % c for c in starters[:6])}...)", file=sys.stderr)
    ccc_rows = []
    for c in sorted(ccc):
        if ccc_rows and ccc_rows[-1][1] == c - 1 and ccc_rows[-1][2] == ccc[c]:
            ccc_rows[-1][1] = c
        else:
            ccc_rows.append([c, c, ccc[c]])
    text = f"/* NFC, {source};\n   Hangul syllables are computed, not listed. */\n"
    text += c_rows("UNI_CCC", "uint32_t", ccc_rows, "{first, last, class}: canonical combining classes but 0")
    text += "\n" + c_rows("UNI_DECOMP", "uint32_t", [(c, *decomp[c], 0)[:3] for c in sorted(decomp)],
                          "{c, a, b}: c decomposes to a b (b = 0: to a alone), one level")
    text += "\n" + c_rows("UNI_COMPOSE", "uint32_t", [(a, b, compose[a, b]) for a, b in sorted(compose)],
                          "{a, b, c}: NFC composes a b into c")
    text += (f"\n/* NFC's output is at most this many times its input's UTF-8 bytes */\n"
             f"#define UNI_NFC_MAX_GROWTH {growth}\n\n")
    text += c_table("UNI_NFC_UNSTABLE", unstable, "text without these is its own NFC")
    return text


def main():
    try:
        import tokenizers
        from tokenizers import normalizers
        source = f"measured from tokenizers {tokenizers.__version__}"
        letter, number, space, numeric = classes_from_tokenizers()
        nfc, nfd = normalizers.NFC().normalize_str, normalizers.NFD().normalize_str
        nfc_source = (f"Python's unicodedata {unicodedata.unidata_version} "
                      f"as tokenizers {tokenizers.__version__} applies it")
    except ImportError:
        source = f"from Python's unicodedata {unicodedata.unidata_version}"
        letter, number, space, numeric = classes_from_unicodedata()
        nfc, nfd = (lambda s: unicodedata.normalize("NFC", s)), (lambda s: unicodedata.normalize("NFD", s))
        nfc_source = f"from Python's unicodedata {unicodedata.unidata_version}"
    ref = classes_from_unicodedata()
    for name, mine, theirs in zip(("letters", "numbers", "spaces", "numeric"), (letter, number, space, numeric), ref):
        extra, missing = sorted(mine - theirs), sorted(theirs - mine)
        if extra or missing:
            print(f"note: {name} differ from unicodedata {unicodedata.unidata_version}: "
                  f"{len(extra)} more ({', '.join('%X' % c for c in extra[:6])}...), "
                  f"{len(missing)} fewer ({', '.join('%X' % c for c in missing[:6])}...)", file=sys.stderr)
    text = ("/* unicode_tables.h: the Unicode classes of tokenizer.c's byte-level\n"
            "   pre-tokenizer, as sorted ranges of code points, and its NFC tables,\n"
            "   sorted by their first column. Generated by\n"
            "   tools/gen_unicode_tables.py: do not edit by hand.\n"
            f"   Classes {source}. */\n\n")
    text += c_table("UNI_LETTER", letter, "\\p{L}") + "\n"
    text += c_table("UNI_NUMBER", number, "\\p{N}") + "\n"
    text += c_table("UNI_SPACE", space, "\\s") + "\n"
    if numeric == number:  # one table serves both when they agree, as they do today
        text += "/* Rust's char::is_numeric (the Digits pre-tokenizer) holds exactly for \\p{N} */\n"
        text += "#define UNI_NUMERIC UNI_NUMBER\n"
    else:
        text += c_table("UNI_NUMERIC", numeric, "Rust's char::is_numeric (the Digits pre-tokenizer)")
    text += "\n" + c_nfc(nfc_source, nfc, nfd)
    if "--write" in sys.argv[1:]:
        path = Path(__file__).resolve().parent.parent / "unicode_tables.h"
        path.write_text(text)
        print(f"wrote {path}", file=sys.stderr)
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
