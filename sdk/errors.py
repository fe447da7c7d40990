"""layervault's errors: one root, each mapped to the gRPC status that carries it.

Agents and the coordinator raise these; the servers turn them into a gRPC status with the
message, and the client turns the status back into the same class, so a rank catches
``layervault.NotFoundError`` whether the checkpoint was missing locally or on the far side.
"""

from __future__ import annotations

import grpc


class LayervaultError(Exception):
    """Root of all layervault errors."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgumentError(LayervaultError, ValueError):
    """A name, shape, dtype or request that can never be valid."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(LayervaultError, LookupError):
    """No such job, checkpoint, key or layer."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(LayervaultError):
    """That (job, kind, step) is already committed and overwrite was not asked for."""

    code = grpc.StatusCode.ALREADY_EXISTS


class IncompatibleStateError(LayervaultError, ValueError):
    """The checkpoint does not fit the model/optimizer it is loaded into; nothing was changed."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ChecksumError(LayervaultError):
    """Stored bytes do not match their recorded checksum, or do not decode."""

    code = grpc.StatusCode.DATA_LOSS


class SaveFailedError(LayervaultError):
    """A save did not commit: a rank or agent failed, or the commit deadline passed."""

    code = grpc.StatusCode.ABORTED


class StagedWhileChangingError(SaveFailedError):
    """A background save's tensors changed before their bytes were all staged (the training
    step ran before ``SaveHandle.wait_staged()``); the step was not saved, nothing torn commits."""


class DeadlineError(SaveFailedError):
    """Waited too long for a commit or for staging memory."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class UnavailableError(LayervaultError):
    """The agent, the coordinator or the storage cannot be reached."""

    code = grpc.StatusCode.UNAVAILABLE


class UnauthenticatedError(LayervaultError):
    """The call carried no job token, or one the service does not know."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(LayervaultError):
    """The job token is valid but does not cover this job."""

    code = grpc.StatusCode.PERMISSION_DENIED


class ManifestError(IncompatibleStateError):
    """A manifest is malformed or of a format version this reader does not know.

    A kind of :class:`IncompatibleStateError` (same status), so callers catch it the same way
    whether the manifest was read here or by an agent, where it arrives as its parent.
    """

    code = grpc.StatusCode.FAILED_PRECONDITION


_BY_CODE = {
    cls.code: cls
    for cls in (
        InvalidArgumentError,
        NotFoundError,
        AlreadyExistsError,
        IncompatibleStateError,
        ChecksumError,
        SaveFailedError,
        DeadlineError,
        UnavailableError,
        UnauthenticatedError,
        PermissionDeniedError,
    )
}


def error_from_rpc(exc: grpc.RpcError) -> LayervaultError:
    """The layervault error for a failed call (falls back to the root class)."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    cls = _BY_CODE.get(code, LayervaultError)
    err = cls(details or str(code))
    err.code = code
    return err
