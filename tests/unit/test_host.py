"""Host: one boot event for kexec and reboot; a reboot is the cold boot a mount does."""

import errno
import os

import pytest

from khofs.daemon.host import HANDOVER_FILE, Host
from khofs.kernel.boot import BootArgs
from khofs.kernel.errors import KernelError

ARGS = BootArgs("kho=on reserve_mem=1M:4096:oops", memory=1 << 30)


def finalize(host):
    host.machine.kho_out.set_finalize(1)


def view(machine):
    """What a boot shows: its status and log, and the bytes of its root FDT page."""
    st = machine.status()
    page = machine.kho_out.fdt_page if machine.kho_out else None
    return st, [(line.level, line.text) for line in machine.dmesg], page


def test_every_boot_runs_the_callbacks_once_with_the_new_machine():
    host = Host.boot(ARGS)
    seen = []
    host.on_boot.append(seen.append)
    finalize(host)
    host.kexec_load()
    host.kexec_exec()
    host.reboot()
    assert len(seen) == 2 and seen[-1] is host.machine and host.boots == 3


def test_a_reboot_boots_what_a_fresh_host_does():
    host = Host.boot(ARGS)
    finalize(host)
    host.kexec_load()
    host.kexec_exec()
    host.reboot()
    assert view(host.machine) == view(Host.boot(ARGS).machine)
    host.reboot(cmdline="kho=on", abi="7.1", memory=2 << 30)
    other = ARGS.replace(cmdline="kho=on", abi="7.1", memory=2 << 30)
    assert host.args == other
    assert view(host.machine) == view(Host.boot(other).machine)
    # defaults: what is not given is khofs mount's, not the mount's.
    host.reboot(True, nodes=2)
    assert host.args == BootArgs(nodes=2)


def test_a_kernel_that_cannot_boot_changes_nothing():
    host = Host.boot(ARGS)
    machine, seen = host.machine, []
    host.on_boot.append(seen.append)
    with pytest.raises(KernelError) as e:
        host.reboot(memory=8 << 20)
    assert e.value.errno == errno.EINVAL
    assert host.machine is machine and host.args == ARGS and seen == [] and host.boots == 1
    with pytest.raises(KernelError) as e:
        host.reboot(stat_size="zero")
    assert (e.value.errno, e.value.message) == (errno.EINVAL, "a reboot cannot change stat_size")


def test_a_reboot_drops_the_state_dirs_handover(tmp_path):
    host = Host.boot(ARGS, str(tmp_path))
    finalize(host)
    host.kexec_load()
    host.kexec_exec()
    assert os.path.exists(tmp_path / HANDOVER_FILE)
    host.reboot()
    assert not os.path.exists(tmp_path / HANDOVER_FILE)
    assert Host.boot(ARGS, str(tmp_path)).machine.kexec_count == 0


def test_a_replayed_successor_reboots_as_it_was_mounted_and_takes_no_changes():
    donor = Host.boot(ARGS)
    finalize(donor)
    donor.kexec_load()
    ho = donor.machine.kexec_exec()
    host = Host.boot(BootArgs(handover=ho))
    first = view(host.machine)
    host.machine.kho_out.set_finalize(1)
    host.reboot()
    assert view(host.machine) == first and host.machine.kho_in is not None
    with pytest.raises(KernelError) as e:
        host.reboot(cmdline="kho=on")
    assert "mount anew" in e.value.message
