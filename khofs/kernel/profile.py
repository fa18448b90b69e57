"""ABI profiles: the kernel releases whose KHO behaviour khofs reproduces."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Profile:
    name: str
    release: str                 # uname -r of the emulated kernel
    preserve_bits: int           # bits per tracker bitmap (PRESERVE_BITS)
    strict_scratch: bool         # kho_scratch= parsing of 6.18 (zeros ok, no trailing text)
    handover_needs_finalize: bool  # kho_fill_kimage attaches the handover only if finalized
    scratch_fail_warns: bool     # "Failed to reserve scratch area" is logged (6.17+)


PROFILES = {
    "6.18": Profile("6.18", "6.18.0-khofs", 4096 * 8, True, True, True),
    "6.16": Profile("6.16", "6.16.0-khofs", 512 * 8, False, False, False),
}
DEFAULT_PROFILE = "6.18"


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown ABI profile {name!r} (known: {', '.join(PROFILES)})") from None
