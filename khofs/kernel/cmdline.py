"""The kernel command line: splitting it like next_arg() and dispatching early parameters."""


def split_cmdline(text: str):
    """[(param, value or None)] in order; double quotes group, `--` ends kernel parameters."""
    out = []
    i, n = 0, len(text)
    while i < n:
        while i < n and text[i].isspace():
            i += 1
        if i >= n:
            break
        in_quote = False
        start = i
        while i < n and (in_quote or not text[i].isspace()):
            if text[i] == '"':
                in_quote = not in_quote
            i += 1
        word = text[start:i]
        if word == "--":
            break
        if "=" in word:
            param, val = word.split("=", 1)
            if len(val) >= 2 and val[0] == '"' and val[-1] == '"':
                val = val[1:-1]
            elif param.startswith('"'):
                param = param[1:]
                if val.endswith('"'):
                    val = val[:-1]
        else:
            param, val = word.strip('"'), None
        out.append((param, val))
    return out


def parameq(a: str, b: str) -> bool:
    """Parameter names compare with '-' and '_' equal, as parameq() does."""
    return a.replace("-", "_") == b.replace("-", "_")
