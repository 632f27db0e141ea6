"""Storage exceptions named in one place (vlm_core.storage_errors), with the exceptions the real clients
raise (botocore, s3fs' translation, gcsfs, google-auth), and transient failures retried by the storage
layer while the rest are named at once."""

from __future__ import annotations

import fsspec
import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError, ReadTimeoutError
from fsspec.implementations.memory import MemoryFileSystem
from vlm_core import storage, storage_errors
from vlm_core.storage_errors import StorageError, classify

URI = "s3://vlm/runs/job"
OPTIONS = storage.s3_options(endpoint_url="http://minio.local:9000")


def client_error(code: str, op: str = "PutObject") -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": f"{code} message"}}, op)


def s3fs_translated(code: str) -> PermissionError:
    """What s3fs raises: an OSError subclass whose __cause__ is botocore's ClientError."""
    try:
        raise PermissionError(f"{code} message") from client_error(code)
    except PermissionError as err:
        return err


@pytest.mark.parametrize(
    ("err", "field", "words", "transient"),
    [
        (NoCredentialsError(), "spec.storage.secretRef", "no credentials for s3://vlm/runs/job: set AWS_ACCESS_KEY_ID",
         False),
        (s3fs_translated("SignatureDoesNotMatch"), "spec.storage.secretRef",
         "rejected the credentials for s3://vlm/runs/job (SignatureDoesNotMatch)", False),
        (s3fs_translated("InvalidAccessKeyId"), "spec.storage.secretRef", "(InvalidAccessKeyId)", False),
        (s3fs_translated("AccessDenied"), "spec.storage.uri", "access denied to s3://vlm/runs/job (AccessDenied)",
         False),
        (client_error("NoSuchBucket"), "spec.storage.uri", "bucket 'vlm' of s3://vlm/runs/job does not exist at "
         "http://minio.local:9000", False),
        (EndpointConnectionError(endpoint_url="http://minio.local:9000/vlm/x"), "spec.storage.endpointUrl",
         "cannot connect to http://minio.local:9000", True),
        (client_error("SlowDown"), "spec.storage.uri", "(SlowDown)", True),
        (client_error("503"), "spec.storage.uri", "(503)", True),
        (ReadTimeoutError(endpoint_url="http://minio.local:9000"), "spec.storage.uri", "timed out", True),
    ],
)
def test_each_storage_exception_is_one_line_naming_the_field(err, field, words, transient) -> None:
    named = classify(err, URI, OPTIONS)
    assert named is not None
    assert named.field == field and named.transient is transient
    assert named.message.startswith(f"{field}: ") and words in named.message
    assert "\n" not in named.message
    assert isinstance(named, OSError)  # code tolerating an unreadable file keeps tolerating it


def test_a_missing_object_and_a_programming_error_are_not_storage_errors() -> None:
    assert classify(FileNotFoundError("vlm/runs/job/x"), URI) is None
    assert classify(ValueError("bad json"), URI) is None
    assert classify(KeyError("x"), URI) is None


def test_gcs_errors_are_named_too() -> None:
    from gcsfs.retry import HttpError
    from google.auth.exceptions import DefaultCredentialsError

    missing = classify(DefaultCredentialsError("Could not automatically determine credentials"), "gs://b/runs")
    assert missing is not None and missing.field == "spec.storage.secretRef"
    assert "GOOGLE_APPLICATION_CREDENTIALS" in missing.message
    denied = classify(OSError("Forbidden: b/runs/x\nno storage.objects.create"), "gs://b/runs")
    assert denied is not None and denied.field == "spec.storage.uri" and "access denied" in denied.message
    busy = classify(HttpError({"code": 503, "message": "backend error"}), "gs://b/runs")
    assert busy is not None and busy.transient
    rejected = classify(HttpError({"code": 401, "message": "Invalid Credentials"}), "gs://b/runs")
    assert rejected is not None and rejected.field == "spec.storage.secretRef"


def test_a_field_given_by_the_caller_names_path_errors_but_not_credentials() -> None:
    denied = classify(s3fs_translated("AccessDenied"), "s3://models/lm", field="spec.model.languageModel")
    assert denied is not None and denied.message.startswith("spec.model.languageModel: access denied")
    nocreds = classify(NoCredentialsError(), "s3://models/lm", field="spec.model.languageModel")
    assert nocreds is not None and nocreds.field == "spec.storage.secretRef"


class FlakyFS(MemoryFileSystem):
    """An in-memory filesystem whose next `failures` calls to makedirs raise `error`."""

    protocol = "flaky"
    failures: list[BaseException] = []
    calls = 0

    def makedirs(self, path, exist_ok=False):
        FlakyFS.calls += 1
        if FlakyFS.failures:
            raise FlakyFS.failures.pop(0)
        return super().makedirs(path, exist_ok=exist_ok)


@pytest.fixture
def flaky(monkeypatch: pytest.MonkeyPatch):
    fsspec.register_implementation("flaky", FlakyFS, clobber=True)
    monkeypatch.setattr(storage_errors, "RETRY_DELAYS", (0.0, 0.0, 0.0))
    FlakyFS.failures, FlakyFS.calls = [], 0
    MemoryFileSystem.store.clear()
    return FlakyFS


def test_transient_failures_are_retried_with_backoff_and_the_write_lands(flaky, capsys) -> None:
    flaky.failures = [EndpointConnectionError(endpoint_url="http://s3:9000"), client_error("SlowDown")]
    storage.write_text("flaky://bucket/job/progress.json", "{}")
    assert flaky.calls == 3
    assert storage.read_text("flaky://bucket/job/progress.json") == "{}"
    assert capsys.readouterr().err.count("retrying in") == 2


def test_transient_failures_beyond_the_budget_are_named_once(flaky) -> None:
    flaky.failures = [client_error("503") for _ in range(10)]
    with pytest.raises(StorageError) as caught:
        storage.write_json("flaky://bucket/job/progress.json", {"step": 1})
    assert caught.value.transient and caught.value.message.startswith("spec.storage.uri: storage error")
    assert flaky.calls == 4  # one try and three retries, not retried again by the outer write_json


def test_a_permanent_failure_is_named_at_once_without_retries(flaky) -> None:
    flaky.failures = [s3fs_translated("AccessDenied")]
    with pytest.raises(StorageError) as caught:
        storage.write_bytes("flaky://bucket/job/checkpoint-2/x", b"1")
    assert flaky.calls == 1 and not caught.value.transient
    assert "access denied" in caught.value.message


def test_the_probe_leaves_nothing_behind(tmp_path) -> None:
    storage.check_writable(str(tmp_path / "runs" / "job"))
    assert list((tmp_path / "runs" / "job").iterdir()) == []


def test_gs_has_a_filesystem_as_installed_and_no_credentials_are_named(monkeypatch) -> None:
    import gcsfs

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:1")  # an emulator: anonymous access
    fs, path = storage.filesystem("gs://bucket/runs")
    assert isinstance(fs, gcsfs.GCSFileSystem) and path == "bucket/runs"
    monkeypatch.delenv("STORAGE_EMULATOR_HOST")
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    monkeypatch.setenv("HOME", "/nonexistent")  # no gcloud application-default credentials either
    with pytest.raises(StorageError) as caught:
        storage.exists("gs://bucket/runs/x")
    assert caught.value.field == "spec.storage.secretRef" and "GOOGLE_APPLICATION_CREDENTIALS" in caught.value.message


def test_a_stage_failing_on_refused_storage_is_not_retried_but_on_unavailable_storage_is() -> None:
    from vlm_operator.local import TrainerError

    assert not TrainerError("vlm_core.storage_errors.StorageError: spec.storage.uri: access denied", 0).retryable
    assert TrainerError("vlm_core.storage_errors.StorageUnavailable: spec.storage.endpointUrl: ...", 0).retryable
    unreachable = classify(EndpointConnectionError(endpoint_url="http://s3:9000"), URI)
    assert type(unreachable).__name__ == "StorageUnavailable"
    assert type(classify(s3fs_translated("AccessDenied"), URI)).__name__ == "StorageError"


def test_preflight_says_a_storage_problem_alone_and_names_a_refused_shard_by_its_field(tmp_path, monkeypatch) -> None:
    """The storage check comes first and alone (every other check would fail on it too); a shard on storage
    that refuses the credentials is a problem of that shard's field, not a crash of the preflight."""
    from test_preflight import job, write_inputs
    from vlm_operator import preflight

    j = job(tmp_path, write_inputs(tmp_path), [str(tmp_path / "a.tar")])
    assert preflight.check_stage(j, 0) == []

    def refuse(uri, *, options=None, field="spec.storage.uri"):
        raise classify(NoCredentialsError(), uri, options, field=field)

    monkeypatch.setattr(storage, "check_writable", refuse)
    problems = preflight.check_stage(j, 0)
    assert len(problems) == 1 and problems[0].startswith("spec.storage.secretRef: no credentials for file://")
    monkeypatch.undo()

    real_exists = storage.exists

    def denied(uri, *, options=None):
        if uri.endswith("a.tar"):
            raise classify(s3fs_translated("AccessDenied"), uri, options)
        return real_exists(uri, options=options)

    monkeypatch.setattr(storage, "exists", denied)
    problems = preflight.check_stage(j, 0)
    assert problems == [f"spec.stages[0].data.shards[0]: access denied to {tmp_path / 'a.tar'} (AccessDenied): "
                        "grant the credentials (spec.storage.secretRef, or the environment locally) access there "
                        "(spec.storage.uri needs read and write), or fix spec.stages[0].data.shards[0]"]
