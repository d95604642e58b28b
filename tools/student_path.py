#!/usr/bin/env python3
"""make student-path: how much of run.c a student reads to follow forward().

Prints the line where forward_tokens() starts and the student's path: the
top-level definitions (functions, structs, enums, #defines, file-scope
variables) read to follow forward() for an f32 model, each with the comment
right above it; and the same count with loading and allocation added (the
roots load_transformer() and alloc_run_state()). From its roots it takes in
every definition whose name one on it uses (an identifier outside comments
and strings), with these rules:

- the kernel table `kernels` is followed to its plain f32 entries: of each
  brace list inside its initializer (indexed by weight type) the entry at
  WEIGHT_F32's place alone, and the entries outside such lists (attention);
- --trace is not on the path: statements under `if (...trace...)` are not
  followed, nor the Trace type that the run state only points to;
- the appendix (from the last `#ifndef PLAIN`) and all after main() (the GGUF
  and legacy readers, where parse_checkpoint() dispatches on the header's
  format) are never on it; nor are prototypes, nor names that run.c does not
  define (tokenizer.c's, libc's).

With --renumber it rewrites the lines that the table of kernels at the head
of run.c's appendix cites ("lanes8_avx2 (line N)") to where each is defined.
"""

import re
import sys

MODEL_ROOTS = ("forward",)                               # the model: the target is on these
LOADING_ROOTS = ("forward", "load_transformer", "alloc_run_state")  # and how it is loaded and given memory
KERNEL_TABLE, OFF_PATH, TARGET = "kernels", {"Trace"}, 600
IDENT = re.compile(r"[A-Za-z_]\w*")
# A statement or block under `if (...trace...)` (one level of parentheses inside the condition).
CONDITION = r"\((?:[^()]|\([^()]*\))*trace(?:[^()]|\([^()]*\))*\)"
TRACE_HOOK = re.compile(r"\bif\s*" + CONDITION + r"\s*(?:\{[^{}]*\}|[^;{}]*;)", re.I)
NOT_CODE = re.compile(r'//[^\n]*|/\*.*?\*/|"(?:\\.|[^"\\\n])*"|\'(?:\\.|[^\'\\\n])*\'', re.S)


def closing(code, at):
    """The index just past the } that closes the { at code[at]."""
    depth = 0
    for i in range(at, len(code)):
        depth += (code[i] == "{") - (code[i] == "}")
        if depth == 0:
            return i + 1
    raise ValueError(f"a {{ that is never closed (line {code.count(chr(10), 0, at) + 1})")


def names_defined(statement):
    """The names a top-level statement defines: none for a prototype or a
    preprocessor line other than #define."""
    if statement.startswith("#"):
        return re.findall(r"^#\s*define\s+(\w+)", statement)
    # the statement without __attribute__((...)), its braces emptied
    flat, at = re.sub(r"__attribute__\s*\(\((?:[^()]|\([^()]*\))*\)\)", "", statement), 0
    while (at := flat.find("{", at)) >= 0:
        flat, at = flat[:at + 1] + flat[closing(flat, at) - 1:], at + 2
    if flat.endswith("{}") and flat[:flat.index("{")].rstrip().endswith(")"):  # a function
        return IDENT.findall(flat[:flat.index("(")])[-1:]
    if re.match(r"(typedef\s+)?enum\b[^{]*\{", statement):  # its constants
        return re.findall(r"[{,]\s*([A-Za-z_]\w*)", statement[:closing(statement, statement.index("{"))])
    if flat.startswith("typedef"):                        # a function's type: the name before (
        flat = flat.split("(")[0]
    declarator = flat.split("=")[0]                       # a type or variable, unless a prototype
    return [] if "(" in declarator else IDENT.findall(declarator.split("[")[0])[-1:]


def statement_end(code, at):
    """The end of the top-level statement at code[at]: of a preprocessor line
    (continuations included), a function's closing brace, or a ; at depth 0."""
    if code[at] == "#":
        return re.compile(r"(?:[^\n]*\\\n)*[^\n]*").match(code, at).end()
    depth = 0
    for end in range(at, len(code)):
        if code[end] == "{" and depth == 0 and code[at:end].rstrip().endswith(")"):
            return closing(code, end)
        depth += (code[end] in "({[") - (code[end] in ")}]")
        if code[end] == ";" and depth == 0:
            return end + 1
    return len(code)


def definitions(text):
    """The top-level definitions of the C text: (names, first line with the
    comment right above, line of the code, last line, code without comments
    and strings), lines counted from 1."""
    code = NOT_CODE.sub(lambda m: re.sub(r"[^\n]", " ", m.group()), text)
    lines, code_lines, found, at = text.split("\n"), code.split("\n"), [], 0
    while next_code := re.compile(r"\S").search(code, at):
        at, end = next_code.start(), statement_end(code, next_code.start())
        first = line = code.count("\n", 0, at)
        while first > 0 and lines[first - 1].strip() and not code_lines[first - 1].strip():
            first -= 1
        if names := names_defined(code[at:end].strip()):
            found.append((names, first + 1, line + 1, code.count("\n", 0, end - 1) + 1, code[at:end]))
        at = end
    return found


def plain_f32_entries(code, f32_index):
    """The kernel table's code with each brace list inside its initializer
    cut to its entry at WEIGHT_F32's place."""
    head, _, init = code.partition("=")
    inner = init[init.find("{") + 1:init.rfind("}")]
    def f32_entry(brace_list):
        return "".join(brace_list.group(1).split(",")[f32_index:f32_index + 1])
    return head + re.sub(r"\{([^{}]*)\}", f32_entry, inner)


def student_path(text, roots=MODEL_ROOTS):
    """The definitions on the path from roots, as (first line, name, last
    line), and the line where forward_tokens() is defined."""
    defs = definitions(text)
    cut = [text.count("\n", 0, m.start()) + 1 for m in re.finditer(r"^#\s*ifndef\s+PLAIN\b", text, re.M)][-1:]
    cut = min(cut + [last + 1 for names, _, _, last, _ in defs if "main" in names], default=len(text))
    by_name, f32_index = {}, 0
    for names, first, _, last, code in defs:
        f32_index = names.index("WEIGHT_F32") if "WEIGHT_F32" in names else f32_index
        for name in set(names) - OFF_PATH if last < cut else ():
            by_name.setdefault(name, []).append((first, last, names, code))
    if missing := [root for root in roots if root not in by_name]:
        raise ValueError(f"no definition of {', '.join(missing)} before the appendix and main()")
    path, todo = {}, list(roots)
    while todo:
        for first, last, names, code in by_name[todo.pop()]:
            if first not in path:
                path[first] = (names[0] + (", ..." if len(names) > 1 else ""), last)
                code = plain_f32_entries(code, f32_index) if KERNEL_TABLE in names else code
                todo += [used for used in set(IDENT.findall(TRACE_HOOK.sub("", code))) if used in by_name]
    starts = [line for names, _, line, _, _ in defs if "forward_tokens" in names]
    return sorted((first, name, last) for first, (name, last) in path.items()), (starts or [None])[0]


TABLE_START, CITED = "What runs where", re.compile(r"(\w+)((?:\(\))?,? \(?line )(\d+)")


def renumbered(text):
    """run.c with the lines that the appendix's table of kernels cites (its
    head, from "What runs where" to the next #ifndef PLAIN) set to where each
    named function is defined."""
    start = text.index(TABLE_START)
    end = text.index("#ifndef PLAIN", start)
    starts = {}
    for names, _, line, _, code in definitions(text):
        if "{" in code:
            starts.setdefault(names[0], line)
    def cite(m):
        if m.group(1) not in starts:
            raise ValueError(f"the table of kernels cites {m.group(1)}, which run.c does not define")
        return f"{m.group(1)}{m.group(2)}{starts[m.group(1)]}"
    return text[:start] + CITED.sub(cite, text[start:end]) + text[end:]


def lines_of(path):
    """The lines the path's definitions cover."""
    return len({line for first, _, last in path for line in range(first, last + 1)})


def main(argv):
    renumber = argv[1:2] == ["--renumber"]
    argv = argv[:1] + argv[1 + renumber:]
    if len(argv) != 2:
        print("usage: python3 tools/student_path.py [--renumber] run.c", file=sys.stderr)
        return 2
    try:
        with open(argv[1], encoding="utf-8") as f:
            text = f.read()
        if renumber:
            with open(argv[1], "w", encoding="utf-8") as f:
                f.write(renumbered(text))
            return 0
        path, forward_tokens = student_path(text)
        with_loading, _ = student_path(text, LOADING_ROOTS)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        print(f"student_path.py: {argv[1]}: {getattr(e, 'strerror', None) or e}", file=sys.stderr)
        return 1
    print(f"{'definition':<28} {'first line':>10} {'lines':>6}")
    print("".join(f"{name:<28} {first:>10} {last - first + 1:>6}\n" for first, name, last in path), end="")
    print(f"forward_tokens() starts at line {forward_tokens} (target {TARGET})")
    print(f"student's path to follow forward(): {lines_of(path)} lines (target {TARGET})")
    print(f"with loading and allocation (load_transformer(), alloc_run_state()): {lines_of(with_loading)} lines")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
