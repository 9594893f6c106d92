"""Prefix affinity: a request whose prompt begins like one a replica served lately goes to that replica, whose
engine still holds that beginning in its prompt cache (vLLM's automatic prefix caching, SGLang's radix cache,
llama.cpp's slot cache) and skips computing it again. The idea of vLLM production-stack's prefix-aware router
and llm-d's prefix-cache scorer, kept to what a gateway in front of a few replicas needs.

The path of a request:
1. `prompt_keys(model, path, body)`: the prompt as UTF-8 (chat: each message's role and text parts, in order;
   completions: the prompt) in BLOCK-byte blocks, the first MAX_BLOCKS of them. Block i's key is the CRC-32
   of the model and blocks 0..i (a chain), so two equal keys mean two equal beginnings (or, once in billions,
   a collision: a cache miss, never a wrong answer). A prompt shorter than a block has no keys: too little to
   be worth a cache.
2. `PrefixTable.lookup(keys)`: the replica that served the longest of these beginnings lately, if any.
3. The registry routes there unless that replica is suspect, on a worker a pass could not reach, or over its
   share of the load (registry.Registry.pick: bounded load, as in bounded-load consistent hashing). A
   beginning no replica served lately goes to the replica its first block hashes to (`rendezvous`), if that
   one is as idle as any; else, like any other request, by power of two choices.
4. `PrefixTable.remember(keys, replica)`: the replica picked now holds these beginnings.

The table is per process and bounded (MAX_ENTRIES keys; the least recently used go first). The keys and the
rendezvous are the same in every process (CRC-32 and BLAKE2b, not Python's per-process hash), so the N
processes of one server (api/hub) each learn the same placement without sharing their tables: a new
beginning goes to the same replica whichever process takes it. CRC-32 costs what Python's hash does (41 us
for a 32 KiB prompt on this project's machine; BLAKE2b per block: 104 us).
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

BLOCK = 512  # bytes (about 128 tokens): the grain at which beginnings are compared
MAX_BLOCKS = 64  # the first 32 KiB of a prompt decide; beyond that, all requests alike are one prefix
MAX_ENTRIES = 200_000  # keys kept (about 30 MB at most)
_PROMPTED = ("/v1/chat/completions", "/v1/completions")  # embeddings have no cache to reuse


def prompt_keys(model: str, path: str, body: Mapping[str, Any]) -> tuple[int, ...]:
    """The keys of the prompt's blocks, shortest beginning first; () when the prompt is shorter than a block."""
    if path not in _PROMPTED:
        return ()
    text = _prompt_text(body)
    if text is None or len(text) < BLOCK:  # fewer characters than BLOCK: fewer bytes too (most often)
        return ()
    data = memoryview(text.encode("utf-8", "surrogatepass"))
    keys: list[int] = []
    key = zlib.crc32(model.encode("utf-8", "surrogatepass") + b"\x00")
    for start in range(0, min(len(data), BLOCK * MAX_BLOCKS) - BLOCK + 1, BLOCK):
        key = zlib.crc32(data[start:start + BLOCK], key)
        keys.append(key)
    return tuple(keys)


def rendezvous(first_key: int, replica: str) -> int:
    """The weight of `replica` for a beginning whose first block's key is `first_key`: the replica of highest
    weight is the beginning's own (rendezvous hashing), the same in every process."""
    digest = hashlib.blake2b(first_key.to_bytes(4, "little") + replica.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _prompt_text(body: Mapping[str, Any]) -> str | None:
    messages = body.get("messages")
    if isinstance(messages, list):
        parts: list[str] = []
        for message in messages:
            if not isinstance(message, Mapping):
                return None
            parts.append(f"\x00{message.get('role')}\x00")
            content = message.get("content")
            if isinstance(content, str):
                parts.append(content)
            elif isinstance(content, list):  # text parts as they are; anything else (images) by its type only
                parts.extend(p.get("text", "") if p.get("type") == "text" else f"\x00{p.get('type')}\x00"
                             for p in content if isinstance(p, Mapping))
        return "".join(part if isinstance(part, str) else "" for part in parts)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        return str(prompt[0])  # a batch of prompts: its first one
    return None


class PrefixTable:
    """Which replica served which beginning lately (keys from prompt_keys)."""

    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        self._served: dict[int, Hashable] = {}  # in order of use: the least recently used first
        self.hits = 0  # lookups that found a replica (for metrics and tests)
        self.misses = 0

    def lookup(self, keys: Sequence[int]) -> Hashable | None:
        """The replica that served the longest of these beginnings, or None."""
        served = self._served
        for key in reversed(keys):
            replica = served.get(key)
            if replica is not None:
                self.hits += 1
                return replica
        self.misses += 1
        return None

    def remember(self, keys: Sequence[int], replica: Hashable) -> None:
        served = self._served
        for key in keys:
            served.pop(key, None)  # re-inserted last: the most recently used
            served[key] = replica
        excess = len(served) - self.max_entries
        if excess > 0:
            for key in _oldest(served, excess + self.max_entries // 10):
                del served[key]

    def __len__(self) -> int:
        return len(self._served)


def _oldest(mapping: Mapping[int, object], count: int) -> list[int]:
    """The first `count` keys of `mapping`: its least recently used."""
    found: list[int] = []
    for key in mapping:
        if len(found) >= count:
            break
        found.append(key)
    return found
