"""The kernel command line: splitting it like next_arg() and dispatching early parameters."""

# isspace() of the kernel's ctype table (Latin-1): not Python's, which also counts \x1c-\x1f.
KERNEL_SPACE = frozenset(" \t\n\v\f\r\xa0")


def kisspace(c: str) -> bool:
    return c in KERNEL_SPACE


def split_cmdline(text: str):
    """[(param, value or None)] in order, split as next_arg() does; `--` ends kernel params."""
    out = []
    i, n = 0, len(text)
    while True:
        while i < n and kisspace(text[i]):
            i += 1
        if i >= n:
            break
        quoted = text[i] == '"'
        if quoted:
            i += 1
        in_quote = quoted
        start, equals = i, -1
        while i < n and (in_quote or not kisspace(text[i])):
            # next_arg() keeps `equals` 0 for "none yet": an '=' first in the word is no split.
            if equals < 0 and text[i] == "=" and i > start:
                equals = i
            if text[i] == '"':
                in_quote = not in_quote
            i += 1
        word_end = i
        if quoted and word_end > start and text[word_end - 1] == '"':
            word_end -= 1
        if equals < 0:
            param, val = text[start:word_end], None
        else:
            param, val = text[start:equals], text[equals + 1:word_end]
            if val.startswith('"'):
                val = val[1:]
                # The closing quote is dropped only when it ends the word.
                if text[i - 1] == '"' and val.endswith('"') and not quoted:
                    val = val[:-1]
        if param == "--" and val is None:
            break
        out.append((param, val))
    return out


def parameq(a: str, b: str) -> bool:
    """Parameter names compare with '-' and '_' equal, as parameq() does."""
    return a.replace("-", "_") == b.replace("-", "_")
