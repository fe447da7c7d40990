"""Turning exceptions into gRPC statuses, and the common server/channel settings.

Every handler is wrapped so that a layervault error becomes its own status code with its
message, a storage failure becomes UNAVAILABLE naming the store, and anything else becomes
INTERNAL with the exception text - a user never sees a bare "Exception calling application".
"""

from __future__ import annotations

import functools
import inspect
import logging
from typing import Any, Callable

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor

from layervault.agent import redact
from layervault.agent.storage import ObjectNotFound, StorageError
from layervault.errors import LayervaultError

log = logging.getLogger("layervault.rpc")

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),
]
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]


def _status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status for ``exc``; its message never carries a storage credential to the caller."""
    code, message = _classify(exc)
    return code, clip_details(redact.scrub(message))


#: Status details travel percent-encoded in a trailer; past gRPC's 8 KiB metadata limit the
#: caller would get RESOURCE_EXHAUSTED "Stream removed" instead of the status (a message that
#: quotes a 5000-character layer name does that), so details are cut well below it.
MAX_DETAILS_ENCODED = 4096


def clip_details(message: str, limit: int = MAX_DETAILS_ENCODED) -> str:
    """``message`` with its middle cut out so that its percent-encoded form stays within
    ``limit`` bytes: the start says what and where, the end usually says why."""
    sizes = [1 if " " <= c <= "~" and c != "%" else 3 * len(c.encode("utf-8", "replace")) for c in message]
    if sum(sizes) <= limit:
        return message
    budget = limit - 64  # room for the note
    head, used = 0, 0
    while used + sizes[head] <= budget // 3:
        used += sizes[head]
        head += 1
    tail = len(message)
    while used + sizes[tail - 1] <= budget:
        tail -= 1
        used += sizes[tail]
    return f"{message[:head]} ...[{tail - head} characters cut]... {message[tail:]}"


def _classify(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, LayervaultError):
        return exc.code, str(exc)
    if isinstance(exc, ObjectNotFound):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    if isinstance(exc, StorageError):
        return grpc.StatusCode.UNAVAILABLE, f"storage error: {exc}"
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
        return exc.code(), exc.details() or str(exc.code())
    log.exception("unexpected error in handler")
    return grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}"


def handler(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a unary or streaming servicer method so errors become proper statuses."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def stream(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
            try:
                yield from fn(self, request, context)
            except Exception as exc:  # noqa: BLE001
                if context.code() is None or context.code() == grpc.StatusCode.OK:
                    code, message = _status(exc)
                    context.abort(code, message)
                raise
        return stream

    @functools.wraps(fn)
    def unary(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return fn(self, request, context)
        except Exception as exc:  # noqa: BLE001
            code, message = _status(exc)
            context.abort(code, message)
    return unary


_HANDLER_KINDS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def add_servicer(servicer: object, server: grpc.Server, service: ServiceDescriptor,
                 deserializers: dict[str, Callable[[bytes], Any]] | None = None,
                 serializers: dict[str, Callable[[Any], bytes]] | None = None) -> None:
    """Register ``servicer`` for every method of ``service``, as the generated
    ``add_*Servicer_to_server`` does, but with a request deserializer / reply serializer of
    our own where ``deserializers`` / ``serializers`` name one (the Save and Restore streams
    write and read their data messages by hand, see :mod:`layervault.stream_frames`)."""
    handlers = {}
    for method in service.methods:
        make = _HANDLER_KINDS[(method.client_streaming, method.server_streaming)]
        request = message_factory.GetMessageClass(method.input_type)
        reply = message_factory.GetMessageClass(method.output_type)
        handlers[method.name] = make(getattr(servicer, method.name),
                                     request_deserializer=(deserializers or {}).get(method.name, request.FromString),
                                     response_serializer=(serializers or {}).get(method.name, reply.SerializeToString))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)
