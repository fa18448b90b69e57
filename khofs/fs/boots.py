"""What the FUSE adapter keeps of earlier boots: their inodes the kernel still references.

After a kexec or a reboot nothing of the old kernel's debugfs survives. A descriptor opened
before it behaves as one on a removed debugfs file: reads fail with EIO (its node is gone)
and fstat shows nlink 0, so GETATTR must still find the inode until the kernel forgets it.
"""

from .debugfs import Node, Tree


class OldBoots:
    """Inodes of earlier boots' trees that the kernel holds (FUSE lookup count > 0)."""

    def __init__(self):
        self.nodes: dict[int, Node] = {}

    def retire(self, tree: Tree) -> list[tuple[int, str, int]]:
        """Mark every node of tree gone; the (parent inode, name, inode) entries the kernel
        may have cached. The root's inode goes on to the next boot's root."""
        entries = []
        for node in tree.nodes.values():
            node.gone = True
            if node is tree.root:
                continue
            entries.append((node.parent.ino, node.name, node.ino))
            if node.nlookup:
                self.nodes[node.ino] = node
        return entries

    def get(self, ino: int) -> Node | None:
        """An old boot's node the kernel still references, or None."""
        return self.nodes.get(ino)

    def forget(self, ino: int, nlookup: int) -> bool:
        """Drop nlookup references of an old boot's inode; False if it is not one."""
        node = self.nodes.get(ino)
        if node is None:
            return False
        node.nlookup = max(0, node.nlookup - nlookup)
        if not node.nlookup:
            del self.nodes[ino]
        return True
