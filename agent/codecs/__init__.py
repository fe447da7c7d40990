"""Codec chains recorded per shard in the manifest (see :mod:`.base`)."""

from layervault.agent.codecs import lz4 as _lz4, shuffle as _shuffle  # noqa: F401  (register codecs)
from layervault.agent.codecs.base import Codec, CodecChain, CodecError, codec_from_descriptor
from layervault.agent.codecs.select import StoreRates, choose_chain

__all__ = ["Codec", "CodecChain", "CodecError", "StoreRates", "codec_from_descriptor", "choose_chain"]

COMPRESSORS = ("lz4", "auto", "none")
