"""The kernel command line: splitting it like next_arg() and dispatching early parameters."""

# isspace() of the kernel's ctype table (Latin-1), over bytes: not Python's, which also
# counts \x1c-\x1f, nor Unicode's (U+00A0 is the two bytes c2 a0, and only a0 is space).
KERNEL_SPACE = frozenset(b" \t\n\v\f\r\xa0")
_QUOTE, _EQUALS = ord('"'), ord("=")


def kisspace(c: int) -> bool:
    """The kernel's isspace() for one byte."""
    return c in KERNEL_SPACE


def cmdline_bytes(text: str) -> bytes:
    """The bytes the kernel sees: UTF-8, and a byte that is not UTF-8 (a surrogate, as
    Python decodes argv) back as itself."""
    return text.encode("utf-8", "surrogateescape")


def _text(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


def split_cmdline(text: str):
    """[(param, value or None)] in order, split as next_arg() does; `--` ends kernel params."""
    raw = cmdline_bytes(text)
    out = []
    i, n = 0, len(raw)
    while True:
        while i < n and kisspace(raw[i]):
            i += 1
        if i >= n:
            break
        quoted = raw[i] == _QUOTE
        if quoted:
            i += 1
        in_quote = quoted
        start, equals = i, -1
        while i < n and (in_quote or not kisspace(raw[i])):
            # next_arg() keeps `equals` 0 for "none yet": an '=' first in the word is no split.
            if equals < 0 and raw[i] == _EQUALS and i > start:
                equals = i
            if raw[i] == _QUOTE:
                in_quote = not in_quote
            i += 1
        word_end = i
        if quoted and word_end > start and raw[word_end - 1] == _QUOTE:
            word_end -= 1
        if equals < 0:
            param, val = raw[start:word_end], None
        else:
            param, val = raw[start:equals], raw[equals + 1:word_end]
            if val.startswith(b'"'):
                val = val[1:]
                # The closing quote is dropped only when it ends the word.
                if raw[i - 1] == _QUOTE and val.endswith(b'"') and not quoted:
                    val = val[:-1]
        if param == b"--" and val is None:
            break
        out.append((_text(param), None if val is None else _text(val)))
    return out


def parameq(a: str, b: str) -> bool:
    """Parameter names compare with '-' and '_' equal, as parameq() does."""
    return a.replace("-", "_") == b.replace("-", "_")
