"""What khofs asks of the kernel at INIT, on top of libfuse's defaults."""

from khofs import libfuse

ALL = 0x73fffffb        # what a 6.18 kernel offered in a test mount (libfuse's debug log)


def test_every_listing_is_a_readdirplus_and_dot_lookups_are_answered():
    want = libfuse.negotiate(ALL, libfuse.CAP_READDIRPLUS_AUTO)
    assert want & libfuse.CAP_READDIRPLUS
    assert want & libfuse.CAP_EXPORT_SUPPORT
    assert not want & libfuse.CAP_READDIRPLUS_AUTO


def test_nothing_the_kernel_lacks_is_asked_for():
    assert libfuse.negotiate(0, 0) == 0
    assert libfuse.negotiate(libfuse.CAP_READDIRPLUS, 1) == libfuse.CAP_READDIRPLUS | 1
