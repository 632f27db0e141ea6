"""Storage failures, named: the one place that turns an fsspec/s3fs/gcsfs/botocore exception into a
`StorageError` whose message is one line naming the `spec.storage` field to fix.

Torch-free, and it imports neither botocore nor google-auth: exceptions are recognised by their class
names and the error code they carry, so every filesystem fsspec can load is classified the same way.
`vlm_core.storage` raises these from every function (`named`), retrying the transient ones with backoff
(`retry`); callers (vlmctl, the operator, the trainer) catch `StorageError` and show its message.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar
from urllib.parse import urlsplit

URI_FIELD = "spec.storage.uri"
ENDPOINT_FIELD = "spec.storage.endpointUrl"
SECRET_FIELD = "spec.storage.secretRef"

# What kind of failure, and so which field the user fixes and whether trying again can help.
CREDENTIALS = "credentials missing"
REJECTED = "credentials rejected"
DENIED = "access denied"
NO_BUCKET = "no such bucket"
UNREACHABLE = "endpoint unreachable"
UNAVAILABLE = "storage unavailable"  # 5xx, throttling, timeouts: transient
TRANSIENT = frozenset({UNREACHABLE, UNAVAILABLE})

_NO_CREDENTIALS_TYPES = {"NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError",
                         "CredentialRetrievalError", "RefreshError"}
_UNREACHABLE_TYPES = {"EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError",
                      "ClientConnectorError", "ClientConnectionError", "ServerDisconnectedError",
                      "ConnectionRefusedError", "ConnectionResetError", "gaierror", "ProxyConnectionError"}
_TIMEOUT_TYPES = {"ReadTimeoutError", "ReadTimeout", "TimeoutError", "ServerTimeoutError", "ResponseStreamingError"}
_REJECTED_CODES = {"SignatureDoesNotMatch", "InvalidAccessKeyId", "InvalidToken", "ExpiredToken",
                   "InvalidClientTokenId", "AuthFailure", "TokenRefreshRequired", "401", "Unauthorized"}
_DENIED_CODES = {"AccessDenied", "AllAccessDisabled", "AccountProblem", "403", "Forbidden"}
_NO_BUCKET_CODES = {"NoSuchBucket"}
_UNAVAILABLE_CODES = {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "Throttling",
                      "ThrottlingException", "RequestLimitExceeded", "TooManyRequests", "RequestTimeTooSkewed",
                      "429", "500", "502", "503", "504"}


class StorageError(OSError):
    """A storage failure with a one-line message naming the field to fix. An OSError, so code that already
    tolerates an unreadable file (a missing progress.json) keeps doing so."""

    def __init__(self, message: str, *, kind: str, field: str, uri: str = "", detail: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.kind = kind
        self.field = field
        self.uri = uri
        self.detail = detail
        self.final = False  # retried already (or not worth it): an outer storage call does not retry it again

    @property
    def transient(self) -> bool:
        return self.kind in TRANSIENT

    def __str__(self) -> str:
        return self.message


class StorageUnavailable(StorageError):
    """A transient storage failure (connection, 5xx, throttling, timeout) that outlasted its retries: a
    stage failing with it is worth a restart; one failing with a plain StorageError is not (the contract's
    NOT_RETRIED_ERRORS)."""


def _chain(err: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _code(err: BaseException) -> str | None:
    """The service's error code: botocore's ClientError `response`, gcsfs' HttpError `code`."""
    response = getattr(err, "response", None)
    if isinstance(response, dict):
        error = response.get("Error") or {}
        code = error.get("Code") or response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code:
            return str(code)
    code = getattr(err, "code", None)
    if isinstance(code, int) or (isinstance(code, str) and code):
        return str(code)
    return None


def _kind(err: BaseException) -> tuple[str, str] | None:
    """(kind, detail) of a storage exception, or None when it is not a storage failure we can name (a
    missing object stays a FileNotFoundError: callers rely on it)."""
    for e in _chain(err):
        name = type(e).__name__
        if isinstance(e, StorageError):
            return e.kind, e.detail
        if name in _NO_CREDENTIALS_TYPES:
            return CREDENTIALS, str(e) or name
        code = _code(e)
        if code in _REJECTED_CODES:
            return REJECTED, code
        if code in _DENIED_CODES:
            return DENIED, code
        if code in _NO_BUCKET_CODES:
            return NO_BUCKET, code
        if code in _UNAVAILABLE_CODES or (code or "").startswith("5"):
            return UNAVAILABLE, code or name
        if name in _UNREACHABLE_TYPES:
            return UNREACHABLE, str(e) or name
        if name in _TIMEOUT_TYPES:
            return UNAVAILABLE, f"timed out ({name})"
    if isinstance(err, PermissionError):  # s3fs' translation of a ClientError it could not map back
        return DENIED, str(err)
    if isinstance(err, OSError) and str(err).startswith("Forbidden"):  # gcsfs' 403
        return DENIED, "403 Forbidden"
    return None


def _gcs(uri: str) -> bool:
    return uri.startswith(("gs://", "gcs://"))


def _endpoint(uri: str, options: Any) -> str:
    """The endpoint `uri` was asked at: the options', else the environment's for its scheme ('' = default)."""
    client = (options or {}).get("client_kwargs") or {}
    given = client.get("endpoint_url") or (options or {}).get("endpoint_url")
    if given or _gcs(uri):
        return given or os.environ.get("STORAGE_EMULATOR_HOST", "")
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""


def _base(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}" if parts.scheme and parts.netloc else url


def _credential_names(uri: str) -> str:
    if _gcs(uri):
        return "GOOGLE_APPLICATION_CREDENTIALS"
    return "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"


def message(kind: str, detail: str, uri: str, options: Any = None, *, field: str | None = None) -> tuple[str, str]:
    """(field, one-line message) for a failure of `kind` on `uri`. `field`: the spec field `uri` came from
    (default spec.storage.uri); credentials and the endpoint always belong to spec.storage."""
    where = field or URI_FIELD
    bucket = urlsplit(uri).netloc
    endpoint = _endpoint(uri, options)
    creds = _credential_names(uri)
    detail = " ".join(detail.split())
    if kind == CREDENTIALS:
        return SECRET_FIELD, (f"{SECRET_FIELD}: no credentials for {uri}: set {creds} in the environment "
                              f"(vlmctl run) or in the Secret named by {SECRET_FIELD} (on the cluster)")
    if kind == REJECTED:
        return SECRET_FIELD, (f"{SECRET_FIELD}: the storage rejected the credentials for {uri} ({detail}): "
                              f"check {creds} in the environment (vlmctl run) or in the Secret named by {SECRET_FIELD}")
    if kind == DENIED:
        return where, (f"{where}: access denied to {uri} ({detail}): grant the credentials ({SECRET_FIELD}, "
                       f"or the environment locally) access there ({URI_FIELD} needs read and write), "
                       f"or fix {where}")
    if kind == NO_BUCKET:
        return where, (f"{where}: bucket {bucket!r} of {uri} does not exist"
                       + (f" at {_base(endpoint)}" if endpoint else "") + f": create it or fix {where}")
    if kind == UNREACHABLE:
        at = _base(endpoint) if endpoint else "the storage endpoint"
        names = "STORAGE_EMULATOR_HOST, if set," if _gcs(uri) else f"{ENDPOINT_FIELD} (or AWS_ENDPOINT_URL)"
        return ENDPOINT_FIELD, (f"{ENDPOINT_FIELD}: cannot connect to {at} for {uri} ({detail}): check that "
                                f"this machine reaches it and that {names} names a running server")
    return where, f"{where}: storage error on {uri} ({detail}); it may pass on retry"


def classify(err: BaseException, uri: str, options: Any = None, *, field: str | None = None) -> StorageError | None:
    """`err` as a named StorageError, or None when it is no storage failure we can name."""
    if isinstance(err, StorageError) and (field is None or err.field != URI_FIELD):
        return err
    found = _kind(err)
    if found is None:
        return None
    return named_error(*found, uri, options, field=field)


def named_error(kind: str, detail: str, uri: str, options: Any = None, *, field: str | None = None) -> StorageError:
    where, text = message(kind, detail, uri, options, field=field)
    cls = StorageUnavailable if kind in TRANSIENT else StorageError
    return cls(text, kind=kind, field=where, uri=uri, detail=detail)


# Backoff of the transient failures (seconds between tries): the filesystem's own retries come first.
RETRY_DELAYS: tuple[float, ...] = tuple(
    float(x) for x in os.environ.get("VLM_STORAGE_RETRY_DELAYS", "1,4,15").split(",") if x.strip())

F = TypeVar("F", bound=Callable[..., Any])
_sleep = time.sleep  # the backoff's wait (a test makes storage come back during it)


def named(uri_arg: str = "uri", *, retry: bool = False) -> Callable[[F], F]:
    """Decorate a storage function: its failures become named StorageErrors; with `retry`, transient ones
    (connection errors, 5xx, throttling) are tried again after `RETRY_DELAYS` (the function must be
    idempotent). `uri_arg`: the parameter holding the URI (for the message)."""

    def wrap(fn: F) -> F:
        import inspect

        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            bound = sig.bind_partial(*args, **kwargs)
            uri = str(bound.arguments.get(uri_arg, ""))
            options = bound.arguments.get("options")
            delays = list(RETRY_DELAYS) if retry else []
            while True:
                try:
                    return fn(*args, **kwargs)
                except (FileNotFoundError, IsADirectoryError, NotADirectoryError, FileExistsError):
                    raise
                except Exception as err:
                    named_err = classify(err, uri, options)
                    if named_err is None:
                        raise
                    if named_err.transient and delays and not named_err.final:
                        delay = delays.pop(0)
                        print(f"storage: {named_err.message}; retrying in {delay:g}s", file=sys.stderr, flush=True)
                        _sleep(delay)
                        continue
                    named_err.final = retry or named_err.final
                    if named_err is err:
                        raise
                    raise named_err from err

        return run  # type: ignore[return-value]

    return wrap
