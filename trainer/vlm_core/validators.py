"""Value checks the typed spec applies to strings: storage URIs, Kubernetes quantities, DNS names.

Torch-free, pure; each raises ValueError with a message saying what is accepted (pydantic puts the
field path in front).
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from urllib.parse import urlsplit

from vlm_core.redact import contains_credentials

STORAGE_SCHEMES = ("file", "s3", "gs", "gcs")  # where a job writes, and where checkpoint folders are read from
# Single files a stage only reads (shards, a probe, a concepts list) may also come over HTTP(S): fsspec's http
# filesystem opens them; a folder (a model checkpoint) cannot be listed there.
FILE_SCHEMES = (*STORAGE_SCHEMES, "http", "https")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_NO_CREDENTIALS = "holds a credential; put credentials in a Secret and name it in spec.storage.secretRef"

# Kubernetes resource.Quantity: <number><suffix>, suffix binary (Ki..Ei), decimal (n u m k M G T P E) or
# a decimal exponent (e3, E-2). The same grammar the API server parses.
_QUANTITY = re.compile(r"^(?P<num>[+-]?(?:\d+\.?\d*|\.\d+))(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]|[eE][+-]?\d+)?$")
_FACTORS: dict[str, int | Decimal] = {
    "": 1, "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "k": 10**3, "M": 10**6,
    "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
}


def dns_label(value: str, *, max_length: int = 63) -> str:
    if len(value) > max_length or not _DNS_LABEL.match(value):
        raise ValueError(
            f"must be a lowercase DNS label of at most {max_length} characters ([a-z0-9-], starting and ending "
            f"with a letter or digit), got {value!r}"
        )
    return value


def no_credentials(value: str) -> str:
    if contains_credentials(value):
        raise ValueError(_NO_CREDENTIALS)
    return value


def no_credentials_in(values: list[str] | None) -> list[str] | None:
    """Every URL of a list (shards) without inline credentials."""
    for value in values or []:
        no_credentials(value)
    return values


def known_scheme(value: str, accepted: tuple[str, ...] = STORAGE_SCHEMES) -> str:
    """A plain path, or a URI whose scheme is one of `accepted` (an unknown one would fail only when the stage
    runs, or be read as a local folder named like the scheme)."""
    if "://" in value:
        scheme = value.split("://", 1)[0]
        if scheme not in accepted:
            raise ValueError(f"unknown URI scheme {scheme}:// in {value!r}; accepted: "
                             f"{', '.join(s + '://' for s in accepted)} or a plain path")
    return value


def input_uri(value: str, accepted: tuple[str, ...] = FILE_SCHEMES) -> str:
    """A path or URI a stage reads: no inline credentials, a known scheme."""
    return known_scheme(no_credentials(value), accepted)


def input_uris(values: list[str], accepted: tuple[str, ...] = FILE_SCHEMES) -> list[str]:
    """Every path or URI of a list (shards) a stage reads: no inline credentials, known schemes."""
    for value in values:
        input_uri(value, accepted)
    return values


def storage_uri(value: str) -> str:
    """A base URI that names a place: file:// (or a path), s3://bucket[/prefix], gs://bucket[/prefix].

    Never empty, never the filesystem root, never a bucket-less s3:// (which fsspec would turn into a
    local folder named 's3:'), never credentials inline."""
    no_credentials(value)
    v = value.strip()
    if not v:
        raise ValueError("must name a storage location (file:///path, s3://bucket/prefix, gs://bucket/prefix), got ''")
    if "://" in v:
        scheme = v.split("://", 1)[0]
        if scheme not in STORAGE_SCHEMES:
            raise ValueError(f"scheme must be one of file://, s3://, gs://, got {scheme}://")
        parts = urlsplit(v)
        if scheme in ("s3", "gs", "gcs"):
            if not parts.netloc:
                raise ValueError(f"{scheme}:// needs a bucket, e.g. {scheme}://my-bucket/runs, got {value!r}")
            return v.rstrip("/")
        path = v[len("file://"):]
    else:
        path = v
    if not path.strip("/"):
        raise ValueError(f"must not be the filesystem root, got {value!r}; name a folder, e.g. file:///data/runs")
    return v.rstrip("/")


def endpoint_url(value: str) -> str:
    no_credentials(value)
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"must be an http(s) URL such as https://minio.example:9000, got {value!r}")
    return value


def quantity(value: str) -> Decimal:
    """The value of a Kubernetes quantity ('500m' -> 0.5, '64Gi' -> 68719476736); ValueError otherwise."""
    m = _QUANTITY.match(value.strip()) if isinstance(value, str) else None
    if not m:
        raise ValueError(
            f"must be a Kubernetes quantity such as '8', '500m' (CPU) or '64Gi', '512Mi' (memory), got {value!r}"
        )
    suffix = m.group("suffix") or ""
    try:
        number = Decimal(m.group("num"))
        factor = Decimal(10) ** int(suffix[1:]) if suffix[:1] in ("e", "E") and len(suffix) > 1 else Decimal(_FACTORS[suffix])
    except (InvalidOperation, KeyError, ValueError):
        raise ValueError(f"must be a Kubernetes quantity such as '8' or '64Gi', got {value!r}") from None
    return number * factor


def positive_quantity(value: str) -> str:
    if quantity(value) <= 0:
        raise ValueError(f"must be greater than zero, got {value!r}")
    return value
