"""S3: download the real data set, push artefacts to / pull them from the user's own bucket.

Every failure (no such bucket or object, endpoint unreachable, access denied, short download)
becomes a :class:`DataError` naming the object and the problem, so the command line prints one
line instead of a traceback. Downloads go to a temporary name beside the target and are renamed
only once complete, so a reader never sees a half-written file.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import boto3
from boto3.exceptions import Boto3Error
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError
from dotenv import dotenv_values
from tqdm import tqdm

from musicrec.errors import DataError
from musicrec.io import EVENTS, INPUT_FILES, MANIFEST, atomic_path, read_json
from musicrec.served import verify_files
from musicrec.settings import Settings

log = logging.getLogger(__name__)

CREDENTIAL_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
_DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "Forbidden"}
_MISSING = {"NoSuchKey", "NotFound", "404"}


# --- credentials and the client ----------------------------------------------------------------


def aws_credentials(env_file: Path = Path(".env")) -> dict[str, str] | None:
    """AWS credentials from the environment, else from ``env_file``; ``None`` if incomplete.

    A variable set in the environment wins over the same one in the file; the environment
    itself is never modified.
    """
    env_file = Path(env_file)
    from_file = dotenv_values(env_file) if env_file.is_file() else {}
    found: dict[str, str] = {}
    for var in CREDENTIAL_VARS:
        value = os.environ.get(var) or from_file.get(var)
        if value:
            found[var] = value
    if "AWS_ACCESS_KEY_ID" in found and "AWS_SECRET_ACCESS_KEY" in found:
        return found
    return None


def make_client(
    endpoint_url: str | None,
    region: str,
    credentials: dict[str, str] | None = None,
    signed: bool = True,
) -> Any:
    """A boto3 S3 client for ``endpoint_url`` (``None`` = AWS).

    ``signed=False`` sends anonymous requests (public buckets). Signed without ``credentials``
    lets boto3 look for them itself (profile files, instance roles). Path-style addressing and
    checksums only when required keep S3-compatible stores (Yandex, MinIO) happy.
    """
    config = Config(
        region_name=region,
        signature_version=UNSIGNED if not signed else None,
        retries={"max_attempts": 3, "mode": "standard"},
        connect_timeout=10,
        read_timeout=120,
        s3={"addressing_style": "path"} if endpoint_url else None,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    keys: dict[str, str] = {}
    if signed and credentials:
        keys = {
            "aws_access_key_id": credentials["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": credentials["AWS_SECRET_ACCESS_KEY"],
        }
        if credentials.get("AWS_SESSION_TOKEN"):
            keys["aws_session_token"] = credentials["AWS_SESSION_TOKEN"]
    session = boto3.session.Session()
    return session.client("s3", endpoint_url=endpoint_url, config=config, **keys)


# --- errors ------------------------------------------------------------------------------------


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", "")) or str(
        exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "")
    )


def _is_denied(exc: Exception) -> bool:
    return isinstance(exc, ClientError) and _error_code(exc) in _DENIED


def _describe(exc: Exception, what: str) -> str:
    """One line for a person: the object and what went wrong with it."""
    if isinstance(exc, NoCredentialsError):
        return (
            f"{what}: no AWS credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "in the environment or in a .env file in the current folder"
        )
    if isinstance(exc, ClientError):
        code = _error_code(exc)
        if code == "NoSuchBucket":
            return f"{what}: the bucket does not exist"
        if code in _MISSING:
            return f"{what}: no such object"
        if code in _DENIED:
            return f"{what}: access denied ({code}); check the credentials and the bucket's rights"
        message = exc.response.get("Error", {}).get("Message", "")
        return f"{what}: {code} {message}".rstrip()
    if isinstance(exc, BotoCoreError) and "connect" in type(exc).__name__.lower():
        return f"{what}: cannot reach the endpoint ({exc})"
    return f"{what}: {exc}"


@contextmanager
def _s3_errors(what: str) -> Iterator[None]:
    """Turn boto errors into a :class:`DataError` whose message starts with ``what``."""
    try:
        yield
    except (ClientError, BotoCoreError, Boto3Error) as exc:
        raise DataError(_describe(exc, what)) from exc


def _check_bucket(client: Any, bucket: str, where: str) -> None:
    """A clear error now, before any transfer, when the bucket is missing or closed."""
    try:
        client.head_bucket(Bucket=bucket)
    except ClientError as exc:
        if _error_code(exc) in _MISSING | {"NoSuchBucket"}:
            raise DataError(f"bucket {bucket} at {where}: the bucket does not exist") from exc
        raise DataError(_describe(exc, f"bucket {bucket} at {where}")) from exc
    except (BotoCoreError, Boto3Error) as exc:
        raise DataError(_describe(exc, f"bucket {bucket} at {where}")) from exc


def _key(prefix: str, name: str) -> str:
    prefix = prefix.strip("/")
    return f"{prefix}/{name}" if prefix else name


def _progress(total: int, name: str) -> tqdm:
    """A bytes progress bar on stderr, silent when stderr is not a terminal."""
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=name, disable=None)


def _download(client: Any, bucket: str, key: str, size: int, path: Path, what: str) -> None:
    """Download one object to a temporary name beside ``path``; rename once the size matches."""
    with atomic_path(path) as tmp, _progress(size, path.name) as bar:
        with _s3_errors(what):
            client.download_file(bucket, key, str(tmp), Callback=bar.update)
        got = tmp.stat().st_size
        if got != size:
            raise DataError(f"{what}: downloaded {got:,} bytes, expected {size:,}")


# --- the real data set -------------------------------------------------------------------------


def download_real_data(settings: Settings, out_dir: Path, force: bool = False) -> list[Path]:
    """Download the three input files of the real data set into ``out_dir``.

    Requests are signed when AWS credentials are configured (environment or ``.env``) and
    anonymous otherwise; a signed request the store refuses is retried anonymously, since the
    public bucket needs no credentials. A file already present with the object's size is kept
    unless ``force``. Returns the local paths in ``INPUT_FILES`` order.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    endpoint, bucket = settings.source_endpoint_url, settings.source_bucket
    credentials = aws_credentials()
    signed = credentials is not None
    client = make_client(endpoint, settings.source_region, credentials, signed=signed)
    paths = []
    for name in INPUT_FILES:
        key = _key(settings.source_prefix, name)
        what = f"s3://{bucket}/{key} at {endpoint}"
        try:
            head = client.head_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if not (signed and _is_denied(exc)):
                _raise_head_error(client, exc, bucket, endpoint, what)
            log.warning(
                "%s refused the signed request (%s); retrying anonymously",
                endpoint,
                _error_code(exc),
            )
            client = make_client(endpoint, settings.source_region, signed=False)
            signed = False
            with _s3_errors(what):
                head = client.head_object(Bucket=bucket, Key=key)
        except (BotoCoreError, Boto3Error) as exc:
            raise DataError(_describe(exc, what)) from exc
        size = int(head["ContentLength"])
        path = out_dir / name
        if not force and path.is_file() and path.stat().st_size == size:
            log.info("%s is complete (%s bytes), skipped", path, f"{size:,}")
        else:
            log.info("downloading %s (%s bytes) to %s", what, f"{size:,}", path)
            _download(client, bucket, key, size, path, what)
        paths.append(path)
    return paths


def _raise_head_error(client: Any, exc: ClientError, bucket: str, endpoint: str, what: str) -> None:
    """A HEAD 404 does not say whether the bucket or the key is missing: ask, then raise."""
    if _error_code(exc) in _MISSING:
        _check_bucket(client, bucket, endpoint)
    raise DataError(_describe(exc, what)) from exc


# --- artefacts in the user's bucket ------------------------------------------------------------


def _artefact_bucket(settings: Settings) -> tuple[Any, str, str]:
    """The client, bucket and a printable location of the artefact bucket; checks it exists."""
    if not settings.s3_bucket:
        raise DataError(
            "no bucket for artefacts: set MUSICREC_S3_BUCKET (and MUSICREC_S3_ENDPOINT_URL for "
            "a store other than AWS) in the environment or in .env"
        )
    where = settings.s3_endpoint_url or "AWS"
    client = make_client(settings.s3_endpoint_url, settings.s3_region, aws_credentials())
    _check_bucket(client, settings.s3_bucket, where)
    return client, settings.s3_bucket, where


def _manifest_last(names: list[str]) -> list[str]:
    """Sorted names with the manifest moved to the end: whoever sees it sees the whole set."""
    return sorted(names, key=lambda name: (name == MANIFEST, name))


def _is_artefact(name: str) -> bool:
    """Artefact files; not temporary files (``.name``) nor the online history database."""
    return not name.startswith(".") and ".db" not in name and not name.endswith(".tmp")


def upload_files(settings: Settings, folder: Path, names: list[str], key_prefix: str) -> list[str]:
    """Upload ``folder/NAME`` for each name to ``s3://bucket/<s3_prefix>/<key_prefix>NAME``,
    the manifest last (whoever sees it sees the whole set). Returns the keys written."""
    client, bucket, where = _artefact_bucket(settings)
    keys = []
    for name in _manifest_last(names):
        path = folder / name
        key = _key(settings.s3_prefix, key_prefix + name)
        size = path.stat().st_size
        log.info("uploading %s (%s bytes) to s3://%s/%s", path, f"{size:,}", bucket, key)
        with _progress(size, name) as bar, _s3_errors(f"s3://{bucket}/{key} at {where}"):
            client.upload_file(str(path), bucket, key, Callback=bar.update)
        keys.append(key)
    return keys


def download_files(
    settings: Settings, key_prefix: str, sizes: dict[str, int], folder: Path
) -> list[str]:
    """Download the objects ``sizes`` names (as :func:`list_files` gives them) under
    ``s3://bucket/<s3_prefix>/<key_prefix>`` into ``folder``: each to a temporary name
    renamed once complete, the manifest last. Returns the local paths written."""
    client, bucket, where = _artefact_bucket(settings)
    prefix = _key(settings.s3_prefix, key_prefix)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in _manifest_last(list(sizes)):
        key = prefix + name
        log.info("downloading s3://%s/%s (%s bytes)", bucket, key, f"{sizes[name]:,}")
        _download(
            client, bucket, key, sizes[name], folder / name, f"s3://{bucket}/{key} at {where}"
        )
        paths.append(str(folder / name))
    return paths


def list_files(settings: Settings, key_prefix: str, recursive: bool = True) -> dict[str, int]:
    """Artefact names under ``<s3_prefix>/<key_prefix>`` and their sizes."""
    client, bucket, where = _artefact_bucket(settings)
    prefix = _key(settings.s3_prefix, key_prefix)
    sizes: dict[str, int] = {}
    with _s3_errors(f"s3://{bucket}/{prefix} at {where}"):
        pages = client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=prefix, **({} if recursive else {"Delimiter": "/"})
        )
        for page in pages:
            for obj in page.get("Contents", []):
                name = obj["Key"][len(prefix) :]
                if name and _is_artefact(name):
                    sizes[name] = int(obj["Size"])
    return sizes


def location(settings: Settings, key_prefix: str) -> str:
    """``s3://bucket/key at endpoint`` of a key, for messages."""
    where = settings.s3_endpoint_url or "AWS"
    return f"s3://{settings.s3_bucket}/{_key(settings.s3_prefix, key_prefix)} at {where}"


def put_text(settings: Settings, key_suffix: str, text: str) -> str:
    """Write a small text object (a pointer) at ``<s3_prefix>/<key_suffix>``; its key."""
    client, bucket, where = _artefact_bucket(settings)
    key = _key(settings.s3_prefix, key_suffix)
    with _s3_errors(f"s3://{bucket}/{key} at {where}"):
        client.put_object(Bucket=bucket, Key=key, Body=text.encode())
    return key


def get_text(settings: Settings, key_suffix: str) -> str | None:
    """The small text object at ``<s3_prefix>/<key_suffix>``; None when there is none."""
    client, bucket, where = _artefact_bucket(settings)
    key = _key(settings.s3_prefix, key_suffix)
    try:
        return client.get_object(Bucket=bucket, Key=key)["Body"].read().decode().strip()
    except ClientError as exc:
        if _error_code(exc) in _MISSING:
            return None
        raise DataError(_describe(exc, f"s3://{bucket}/{key} at {where}")) from exc


def push_artefacts(settings: Settings) -> list[str]:
    """Upload every artefact of ``settings.parquet_dir`` to ``s3://bucket/prefix/NAME``.

    ``manifest.json`` goes last. The pipeline's input (``events.parquet``) is not an artefact
    and stays behind. Returns the keys written, in upload order.
    """
    folder = Path(settings.parquet_dir)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder; run the pipeline first")
    names = [
        p.name
        for p in folder.iterdir()
        if p.is_file() and _is_artefact(p.name) and p.name != EVENTS
    ]
    if not names:
        raise DataError(f"{folder}: no artefacts to push; run the pipeline first")
    if MANIFEST not in names:
        log.warning("%s has no %s; pushing the files anyway", folder, MANIFEST)
    return upload_files(settings, folder, names, "")


def pull_artefacts(settings: Settings) -> list[str]:
    """Download every artefact under ``s3://bucket/prefix/`` into ``settings.parquet_dir``.

    Each file goes to a temporary name and is renamed once complete; ``manifest.json`` last.
    The served (memory-mapped) files travel like any other and are checked against the
    checksums the manifest records once all is down. Returns the local paths written, in
    download order.
    """
    sizes = list_files(settings, "", recursive=False)
    if not sizes:
        raise DataError(f"{location(settings, '')}: no artefacts there; push first")
    if MANIFEST not in sizes:
        log.warning("%s has no %s; pulling the files anyway", location(settings, ""), MANIFEST)
    folder = Path(settings.parquet_dir)
    paths = download_files(settings, "", sizes, folder)
    if MANIFEST in sizes:  # the served (memory-mapped) files: checked now, not at start-up
        checked = verify_files(folder, read_json(folder / MANIFEST))
        log.info("%d served files match their checksums in %s", len(checked), MANIFEST)
    return paths
