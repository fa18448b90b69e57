"""The README's five-minute tour, run as written right after ./scripts/try.sh, in a private
mount namespace (so /tmp/khofs is this test's) with its own runtime directory."""

import os
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MARK = "@@khofs-tour-step@@"


def tour() -> list[tuple[str, list[str]]]:
    """[(command, expected output lines)] of the tour's code block."""
    text = (REPO / "README.md").read_text()
    block = text.split("## A five-minute tour", 1)[1].split("```\n", 2)[1]
    steps = []
    for line in block.splitlines():
        if line.startswith("$ "):
            steps.append((line[2:], []))
        else:
            steps[-1][1].append(line)
    return steps


def normal(lines, repo):
    out = []
    for ln in lines:
        ln = re.sub(r"\b[A-Z][a-z]{2} [ \d]\d \d\d:\d\d\b", "DATE", ln)   # ls -l times
        ln = re.sub(r"^bash: line \d+: ", "bash: ", ln)                  # not interactive
        out.append(ln.replace(str(repo), "/path/to/khofs"))
    return out


def test_the_tour_runs_as_written(tmp_path):
    steps = tour()
    assert steps[0][0] == "./scripts/try.sh" and steps[-1][0] == "khofs umount /tmp/khofs"
    script = ["set -u", f"cd {REPO}", f"export KHOFS_RUNTIME_DIR={tmp_path / 'run'}",
              # whatever happens, this namespace's mounts go with it
              "trap '.venv/bin/khofs umount --all >/dev/null 2>&1' EXIT"]
    for cmd, _ in steps:
        script += [cmd, f"echo {MARK}"]
    r = subprocess.run(["unshare", "-m", "--propagation", "private", "bash", "-c",
                        "\n".join(script)], capture_output=False, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=300,
                       env={k: v for k, v in os.environ.items() if k != "KHOFS_RUNTIME_DIR"})
    got = r.stdout.split(MARK + "\n")
    assert len(got) == len(steps) + 1, r.stdout
    for (cmd, want), out in zip(steps, got):
        assert normal(out.splitlines(), REPO) == normal(want, REPO), f"$ {cmd}\n{out}"
    assert got[-1] == ""


def test_try_sh_replaces_a_mount_already_there(tmp_path):
    mnt = tmp_path / "khofs"
    env = dict(os.environ, KHOFS_RUNTIME_DIR=str(tmp_path / "run"))
    try:
        for _ in range(2):
            r = subprocess.run([str(REPO / "scripts" / "try.sh"), str(mnt)], capture_output=True,
                               text=True, timeout=300, env=env)
            assert r.returncode == 0, r.stderr
            assert r.stdout.splitlines()[0] == \
                f"khofs mounted at {mnt} (khofs is {REPO}/.venv/bin/khofs)"
            assert (mnt / "kho" / "out" / "scratch_len").read_text() == \
                "0x1000000\n0x4000000\n0x1000000\n"
    finally:
        subprocess.run([str(REPO / ".venv" / "bin" / "khofs"), "umount", str(mnt)],
                       capture_output=True, timeout=60, env=env)
    with open("/proc/self/mountinfo") as f:
        assert str(mnt) not in f.read()
