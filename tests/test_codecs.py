import numpy as np
import pytest

from layervault.agent.codecs import CodecChain, CodecError, StoreRates, choose_chain, codec_from_descriptor


def _bytes(a: np.ndarray) -> memoryview:
    return memoryview(a.view(np.uint8).reshape(-1))


@pytest.mark.parametrize("chain", [[], ["lz4/1"], ["lz4/1:1"], ["lz4/1:8"], ["shuffle/1:4", "lz4/1:1"], ["shuffle/1:8"],
                                   ["shuffle/1:2", "lz4/1"]])
@pytest.mark.parametrize("size", [0, 1, 7, 4096, 1 << 20])
def test_chain_roundtrip(chain, size):
    raw = np.random.default_rng(size).integers(0, 255, size, dtype=np.uint8)
    raw[: size // 2] = 0
    codec = CodecChain(chain)
    encoded = codec.encode(_bytes(raw))
    assert bytes(codec.decode(encoded, size)) == raw.tobytes()


def test_unknown_or_malformed_descriptor_is_refused():
    with pytest.raises(CodecError, match="unknown codec 'zstd/1'"):
        codec_from_descriptor("zstd/1")
    with pytest.raises(CodecError, match="unknown codec 'lz4/2'"):
        codec_from_descriptor("lz4/2")
    with pytest.raises(CodecError, match="malformed"):
        codec_from_descriptor("lz4")
    with pytest.raises(CodecError, match="element size"):
        codec_from_descriptor("shuffle/1:3")
    with pytest.raises(CodecError, match="acceleration"):
        codec_from_descriptor("lz4/1:fast")


def test_corrupt_lz4_block_raises_codec_error():
    codec = CodecChain(["lz4/1"])
    encoded = bytearray(codec.encode(_bytes(np.zeros(1 << 16, np.float32))))
    with pytest.raises(CodecError):
        codec.decode(bytes(encoded[:10]), 1 << 18)


def test_selection_follows_the_data():
    rng = np.random.default_rng(0)
    # uniformly random bits do not compress: stored raw, no CPU spent on a codec
    assert choose_chain(_bytes(rng.integers(0, 2**32, 1 << 18, dtype=np.uint32)), "lz4", 4) == []
    # mostly zeros: plain lz4 (shuffle would hurt)
    assert choose_chain(_bytes(np.zeros(1 << 18, np.float32)), "lz4", 4) == ["lz4/1:1"]
    # counters: shuffle+lz4
    assert choose_chain(_bytes(np.arange(1 << 16, dtype=np.int64)), "lz4", 8) == ["shuffle/1:8", "lz4/1:1"]
    assert choose_chain(_bytes(np.zeros(1 << 18, np.float32)), "none", 4) == []


def test_selection_weighs_codec_time_against_the_stores_rates():
    weights = _bytes(np.random.default_rng(1).standard_normal(1 << 16).astype(np.float32))
    counters = _bytes(np.arange(1 << 15, dtype=np.int64))
    # Dense fp32: shuffle+lz4 saves ~10% of the bytes for ~1 CPU-s per GB. On a slow store that
    # pays, on a 1 GB/s one it does not; at the default (S3-on-2-cores) rates neither, as measured.
    assert choose_chain(weights, "lz4", 4, StoreRates(write_gbps=0.01, read_gbps=0.1)) == ["shuffle/1:4", "lz4/1:1"]
    assert choose_chain(weights, "lz4", 4, StoreRates(write_gbps=1.0, read_gbps=1.0)) == []
    assert choose_chain(weights, "lz4", 4) == []
    # Counters shrink ~8x: worth it at any ordinary rate, not when the store outruns the codec.
    assert choose_chain(counters, "lz4", 8, StoreRates(write_gbps=1.0, read_gbps=1.0)) == ["shuffle/1:8", "lz4/1:1"]
    assert choose_chain(counters, "lz4", 8, StoreRates(write_gbps=1000.0, read_gbps=1000.0)) == []


@pytest.mark.parametrize("write, read", [(0, 1), (1, 0), (-1, 1), (float("nan"), 1)])
def test_store_rates_must_be_positive(write, read):
    with pytest.raises(ValueError, match="positive GB/s"):
        StoreRates(write, read)


@pytest.mark.parametrize("itemsize", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("size", [0, 3, 17, 4096, 100_003])
def test_fast_shuffle_is_byte_identical_to_the_format_definition(itemsize, size):
    from layervault.agent.codecs.shuffle import ShuffleCodec, shuffle_reference, unshuffle_reference

    raw = np.random.default_rng(size + itemsize).integers(0, 256, size, dtype=np.uint8)
    codec = ShuffleCodec(itemsize)
    encoded = bytes(codec.encode(memoryview(raw)))
    assert encoded == shuffle_reference(memoryview(raw), itemsize).tobytes()
    assert bytes(codec.decode(encoded, size)) == unshuffle_reference(encoded, itemsize).tobytes() == raw.tobytes()
