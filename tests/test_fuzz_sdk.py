"""Generated state dicts through the SDK (issue 6, bad input): ``ModelManager.save`` and ``load``.

Every generated state - arbitrary Unicode names, every torch dtype (also ones layervault has
no name for), 0-d, empty and non-contiguous tensors - either round-trips bit for bit (over
shared memory and over the gRPC stream) or is refused before anything is staged with an
``InvalidArgumentError`` that names the tensor; a refused save never commits and the agent
keeps serving.
"""

from __future__ import annotations

import itertools

import grpc
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import layervault as lv
from layervault.client import AgentClient
from layervault.errors import LayervaultError
from layervault.torch import ModelManager

from fuzzing import fuzz_settings, layer_names
from services import start_in_process

pytestmark = [pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental"),
              pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor")]

SUPPORTED = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16,
             torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128,
             torch.float8_e4m3fn, torch.float8_e5m2, torch.uint16, torch.uint32, torch.uint64]
UNSUPPORTED = [torch.complex32, torch.quint8, torch.qint8, torch.float8_e4m3fnuz]


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    services = start_in_process((tmp_path_factory.mktemp("sdk-fuzz") / "store").as_uri(), staging_bytes=8 << 20,
                                chunk_size=4096)
    yield services
    services.stop()


def _random_bytes_tensor(shape: list[int], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Any bit pattern of ``dtype`` (NaNs, denormals, bools that are not 0/1 excluded: torch may normalise those)."""
    numel = 1
    for size in shape:
        numel *= size
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (numel * itemsize,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    if dtype == torch.bool:
        raw &= 1
    return raw.view(dtype).reshape(shape)


@st.composite
def tensors(draw: st.DrawFn, dtypes: list[torch.dtype]) -> torch.Tensor:
    dtype = draw(st.sampled_from(dtypes))
    shape = draw(st.lists(st.integers(0, 6), max_size=3))
    base = _random_bytes_tensor(shape, dtype, draw(st.integers(0, 2**31)))
    if base.dim() >= 2 and draw(st.booleans()):
        return base.transpose(0, 1)  # non-contiguous
    if base.dim() >= 1 and base.shape[0] > 1 and draw(st.booleans()):
        return base[::2]             # strided
    return base


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return a.numel() == 0 or torch.equal(a.clone(memory_format=torch.contiguous_format).reshape(-1).view(torch.uint8),
                                         b.clone(memory_format=torch.contiguous_format).reshape(-1).view(torch.uint8))


steps = itertools.count(1)


@fuzz_settings(40)
@given(state=st.dictionaries(layer_names(), tensors(SUPPORTED), min_size=1, max_size=4), shared_memory=st.booleans())
def test_any_state_of_supported_dtypes_round_trips_bit_for_bit(agent, state, shared_memory):
    mm = ModelManager(lv.ModelConfig(job="sdk-fuzz", name="state"),
                      agent=AgentClient(agent.agent_address, shared_memory=shared_memory))
    step = next(steps)
    mm.save(state, step=step).wait(60)
    target = {name: torch.empty_like(t) for name, t in state.items()}
    mm.load(target, step=step)
    for name, tensor in state.items():
        assert _same_bits(target[name], tensor), name
        assert _same_bits(mm.load_layer(name, step=step), tensor), name


@fuzz_settings(20)
@given(good=st.dictionaries(st.text("abc", min_size=1, max_size=4), tensors(SUPPORTED), max_size=2),
       bad_name=st.text("xyz", min_size=1, max_size=4), bad=tensors(UNSUPPORTED))
def test_a_state_with_an_unsupported_dtype_is_refused_naming_the_tensor(agent, good, bad_name, bad):
    mm = ModelManager(lv.ModelConfig(job="sdk-fuzz-bad", name="state"), agent=agent.agent_address)
    step = next(steps)
    with pytest.raises(lv.InvalidArgumentError, match=rf"{bad_name}.*{str(bad.dtype).removeprefix('torch.')}|"
                                                       rf"{str(bad.dtype).removeprefix('torch.')}.*{bad_name}") as raised:
        mm.save({**good, bad_name: bad}, step=step).wait(60)
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(lv.NotFoundError):
        mm.load({name: torch.empty_like(t) for name, t in good.items()}, step=step)
    assert AgentClient(agent.agent_address).stats().pool_in_use == 0


def test_a_sparse_tensor_is_refused_naming_it(agent):
    mm = ModelManager(lv.ModelConfig(job="sdk-sparse", name="state"), agent=agent.agent_address)
    with pytest.raises(lv.InvalidArgumentError,
                       match=r"^'emb' is a torch.sparse_coo tensor; convert it to dense first$") as raised:
        mm.save({"w": torch.ones(3), "emb": torch.eye(3).to_sparse()}, step=1)
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert mm.checkpoints() == []


@fuzz_settings(20)
@given(name=st.sampled_from(["", "\x00"]) | st.just("a" * 70000), tensor=tensors(SUPPORTED))
def test_names_no_layer_can_have_are_refused(agent, name, tensor):
    mm = ModelManager(lv.ModelConfig(job="sdk-fuzz-names", name="state"), agent=agent.agent_address)
    try:
        mm.save({name: tensor}, step=next(steps)).wait(60)
    except LayervaultError as exc:
        assert isinstance(exc, lv.InvalidArgumentError) and str(exc).strip(), exc
    assert AgentClient(agent.agent_address).stats().pool_in_use == 0
