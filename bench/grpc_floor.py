"""The gRPC floor of this box: raw bytes from one process to another over the same kind of
unix socket the agent listens on, with none of layervault's work on either side.

The sender cuts the state into 4 MiB messages (one copy out of the tensor: grpcio takes only
``bytes``); the receiver copies each message into a pre-faulted buffer, as the agent copies
into its staging pool. No protobuf, no checksums, no codec, no uploads. Whatever gRPC Python
and the kernel cost here, layervault's gRPC hand-off pays too, so its ratio to this floor is
the part of target 5 that is layervault's own.

    python bench/grpc_floor.py --serve SOCKET BYTES      # the receiving process (run by floor())
"""

from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys
import time

import grpc
import torch

_METHOD = "/layervault.bench.Floor/Push"
_PIECE = 4 << 20
_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]


def _serve(socket: str, size: int) -> None:
    from concurrent.futures import ThreadPoolExecutor

    pool = bytearray(size)  # pre-faulted: bytearray zero-fills every page
    view = memoryview(pool)

    def push(requests, context) -> bytes:
        offset = 0
        for message in requests:
            end = offset + len(message)
            view[offset:end] = message
            offset = 0 if end >= size else end
        return b""

    handler = grpc.method_handlers_generic_handler(
        "layervault.bench.Floor", {"Push": grpc.stream_unary_rpc_method_handler(push)})
    server = grpc.server(ThreadPoolExecutor(max_workers=4), options=_OPTIONS)
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"unix:{socket}")
    server.start()
    server.wait_for_termination()


def _pieces(tensors: list[torch.Tensor]):
    for t in tensors:
        flat = t.detach().reshape(-1).view(torch.uint8).numpy()
        for start in range(0, flat.size, _PIECE):
            yield flat[start:start + _PIECE].tobytes()


def floor(tensors: list[torch.Tensor], runs: int, workdir: pathlib.Path) -> list[float]:
    """Seconds to push ``tensors`` to a fresh receiving process, ``runs`` times (after one warm-up)."""
    size = sum(t.numel() * t.element_size() for t in tensors)
    socket = workdir / "grpc-floor.sock"
    socket.unlink(missing_ok=True)
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(socket), str(size)])
    try:
        with grpc.insecure_channel(f"unix:{socket}", options=_OPTIONS) as channel:
            grpc.channel_ready_future(channel).result(timeout=60)
            push = channel.stream_unary(_METHOD)
            push(_pieces(tensors[:1]))  # warm-up: connection, threads, the receiver's first pages
            seconds = []
            for _ in range(runs):
                start = time.perf_counter()
                push(_pieces(tensors))
                seconds.append(time.perf_counter() - start)
        return seconds
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--serve", nargs=2, metavar=("SOCKET", "BYTES"), required=True)
    args = parser.parse_args()
    _serve(args.serve[0], int(args.serve[1]))
