"""Block hash chains of token ids: the keys of prefix KV reuse.

    tokens   t0 ... t(B-1) | tB ... t(2B-1) | ... | t(kB) ... (partial: no key)
    keys     k0 = H("", block 0) | k1 = H(k0, block 1) | ...  kj = H(k(j-1), block j)

A key names a complete block *and everything before it* (vLLM's prefix caching keys blocks
this way), so two token sequences share key j exactly when their first (j+1)*B tokens are equal.
A node's KV store keeps the blocks of finished requests under their keys (actors/session_table.py);
the router finds the replica holding a prompt's longest prefix from a few of its keys
(``routing_keys``: the keys at block depths 1, 2, 4, 8, ...).
"""
from __future__ import annotations

import hashlib
from array import array


def block_hashes(token_ids: list[int], block_size: int, max_blocks: int | None = None,
                 known: list[str] = ()) -> list[str]:
    """The chain keys of the complete blocks of ``token_ids`` (at most ``max_blocks``). ``known``:
    the keys of its first blocks, already computed (e.g. a prompt's, for the prompt and its
    answer): only the blocks after them are hashed."""
    num = len(token_ids) // block_size if max_blocks is None else min(max_blocks, len(token_ids) // block_size)
    keys = list(known[:num])
    parent = bytes.fromhex(keys[-1]) if keys else b""
    for j in range(len(keys), num):
        digest = hashlib.blake2b(parent, digest_size=16)
        digest.update(array("q", token_ids[j * block_size:(j + 1) * block_size]).tobytes())
        parent = digest.digest()
        keys.append(parent.hex())
    return keys


def routing_depths(num_blocks: int) -> list[int]:
    """Block depths 1, 2, 4, ... up to ``num_blocks``: the depths whose keys route a request."""
    depths, depth = [], 1
    while depth <= num_blocks:
        depths.append(depth)
        depth *= 2
    return depths


def routing_keys(hashes: list[str]) -> list[str]:
    """The keys at the routing depths of a chain, shallowest first."""
    return [hashes[d - 1] for d in routing_depths(len(hashes))]


__all__ = ["block_hashes", "routing_depths", "routing_keys"]
