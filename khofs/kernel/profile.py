"""ABI profiles: the kernel releases whose KHO behaviour khofs reproduces.

Everything that differs between releases is a named field here; kernel code asks the profile
(profile.has_finalize, profile.scratch_files, ...) and never compares profile names. A new
release is one entry in PROFILES.
"""

import re
from dataclasses import dataclass

NO_KHO = "none"          # a kernel before v6.16: no KHO, no kho/ in debugfs
NO_KHO_RELEASE = "6.15.0-khofs"
NO_KHO_KEXEC_FILE_FLAGS = 0xF    # KEXEC_FILE_FLAGS of a kernel before KHO (v6.7 to v6.15)
FIRST_KHO = (6, 16)


@dataclass(frozen=True)
class Profile:
    """What differs between kernel releases' KHO."""
    name: str
    first: tuple                 # (major, minor) of the oldest release it stands for
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
    preserve_phys: bool = False  # 6.16: memblock preserves with kho_preserve_phys
    vmalloc_folios_info: bool = True  # test_kho's folios_info kept with kho_preserve_vmalloc
    # out/ files with the scratch areas' addresses and sizes, and their boot parameter
    scratch_files: tuple = ("scratch_phys", "scratch_len")
    scratch_param: str = "kho_scratch"
    # the log lines that differ
    found_line: str = "KHO: found kexec handover data. Will skip init for some devices"
    revival_errno: bool = True   # "KHO: disabling KHO revival: ERR" (7.1: no number)
    map_error_line: str = "KHO: failed to get preserved memory bitmaps"
    bad_sub_prop_line: str = "KHO: node `{name}`'s prop `fdt` has invalid length: {len}"
    # KEXEC_FILE_FLAGS (inferred, docs/run.md): UNLOAD|ON_CRASH|NO_INITRAMFS|DEBUG, NO_CMA
    # from 6.17, FORCE_DTB from 6.19
    kexec_file_flags: int = 0x1F

    @property
    def release(self) -> str:
        """The default uname -r of the emulated kernel."""
        return f"{self.name}.0-khofs"

    @property
    def can_abort(self) -> bool:
        """out/finalize takes 0 to undo a finalize (up to 6.18; 6.19+ refuse it)."""
        return self.has_finalize and not self.fdt_at_boot

    def revival_line(self, err: int) -> str:
        """kho_populate's failure line."""
        return f"KHO: disabling KHO revival: {err}" if self.revival_errno \
            else "KHO: disabling KHO revival"


_P616 = Profile("6.16", (6, 16), 512 * 8, False, False, False, preserve_phys=True,
                vmalloc_folios_info=False, kexec_file_flags=0xF)
_P618 = Profile("6.18", (6, 18), 4096 * 8, True, True, True)
_P70 = Profile("7.0", (6, 19), 4096 * 8, True, False, True, fdt_at_boot=True, kexec_file_flags=0x3F,
               found_line="KHO: found kexec handover data.",
               bad_sub_prop_line="KHO: node {name} prop {prop} has invalid length: {len}")
_P71 = Profile("7.1", (7, 1), 4096 * 8, True, False, True, fdt_at_boot=True, kexec_file_flags=0x3F,
               has_finalize=False, compatible="kho-v3", sub_prop="preserved-data",
               blob_size=True, radix=True, kexec_metadata=True,
               found_line=_P70.found_line, revival_errno=False,
               map_error_line="KHO: failed to get preserved memory map",
               bad_sub_prop_line=_P70.bad_sub_prop_line)


def _derive(base: Profile, name: str, first: tuple, **changes) -> Profile:
    fields = dict(base.__dict__, name=name, first=first)
    fields.update(changes)
    return Profile(**fields)


# v7.2: linked-block serialization bumped the root FDT to kho-v4.
_P72 = _derive(_P71, "7.2", (7, 2), compatible="kho-v4")
# v7.4: the scratch areas became "boot memory" (debugfs files and parameter renamed).
_P74 = _derive(_P72, "7.4", (7, 4), scratch_files=("bootmem_phys", "bootmem_len"),
               scratch_param="kho_bootmem")

# in the order --abi lists them
PROFILES = {p.name: p for p in (_P618, _P616, _P70, _P71, _P72, _P74)}
DEFAULT_PROFILE = "6.18"


def get_profile(name: str) -> "Profile | None":
    """The profile named name (None for NO_KHO); ValueError naming the known ones otherwise."""
    if name == NO_KHO:
        return None
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown ABI profile {name!r} (known: {', '.join(PROFILES)})") from None


def _version(release: str):
    m = re.match(r"(\d+)\.(\d+)", release)
    return (int(m[1]), int(m[2])) if m else None


def release_profile_name(release: str | None) -> str | None:
    """The profile a uname -r names: NO_KHO before v6.16, None when it has no version (such
    a release is only the name uname -r prints)."""
    ver = _version(release) if release else None
    if ver is None:
        return None
    if ver < FIRST_KHO:
        return NO_KHO
    return max((p for p in PROFILES.values() if p.first <= ver), key=lambda p: p.first).name


def profile_for_release(release: str) -> "Profile | None":
    """The profile of a release; None for a kernel without KHO (before v6.16). A release with
    no version gets the default profile."""
    return get_profile(release_profile_name(release) or DEFAULT_PROFILE)


def kernel_name(abi: str | None, release: str | None) -> str:
    """The profile a boot runs: an explicit abi, else the one its release names, else the
    default."""
    return abi or release_profile_name(release) or DEFAULT_PROFILE


def profiles_of_compatible(compatible: str) -> list:
    """The profiles whose root FDT carries this compatible, oldest first."""
    return sorted((p for p in PROFILES.values() if p.compatible == compatible),
                  key=lambda p: p.first)


def compatibles() -> list:
    """Every root compatible a release has used, oldest first."""
    return list(dict.fromkeys(p.compatible for p in sorted(PROFILES.values(),
                                                           key=lambda p: p.first)))


def scratch_file_pairs() -> tuple:
    """Every (phys, len) pair of out/ file names a release has used for the scratch areas,
    oldest first."""
    return tuple(dict.fromkeys(p.scratch_files for p in sorted(PROFILES.values(),
                                                              key=lambda p: p.first)))


def scratch_files_in(names) -> tuple:
    """The scratch areas' (phys, len) file names among the names of an out/ listing (the
    oldest releases' when it has none)."""
    pairs = scratch_file_pairs()
    return next((pair for pair in pairs if pair[0] in names), pairs[0])


def profile_for_fdt(blob: bytes, cut_short: bool | None = None, out_names=()) -> "Profile | None":
    """The profile most likely to have made a root FDT, None when nothing tells. The
    compatible narrows it; an out/fdt cut short (6.19+ keep the size it had at boot) or not,
    and the scratch file names beside it, narrow it further; the newest left wins. When the
    cut took the compatible with the strings, the oldest release that cuts it is taken."""
    left = [p for p in PROFILES.values() if p.compatible.encode() + b"\0" in blob]
    newest = bool(left)
    if not left and cut_short:
        left = list(PROFILES.values())
    if cut_short is not None and any(p.fdt_at_boot == cut_short for p in left):
        left = [p for p in left if p.fdt_at_boot == cut_short]
    left = [p for p in left if p.scratch_files[0] in out_names] or left
    if not left:
        return None
    return (max if newest else min)(left, key=lambda p: p.first)
