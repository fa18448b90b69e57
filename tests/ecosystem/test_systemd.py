"""systemd: the readiness protocol against a fake $NOTIFY_SOCKET, and the unit files."""

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ecohelp import KHOFS, mounted

pytestmark = pytest.mark.fuse
UNITS = Path(__file__).resolve().parents[2] / "systemd"


def test_notify_ready_then_stopping(mnt, tmp_path):
    sock_path = str(tmp_path / "notify")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(sock_path)
    s.settimeout(30)
    env = dict(os.environ, NOTIFY_SOCKET=sock_path)
    p = subprocess.Popen([*KHOFS, "mount", "--foreground", str(mnt)], env=env,
                         stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        ready = s.recv(4096).decode()
        # READY=1 only once the mount and the control socket answer.
        assert "READY=1" in ready.split("\n")
        assert f"MAINPID={p.pid}" in ready.split("\n")
        assert os.listdir(mnt) == ["kho"]
        from khofs import Client
        with Client(str(mnt)) as c:
            assert c.status()["kho_enabled"] is True
        p.send_signal(signal.SIGTERM)
        assert s.recv(4096).decode() == "STOPPING=1"
        assert p.wait(15) == 0
        assert not mounted(mnt)
    finally:
        if p.poll() is None:
            p.kill()
        s.close()


def test_abstract_notify_socket(mnt):
    name = f"khofs-test-{os.getpid()}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind("\0" + name)
    s.settimeout(30)
    env = dict(os.environ, NOTIFY_SOCKET="@" + name)
    p = subprocess.Popen([*KHOFS, "mount", "--foreground", str(mnt)], env=env,
                         stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert "READY=1" in s.recv(4096).decode()
        p.send_signal(signal.SIGINT)
        assert s.recv(4096).decode() == "STOPPING=1"
        assert p.wait(15) == 0
    finally:
        if p.poll() is None:
            p.kill()
        s.close()


def test_units_keep_the_mount_visible():
    banned = ("PrivateMounts", "PrivateTmp", "PrivateDevices", "ProtectSystem", "ProtectHome",
              "ReadOnlyPaths", "InaccessiblePaths", "ReadWritePaths", "TemporaryFileSystem",
              "ProtectKernelTunables", "ProtectControlGroups", "ProtectKernelModules",
              "MountFlags")
    for unit in ("khofs.service", "khofs@.service"):
        text = (UNITS / unit).read_text()
        assert "Type=notify" in text
        assert "--foreground" in text
        for key in banned:
            assert f"\n{key}=" not in text, f"{unit}: {key}= would hide the mount from the host"


def test_systemd_analyze_verify(tmp_path):
    khofs_bin = Path(sys.executable).with_name("khofs")
    for unit in ("khofs.service", "khofs@.service"):
        text = (UNITS / unit).read_text().replace("/usr/local/bin/khofs", str(khofs_bin))
        (tmp_path / unit).write_text(text)
    r = subprocess.run(["systemd-analyze", "verify", "./khofs.service", "./khofs@mnt-khofs.service"],
                       cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == ""
