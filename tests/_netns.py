"""Test alias of :mod:`grafos_fabric.tools.netns` (veth pairs between network namespaces)."""

from grafos_fabric.tools.netns import CLONE_NEWNET, NetnsThread, Pair, unavailable, veth_pair

__all__ = ["CLONE_NEWNET", "NetnsThread", "Pair", "unavailable", "veth_pair"]
