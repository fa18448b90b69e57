"""The 7.1 preservation tracker: the kho radix tree, live in (simulated) memory.

key = (1 << (52 - order)) | (phys >> (12 + order)); levels 5..1 are 512-entry tables of
physical addresses, level 0 leaves are one-page bitmaps of 32768 bits. The next kernel walks
the tree from the root whose address the root FDT carries from boot. As in MemTracker,
ranges become bitmap slices: nothing is per page.
"""

import struct

from .memtrack import MapError, PageRanges, _set_bits, bitmap_runs, merge_runs
from .physmem import PAGE_SHIFT, PAGE_SIZE, Kmalloc, PhysMem

KHO_ORDER_0_LOG2 = 64 - PAGE_SHIFT                     # 52
KHO_TABLE_SIZE_LOG2 = 9                                 # 512 entries
KHO_BITMAP_SIZE_LOG2 = PAGE_SHIFT + 3                   # 32768 bits
KHO_TREE_MAX_DEPTH = -(-(KHO_ORDER_0_LOG2 - KHO_BITMAP_SIZE_LOG2) // KHO_TABLE_SIZE_LOG2) + 1  # 6
LEAF_BITS = 1 << KHO_BITMAP_SIZE_LOG2
TABLE = struct.Struct(f"<{1 << KHO_TABLE_SIZE_LOG2}Q")


def encode_key(phys: int, order: int) -> int:
    """The radix key of an order-`order` block at phys."""
    return (1 << (KHO_ORDER_0_LOG2 - order)) | (phys >> (PAGE_SHIFT + order))


def decode_key(key: int) -> tuple[int, int]:
    """(phys, order) of a key; the order bit shifts out of the 64-bit address."""
    order = KHO_ORDER_0_LOG2 - key.bit_length() + 1
    return (key << (PAGE_SHIFT + order)) & ((1 << 64) - 1), order


def table_index(key: int, level: int) -> int:
    """The index of key in a table at level."""
    return (key >> ((level - 1) * KHO_TABLE_SIZE_LOG2 + KHO_BITMAP_SIZE_LOG2)) % 512


class RadixTracker(PageRanges):
    """kho_radix_tree: the root from kzalloc, nodes and leaves from get_zeroed_page."""

    bits = LEAF_BITS

    def __init__(self, mem: PhysMem, kmalloc: Kmalloc):
        self.mem = mem
        self.kmalloc = kmalloc
        self.root = kmalloc.kzalloc(PAGE_SIZE)
        self.leaves: dict[int, int] = {}          # key >> 15 -> leaf phys (the walk's cache)
        self._nodes: dict[tuple, int] = {}        # (level, key prefix) -> table phys

    def _leaf(self, prefix: int) -> int:
        leaf = self.leaves.get(prefix)
        if leaf is not None:
            return leaf
        key = prefix << KHO_BITMAP_SIZE_LOG2
        node = self.root
        created = []
        try:
            for level in range(KHO_TREE_MAX_DEPTH - 1, 0, -1):
                shift = (level - 1) * KHO_TABLE_SIZE_LOG2 + KHO_BITMAP_SIZE_LOG2
                nxt = self._nodes.get((level, key >> shift))
                if nxt is None:
                    nxt = self.kmalloc.kzalloc(PAGE_SIZE)
                    created.append((level, key >> shift, nxt))
                    self.mem.write(node + 8 * table_index(key, level), struct.pack("<Q", nxt))
                    self._nodes[(level, key >> shift)] = nxt
                node = nxt
        except Exception:
            # kho_radix_add_page: free the new branch and clear its anchor.
            for i, (level, pre, phys) in enumerate(created):
                del self._nodes[(level, pre)]
                if i == 0:
                    parent = self.root if level == KHO_TREE_MAX_DEPTH - 1 else \
                        self._nodes[(level + 1, pre >> KHO_TABLE_SIZE_LOG2)]
                    self.mem.write(parent + 8 * (pre % 512), bytes(8))
                self.kmalloc.kfree(phys)
            raise
        self.leaves[prefix] = node
        return node

    def _bitmap(self, phys: int) -> memoryview:
        return memoryview(self.mem.page(phys >> PAGE_SHIFT))

    def _keys(self, first_block: int, count: int, order: int, value: bool) -> None:
        key, end = encode_key(0, order) | first_block, (encode_key(0, order) | first_block) + count
        while key < end:
            prefix, lo = divmod(key, LEAF_BITS)
            hi = min(LEAF_BITS, lo + (end - key))
            if value:
                _set_bits(self._bitmap(self._leaf(prefix)), lo, hi, True)
            elif prefix in self.leaves:
                _set_bits(self._bitmap(self.leaves[prefix]), lo, hi, False)
            key += hi - lo

    def preserve_blocks(self, pfn: int, count: int, order: int) -> None:
        """Mark count order-`order` blocks from pfn preserved."""
        self._keys(pfn >> order, count, order, True)

    def unpreserve_blocks(self, pfn: int, count: int, order: int) -> None:
        """Clear count order-`order` blocks from pfn."""
        self._keys(pfn >> order, count, order, False)

    def destroy(self) -> None:
        """Free every table and leaf and clear the root."""
        for phys in list(self.leaves.values()) + list(self._nodes.values()):
            self.kmalloc.kfree(phys)
        self.leaves, self._nodes = {}, {}
        self.mem.write(self.root, bytes(PAGE_SIZE))

    def preserved_bytes(self) -> int:
        """Bytes marked preserved, all orders."""
        return sum(size for _, _, size in walk_leaves(self.mem, self.leaves.items()))

    def is_preserved(self, phys: int, order: int) -> bool:
        """Whether the order-`order` block at phys is preserved."""
        prefix, bit = divmod(encode_key(phys, order), LEAF_BITS)
        leaf = self.leaves.get(prefix)
        return leaf is not None and bool(self._bitmap(leaf)[bit >> 3] & (1 << (bit & 7)))

    def serialize(self) -> tuple[int, list[int]]:
        """The tree is its own serialized form: nothing to write."""
        return self.root, []

    @property
    def orders(self):
        """The leaves, where the bitmap tracker has its per-order bitmaps."""
        return self.leaves


def walk_leaves(mem, leaves):
    """(order, phys, size) runs of (prefix, leaf phys) pairs, in key order."""
    for prefix, phys in sorted(leaves):
        bm = mem.read(phys, PAGE_SIZE)
        for lo, hi in bitmap_runs(bm):
            base = prefix << KHO_BITMAP_SIZE_LOG2
            if prefix:
                first, order = decode_key(base | lo)
                yield order, first, (hi - lo) << (PAGE_SHIFT + order)
            else:
                # Orders 38 and up put the order bit inside the leaf: one block per bit.
                for b in range(lo, hi):
                    if b:
                        p, order = decode_key(b)
                        yield order, p, PAGE_SIZE << order


def tree_leaves(mem: PhysMem, root: int, seen: set | None = None) -> list[tuple[int, int]]:
    """(key prefix, leaf phys) of every leaf the next kernel reaches from root; `seen` gets
    every page visited. Raises MapError where the kernel would fault (a pointer that is not
    a page of memory) or would visit one page twice."""
    leaves = []
    seen = set() if seen is None else seen

    def check(phys, what):
        if phys % PAGE_SIZE or phys + PAGE_SIZE > mem.size:
            raise MapError(f"{what} at {phys:#x} is not a page of memory")
        if phys in seen:
            raise MapError(f"{what} at {phys:#x} is reached twice")
        seen.add(phys)

    def walk(node, level, start):
        table = TABLE.unpack(mem.read(node, PAGE_SIZE))
        shift = (level - 1) * KHO_TABLE_SIZE_LOG2 + KHO_BITMAP_SIZE_LOG2
        for i, child in enumerate(table):
            if not child:
                continue
            key = start | (i << shift)
            if level == 1:
                check(child, "leaf")
                leaves.append((key >> KHO_BITMAP_SIZE_LOG2, child))
            else:
                check(child, f"level-{level - 1} table")
                walk(child, level - 1, key)

    check(root, "tree root")
    walk(root, KHO_TREE_MAX_DEPTH - 1, 0)
    return leaves


def walk_radix_map(mem: PhysMem, root: int):
    """kho_mem_retrieve: (order, phys, size) runs; consecutive blocks of one order merge."""
    yield from merge_runs(walk_leaves(mem, tree_leaves(mem, root)))
