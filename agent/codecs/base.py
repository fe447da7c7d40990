"""Codecs as versioned descriptors.

A shard's codec chain is recorded in the manifest as a list of descriptors such as
``["shuffle/1:4", "lz4/1:1"]`` (name, major version, optional parameter). Readers rebuild the
chain from the descriptors and refuse names or major versions they do not know, so an old
reader never silently mis-decodes a newer checkpoint.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Protocol


class CodecError(ValueError):
    """Unknown codec descriptor, or bytes that do not decode."""


class Codec(Protocol):
    """One stage of a codec chain. ``decode(encode(x), len(x)) == x``."""

    @property
    def descriptor(self) -> str: ...

    def encode(self, data: memoryview) -> bytes | memoryview: ...

    def decode(self, data: bytes | memoryview, raw_size: int) -> bytes | memoryview: ...


@dataclasses.dataclass(frozen=True)
class Descriptor:
    name: str
    major: int
    param: str = ""

    @classmethod
    def parse(cls, text: str) -> "Descriptor":
        head, _, param = text.partition(":")
        name, sep, major = head.partition("/")
        if not sep or not name or not major.isdigit():
            raise CodecError(f"malformed codec descriptor {text!r} (expected 'name/major[:param]')")
        return cls(name, int(major), param)

    def __str__(self) -> str:
        return f"{self.name}/{self.major}" + (f":{self.param}" if self.param else "")


_REGISTRY: dict[tuple[str, int], Callable[[str], Codec]] = {}


def register(name: str, major: int) -> Callable[[Callable[[str], Codec]], Callable[[str], Codec]]:
    def wrap(factory: Callable[[str], Codec]) -> Callable[[str], Codec]:
        _REGISTRY[(name, major)] = factory
        return factory

    return wrap


def codec_from_descriptor(text: str) -> Codec:
    desc = Descriptor.parse(text)
    factory = _REGISTRY.get((desc.name, desc.major))
    if factory is None:
        known = ", ".join(sorted(f"{n}/{m}" for n, m in _REGISTRY))
        raise CodecError(f"unknown codec {text!r}; this reader knows {known}")
    return factory(desc.param)


class CodecChain:
    """Codecs applied in order on encode, in reverse on decode."""

    def __init__(self, descriptors: list[str] | tuple[str, ...]) -> None:
        self.codecs = [codec_from_descriptor(d) for d in descriptors]

    @property
    def descriptors(self) -> list[str]:
        return [c.descriptor for c in self.codecs]

    def encode(self, data: memoryview) -> bytes | memoryview:
        out: bytes | memoryview = data
        for codec in self.codecs:
            out = codec.encode(memoryview(out))
        return out

    def decode(self, data: bytes | memoryview, raw_size: int) -> bytes | memoryview:
        out = data
        for codec in reversed(self.codecs):
            out = codec.decode(out, raw_size)
        if len(out) != raw_size:
            raise CodecError(f"decoded {len(out)} bytes, expected {raw_size}")
        return out
