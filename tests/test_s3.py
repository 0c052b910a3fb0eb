"""musicrec.s3 against a real S3 server on localhost (moto's server mode); never the internet."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from musicrec.errors import DataError
from musicrec.io import INPUT_FILES, MANIFEST
from musicrec.s3 import aws_credentials, download_real_data, pull_artefacts, push_artefacts
from musicrec.settings import Settings

REPO = Path(__file__).resolve().parents[1]
PREFIX = "ym"


@pytest.fixture(autouse=True)
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Test credentials, no profile files or instance metadata, no stray settings or .env."""
    monkeypatch.chdir(tmp_path)
    for var in list(os.environ):
        if var.startswith(("MUSICREC_", "AWS_")):
            monkeypatch.delenv(var)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


def drop_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")


def admin(endpoint: str):
    """A signed client with explicit keys, independent of the environment under test."""
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="admin",
        aws_secret_access_key="admin",
    )


def new_bucket(endpoint: str) -> str:
    name = f"b-{uuid.uuid4().hex[:12]}"
    admin(endpoint).create_bucket(Bucket=name)
    return name


def parquet_bytes(path: Path, n: int) -> bytes:
    pq.write_table(pa.table({"track_id": pa.array(range(n), pa.int64())}), path)
    return path.read_bytes()


def upload_sources(
    endpoint: str, bucket: str, tmp_path: Path, names=INPUT_FILES, acl: str | None = "public-read"
) -> dict[str, bytes]:
    """Three tiny parquet objects under ym/, public-read like the real bucket."""
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    client = admin(endpoint)
    bodies = {}
    for n, name in enumerate(names, start=1):
        body = parquet_bytes(src / name, 3 * n)
        extra = {"ACL": acl} if acl else {}
        client.put_object(Bucket=bucket, Key=f"{PREFIX}/{name}", Body=body, **extra)
        bodies[name] = body
    return bodies


def source_settings(endpoint: str, bucket: str) -> Settings:
    return Settings(source_endpoint_url=endpoint, source_bucket=bucket, source_prefix=PREFIX)


def artefact_settings(endpoint: str, bucket: str | None, folder: Path, prefix="runs/a") -> Settings:
    return Settings(
        s3_endpoint_url=endpoint, s3_bucket=bucket, s3_prefix=prefix, parquet_dir=folder
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- download ----------------------------------------------------------------------------------


def test_download_writes_the_three_files(endpoint: str, tmp_path: Path) -> None:
    bucket = new_bucket(endpoint)
    bodies = upload_sources(endpoint, bucket, tmp_path)
    out = tmp_path / "data"
    paths = download_real_data(source_settings(endpoint, bucket), out)
    assert paths == [out / name for name in INPUT_FILES]
    for path in paths:
        assert path.read_bytes() == bodies[path.name]
    assert pq.read_table(out / "interactions.parquet").num_rows == 9
    assert sorted(p.name for p in out.iterdir()) == sorted(INPUT_FILES)  # no temporary files


def test_second_download_skips_complete_files_unless_forced(endpoint: str, tmp_path: Path) -> None:
    bucket = new_bucket(endpoint)
    bodies = upload_sources(endpoint, bucket, tmp_path)
    settings = source_settings(endpoint, bucket)
    out = tmp_path / "data"
    download_real_data(settings, out)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    # Change the remote object but keep its size: a skipped file keeps the old bytes.
    changed = b"x" * len(bodies["tracks.parquet"])
    admin(endpoint).put_object(
        Bucket=bucket, Key=f"{PREFIX}/tracks.parquet", Body=changed, ACL="public-read"
    )
    download_real_data(settings, out)
    assert (out / "tracks.parquet").read_bytes() == bodies["tracks.parquet"]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
    download_real_data(settings, out, force=True)
    assert (out / "tracks.parquet").read_bytes() == changed


def test_truncated_file_is_downloaded_again(endpoint: str, tmp_path: Path) -> None:
    bucket = new_bucket(endpoint)
    bodies = upload_sources(endpoint, bucket, tmp_path)
    out = tmp_path / "data"
    out.mkdir()
    (out / "interactions.parquet").write_bytes(bodies["interactions.parquet"][:100])
    download_real_data(source_settings(endpoint, bucket), out)
    assert (out / "interactions.parquet").read_bytes() == bodies["interactions.parquet"]


def test_missing_object_names_the_key(endpoint: str, tmp_path: Path) -> None:
    bucket = new_bucket(endpoint)
    upload_sources(endpoint, bucket, tmp_path, names=INPUT_FILES[:2])
    out = tmp_path / "data"
    with pytest.raises(DataError, match=rf"s3://{bucket}/ym/interactions.parquet .*no such object"):
        download_real_data(source_settings(endpoint, bucket), out)
    assert not (out / "interactions.parquet").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_missing_bucket_is_named(endpoint: str, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="bucket no-such-bucket-x .*does not exist"):
        download_real_data(source_settings(endpoint, "no-such-bucket-x"), tmp_path / "data")


def test_unreachable_endpoint(tmp_path: Path) -> None:
    settings = source_settings(f"http://127.0.0.1:{free_port()}", "mle-data")
    with pytest.raises(DataError, match="ym/tracks.parquet .*cannot reach the endpoint"):
        download_real_data(settings, tmp_path / "data")


def test_anonymous_without_credentials(
    endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No credentials: anonymous requests read public objects and are refused private ones."""
    drop_credentials(monkeypatch)
    assert aws_credentials() is None
    public = new_bucket(endpoint)
    bodies = upload_sources(endpoint, public, tmp_path)
    paths = download_real_data(source_settings(endpoint, public), tmp_path / "pub")
    assert [p.read_bytes() for p in paths] == [bodies[name] for name in INPUT_FILES]

    private = new_bucket(endpoint)
    upload_sources(endpoint, private, tmp_path, acl=None)
    with pytest.raises(DataError, match=rf"s3://{private}/ym/tracks.parquet .*access denied"):
        download_real_data(source_settings(endpoint, private), tmp_path / "priv")


def test_signed_with_credentials_from_dotenv(
    endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Credentials from .env sign the requests, so private objects (refused anonymously) load."""
    drop_credentials(monkeypatch)
    (tmp_path / ".env").write_text("AWS_ACCESS_KEY_ID=fromfile\nAWS_SECRET_ACCESS_KEY=secret\n")
    bucket = new_bucket(endpoint)
    bodies = upload_sources(endpoint, bucket, tmp_path, acl=None)
    paths = download_real_data(source_settings(endpoint, bucket), tmp_path / "data")
    assert [p.read_bytes() for p in paths] == [bodies[name] for name in INPUT_FILES]
    assert "AWS_ACCESS_KEY_ID" not in os.environ  # the environment is left alone


def test_environment_wins_over_dotenv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / ".env").write_text(
        "AWS_ACCESS_KEY_ID=fromfile\nAWS_SECRET_ACCESS_KEY=filesecret\nAWS_SESSION_TOKEN=tok\n"
    )
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "fromenv")
    assert aws_credentials() == {
        "AWS_ACCESS_KEY_ID": "fromenv",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "tok",
    }
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    (tmp_path / ".env").write_text("AWS_ACCESS_KEY_ID=only-the-id\n")
    assert aws_credentials() is None


# --- push / pull -------------------------------------------------------------------------------


def make_artefacts(folder: Path) -> dict[str, bytes]:
    """A parquet folder as the pipeline leaves it, plus files that must not be pushed."""
    folder.mkdir(parents=True)
    files = {
        "items.parquet": parquet_bytes(folder / "items.parquet", 5),
        "recommendations.parquet": parquet_bytes(folder / "recommendations.parquet", 7),
        MANIFEST: b'{"run_id": "r1"}',
        "metrics.png": bytes(range(256)) * 3,
        "ranker.cbm": b"\x00model\xff" * 50,
    }
    for name, body in files.items():
        (folder / name).write_bytes(body)
    for junk in (".items.parquet.abc.tmp", "history.db", "history.db-wal"):
        (folder / junk).write_bytes(b"junk")
    # the pipeline's input sits in the same folder and is not an artefact
    parquet_bytes(folder / "events.parquet", 9)
    return files


def test_push_then_pull_round_trip(endpoint: str, tmp_path: Path) -> None:
    bucket = new_bucket(endpoint)
    files = make_artefacts(tmp_path / "parquet")
    keys = push_artefacts(artefact_settings(endpoint, bucket, tmp_path / "parquet"))
    assert keys[-1] == f"runs/a/{MANIFEST}"
    assert sorted(keys) == sorted(f"runs/a/{name}" for name in files)
    listed = admin(endpoint).list_objects_v2(Bucket=bucket)["Contents"]
    assert sorted(obj["Key"] for obj in listed) == sorted(keys)

    out = tmp_path / "pulled"
    paths = pull_artefacts(artefact_settings(endpoint, bucket, out))
    assert paths[-1] == str(out / MANIFEST)
    assert sorted(p.name for p in out.iterdir()) == sorted(files)
    for name, body in files.items():
        assert (out / name).read_bytes() == body


def test_pull_keeps_to_its_prefix(endpoint: str, tmp_path: Path) -> None:
    bucket = new_bucket(endpoint)
    files = make_artefacts(tmp_path / "parquet")
    push_artefacts(artefact_settings(endpoint, bucket, tmp_path / "parquet", prefix="runs/a"))
    client = admin(endpoint)
    client.put_object(Bucket=bucket, Key="runs/a/old/items.parquet", Body=b"nested")
    client.put_object(Bucket=bucket, Key="runs/ab/other.json", Body=b"{}")
    out = tmp_path / "pulled"
    pull_artefacts(artefact_settings(endpoint, bucket, out, prefix="runs/a/"))
    assert sorted(p.name for p in out.iterdir()) == sorted(files)


def test_push_and_pull_need_a_bucket(endpoint: str, tmp_path: Path) -> None:
    make_artefacts(tmp_path / "parquet")
    unset = artefact_settings(endpoint, None, tmp_path / "parquet")
    with pytest.raises(DataError, match="MUSICREC_S3_BUCKET"):
        push_artefacts(unset)
    with pytest.raises(DataError, match="MUSICREC_S3_BUCKET"):
        pull_artefacts(unset)
    missing = artefact_settings(endpoint, "no-such-bucket-y", tmp_path / "parquet")
    with pytest.raises(DataError, match="bucket no-such-bucket-y .*does not exist"):
        push_artefacts(missing)
    with pytest.raises(DataError, match="bucket no-such-bucket-y .*does not exist"):
        pull_artefacts(missing)


def test_push_empty_folder_and_pull_empty_prefix(endpoint: str, tmp_path: Path) -> None:
    bucket = new_bucket(endpoint)
    with pytest.raises(DataError, match="no such folder"):
        push_artefacts(artefact_settings(endpoint, bucket, tmp_path / "absent"))
    (tmp_path / "only-junk").mkdir()
    (tmp_path / "only-junk" / "history.db").write_bytes(b"x")
    with pytest.raises(DataError, match="no artefacts to push"):
        push_artefacts(artefact_settings(endpoint, bucket, tmp_path / "only-junk"))
    with pytest.raises(DataError, match=rf"s3://{bucket}/runs/a/ .*no artefacts there"):
        pull_artefacts(artefact_settings(endpoint, bucket, tmp_path / "pulled"))


# --- command line ------------------------------------------------------------------------------


def run_cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, **env, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "musicrec", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_push_and_download_error(endpoint: str, tmp_path: Path) -> None:
    bucket = new_bucket(endpoint)
    files = make_artefacts(tmp_path / "parquet")
    env = {
        "MUSICREC_S3_ENDPOINT_URL": endpoint,
        "MUSICREC_S3_BUCKET": bucket,
        "MUSICREC_S3_PREFIX": "cli",
        "MUSICREC_PARQUET_DIR": str(tmp_path / "parquet"),
    }
    done = run_cli(["s3", "push"], env, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [f"cli/{name}" for name in sorted(files) if name != MANIFEST] + [
        f"cli/{MANIFEST}"
    ]

    env = {"MUSICREC_SOURCE_ENDPOINT_URL": endpoint, "MUSICREC_SOURCE_BUCKET": "no-such-bucket-z"}
    done = run_cli(["download", "--out", str(tmp_path / "data")], env, tmp_path)
    assert done.returncode == 2
    assert done.stderr.startswith("error: bucket no-such-bucket-z ")
    assert "Traceback" not in done.stderr
