"""ABI profiles: the kernel releases whose KHO behaviour khofs reproduces."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Profile:
    """What differs between kernel releases' KHO."""
    name: str
    release: str                 # default uname -r of the emulated kernel
    preserve_bits: int           # bits per tracker bitmap (PRESERVE_BITS); radix leaves: 32768
    strict_scratch: bool         # kho_scratch= parsing of 6.18 (zeros ok, no trailing text)
    handover_needs_finalize: bool  # kho_fill_kimage attaches the handover only if finalized
    scratch_fail_warns: bool     # "Failed to reserve scratch area" is logged (6.17+)
    fdt_at_boot: bool = False    # 6.19+: root FDT built in kho_init and edited in place
    has_finalize: bool = True    # out/finalize exists (gone in 7.1)
    compatible: str = "kho-v1"   # KHO_FDT_COMPATIBLE
    sub_prop: str = "fdt"        # KHO_FDT_SUB_TREE_PROP_NAME
    blob_size: bool = False      # kho-v3: children carry blob-size, blobs of any format
    radix: bool = False          # preserved memory as the kho radix tree (7.1)
    kexec_metadata: bool = False  # the kexec-metadata subtree (7.1)
    revival_errno: bool = True   # "disabling KHO revival: ERR" (the number went after v6.19)

    @property
    def found_line(self) -> str:
        """The boot line a handover produces in this release."""
        if self.fdt_at_boot:
            return "KHO: found kexec handover data."
        return "KHO: found kexec handover data. Will skip init for some devices"

    def revival_line(self, err: int) -> str:
        """kho_populate's failure line: from 7.0 on without the error number."""
        if self.revival_errno:
            return f"KHO: disabling KHO revival: {err}"
        return "KHO: disabling KHO revival"

    @property
    def map_error_line(self) -> str:
        """The boot line for a memory map the kernel cannot read."""
        if self.radix:
            return "KHO: failed to get preserved memory map"
        return "KHO: failed to get preserved memory bitmaps"


PROFILES = {
    "6.18": Profile("6.18", "6.18.0-khofs", 4096 * 8, True, True, True),
    "6.16": Profile("6.16", "6.16.0-khofs", 512 * 8, False, False, False),
    "7.0": Profile("7.0", "7.0.0-khofs", 4096 * 8, True, False, True, fdt_at_boot=True,
                   revival_errno=False),
    "7.1": Profile("7.1", "7.1.0-khofs", 4096 * 8, True, False, True, fdt_at_boot=True,
                   has_finalize=False, compatible="kho-v3", sub_prop="preserved-data",
                   blob_size=True, radix=True, kexec_metadata=True, revival_errno=False),
}
DEFAULT_PROFILE = "6.18"


def get_profile(name: str) -> Profile:
    """The profile named name; ValueError naming the known ones otherwise."""
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown ABI profile {name!r} (known: {', '.join(PROFILES)})") from None
