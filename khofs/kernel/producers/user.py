"""Producers driven from the control plane: user subtrees and fault injection."""

import errno

import libfdt

from ..errors import KernelError
from ..fdt import check_header, totalsize
from ..kho import KhoOut, Producer
from ..physmem import PAGE_SHIFT


class UserSubtree(Producer):
    """A well-behaved kernel producer of an FDT blob given by the user.

    Its pages are allocated at registration; each finalize writes the blob there, preserves
    the pages (unless told not to, to reproduce the classic misuse) and adds the subtree.
    """

    def __init__(self, kho: KhoOut, name: str, blob: bytes, preserve: bool = True):
        # kho-v3 carries the size: any blob will do there. Before, it must be an FDT.
        if not blob or (not kho.profile.blob_size and
                        (check_header(blob) != 0 or totalsize(blob) != len(blob))):
            if kho.profile.blob_size:
                what = "an empty blob"
            elif check_header(blob) != 0:
                # libfdt's name for it, as dump and diff say it
                what = f"not a valid FDT blob, {libfdt.fdt_strerror(check_header(blob))}"
            else:
                what = f"not a valid FDT blob, its header says {totalsize(blob)} bytes"
            raise KernelError(errno.EINVAL, f"subtree {name!r}: {what} ({len(blob)} bytes)")
        self.name, self.blob, self.preserve = name, bytes(blob), preserve
        self.order = max(0, (len(blob) - 1).bit_length() - PAGE_SHIFT)
        self.phys = kho.pages.alloc_pages(self.order)

    def init_subtree(self, kho: KhoOut) -> None:
        """6.19+: a producer adds its subtree when it registers, not at finalize."""
        kho.mem.write(self.phys, self.blob)
        if self.preserve:
            kho.preserve_folio(self.phys, self.order)
        try:
            kho.add_subtree(self.name, self.phys, len(self.blob))
        except KernelError:
            if self.preserve:
                kho.unpreserve_folio(self.phys, self.order)
            raise

    def remove_subtree(self, kho: KhoOut) -> None:
        """Remove the subtree and give back its preservation."""
        kho.remove_subtree(self.phys)
        if self.preserve:
            kho.unpreserve_folio(self.phys, self.order)

    def finalize(self, kho: KhoOut) -> None:
        """Write the blob into its pages and add it as a subtree."""
        kho.mem.write(self.phys, self.blob)
        if self.preserve:
            kho.preserve_folio(self.phys, self.order)
        kho.add_subtree(self.name, self.phys)

    def release(self, kho: KhoOut) -> None:
        """Free the blob's pages."""
        kho.pages.free_pages(self.phys, self.order)


class FailNext(Producer):
    """Fault injection: the next finalize (or abort) fails with `err`, like a failing producer.

    It sits first on the chain, so no other producer has run when it fails.
    """

    name = "fault"

    def __init__(self, op: str, err: int):
        self.op, self.err = op, err

    def _fire(self, kho: KhoOut, op: str):
        if op == self.op:
            kho.unregister_notifier(self)
            raise KernelError(self.err, f"injected {op} failure")

    def finalize(self, kho):
        """Fail this finalize if a failure was asked for."""
        self._fire(kho, "finalize")

    def abort(self, kho):
        """Fail this abort if a failure was asked for."""
        self._fire(kho, "abort")


def valid_node_name(name: str) -> bool:
    """A node name the kernel's FDT and debugfs both accept."""
    return 0 < len(name) <= 31 and name.isascii() and all(c.isalnum() or c in ",._+-@" for c in name)
