"""The layout keeps its promises: what each folder may import, who knows trio and pyfuse3, who
prints for a user, how long a module may grow, and that every public function is described."""

import ast
from pathlib import Path

import pytest

import khofs

ROOT = Path(khofs.__file__).parent
MODULES = sorted(ROOT.rglob("*.py"))

# What each part may import of khofs (a prefix allows the whole package).
ALLOWED = {
    "khofs.kernel": ("khofs.kernel",),
    "khofs.fs": ("khofs.kernel", "khofs.fs"),
    "khofs.devicetree": ("khofs.kernel", "khofs.devicetree"),
    "khofs.daemon": ("khofs.kernel", "khofs.fs", "khofs.daemon", "khofs.runtime"),
    "khofs.client": ("khofs.runtime", "khofs.devicetree"),
    "khofs.runtime": (),
    "khofs.pytest_plugin": ("khofs.runtime", "khofs.client", "khofs.run"),
    # khofs run's supervisor: host code that reaches the emulated kernel through the control
    # socket; of the kernel it uses only pure rules (syscall constants, the fd-read checks).
    "khofs.run": ("khofs.run", "khofs.runtime", "khofs.client", "khofs.kernel.syscalls"),
}
EVENT_LOOP = ("trio", "pyfuse3")
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = ("khofs",) + path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path):
    """Every module path imports (at the top or inside a function), made absolute."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            if node.level and not node.module:
                yield from (f"{mod}.{a.name}" for a in node.names)
            else:
                yield mod


def part(name: str) -> str | None:
    return next((p for p in sorted(ALLOWED, key=len, reverse=True)
                 if name == p or name.startswith(p + ".")), None)


def test_every_module_is_in_a_part_or_the_cli():
    loose = [module_name(p) for p in MODULES if part(module_name(p)) is None and
             not module_name(p).startswith("khofs.cli") and
             module_name(p) not in ("khofs", "khofs.__main__")]
    assert loose == []


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_stay_within_their_part(path):
    name = module_name(path)
    owner = part(name)
    if owner is None:
        return      # the CLI, khofs/__init__ and __main__ may use everything
    bad = [m for m in imports(path) if m.startswith("khofs") and
           not any(m == a or m.startswith(a + ".") for a in ALLOWED[owner])]
    assert bad == [], f"{name} imports {bad}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_only_the_daemon_and_the_adapter_know_the_event_loop(path):
    name = module_name(path)
    used = sorted({m for m in imports(path) if m.split(".")[0] in EVENT_LOOP})
    if name.startswith("khofs.daemon") or name == "khofs.fs.fuse":
        return
    if name.startswith("khofs.run"):
        assert "pyfuse3" not in used        # the supervisor's loop is trio, it serves no FUSE
        return
    assert used == [], f"{name} imports {used}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_only_the_cli_prints_for_a_user(path):
    name = module_name(path)
    if name.startswith("khofs.cli"):
        return
    # The daemon's log is its stderr; anything else printing would reach a user's terminal.
    to_stdout = [n.lineno for n in ast.walk(ast.parse(path.read_text()))
                 if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "print"
                 and not any(k.arg == "file" for k in n.keywords)]
    assert to_stdout == [], f"{name} prints at lines {to_stdout}"
    if name.startswith(("khofs.kernel", "khofs.devicetree", "khofs.fs.debugfs")):
        printing = [n.lineno for n in ast.walk(ast.parse(path.read_text()))
                    if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "print"]
        assert printing == [], f"{name} prints at lines {printing}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_past_400_lines(path):
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, f"{path.relative_to(ROOT)}: {n} lines"


def test_the_rules_see_real_imports():
    # The scanner itself: a relative import inside a function resolves to its absolute name.
    assert "khofs.devicetree.dts" in set(imports(ROOT / "client.py"))
    assert "khofs.fs.debugfs" in set(imports(ROOT / "daemon" / "serve.py"))
    assert "khofs.runtime" in set(imports(ROOT / "daemon" / "serve.py"))
    assert "trio" in set(imports(ROOT / "fs" / "fuse.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_public_function_says_what_it_does(path):
    missing = []

    def visit(node, prefix):
        for ch in ast.iter_child_nodes(node):
            if isinstance(ch, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) \
                    and not ch.name.startswith("_"):
                if not ast.get_docstring(ch):
                    missing.append(prefix + ch.name)
                if isinstance(ch, ast.ClassDef):
                    visit(ch, prefix + ch.name + ".")
    visit(ast.parse(path.read_text()), "")
    assert missing == [], f"{path.relative_to(ROOT)}: no docstring: {missing}"


# The CLI talks to the daemon through the client and to the kernel through a few public
# calls: the profile table's names, a boot's configuration (kernel/boot.py's BootArgs, what a
# mount and a reboot boot from) and a replay's handover, never a
# Machine's insides or a profile's fields (what the daemon answers says what the kernel does).
# khofs run's supervisor is host code like the client; `khofs image` writes the bytes of
# kernel/bzimage.py's make_image.
CLI_ALLOWED = ("khofs.cli", "khofs.client", "khofs.runtime", "khofs.devicetree",
               "khofs.daemon", "khofs.kernel.profile", "khofs.kernel.machine", "khofs.kernel.boot",
               "khofs.kernel.replay", "khofs.kernel.kstrtox", "khofs.kernel.fdt",
               "khofs.run", "khofs.kernel.bzimage")
CLI_FROM_PROFILE = {"PROFILES", "NO_KHO", "release_profile_name"}
MACHINE_INSIDES = {"machine", "kho_out", "kho_in", "dmesg", "ignored", "kexec_notes",
                   "warnings", "profile"}
CLI_MODULES = [p for p in MODULES if module_name(p).startswith("khofs.cli")]


@pytest.mark.parametrize("path", CLI_MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_cli_uses_public_calls_only(path):
    name = module_name(path)
    bad = [m for m in imports(path) if m.startswith("khofs") and
           not any(m == a or m.startswith(a + ".") for a in CLI_ALLOWED)]
    assert bad == [], f"{name} imports {bad}"
    tree = ast.parse(path.read_text())
    from_profile = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                    and (n.module or "").endswith("kernel.profile") for a in n.names}
    assert from_profile <= CLI_FROM_PROFILE, f"{name} takes {from_profile - CLI_FROM_PROFILE}"
    insides = sorted({f"{n.lineno}: .{n.attr}" for n in ast.walk(tree)
                      if isinstance(n, ast.Attribute) and n.attr in MACHINE_INSIDES})
    assert insides == [], f"{name} reads a Machine's insides at {insides}"


def test_the_cli_rule_sees_a_machines_insides(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("for w in host.machine.warnings():\n    print(w)\n")
    tree = ast.parse(bad.read_text())
    assert sorted(n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
                  and n.attr in MACHINE_INSIDES) == ["machine", "warnings"]
