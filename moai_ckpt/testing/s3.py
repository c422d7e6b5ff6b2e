"""A real S3-compatible server on loopback, in-process, for tests of ``s3://`` storage.

`moto_s3` starts moto's `ThreadedMotoServer` on ``127.0.0.1`` and a free port, creates a fresh
bucket, points every AWS setting at it (credentials ``testing``, no profile, no instance
metadata, no proxy) so nothing can reach the network, and yields an `S3Server` that hands out
URLs and the storage options `s3fs` needs::

    with moto_s3() as server:
        ckpt = Checkpointer(server.url("run"), **server.storage_options)

It is also a pytest plugin: add ``pytest_plugins = ["moai_ckpt.testing.s3"]`` to a root
``conftest.py`` to get the ``s3_server`` (session) and ``s3_run`` (one fresh run URL per test)
fixtures. Tests skip with an install hint when ``s3fs`` or ``moto[server]`` is missing.

moto keeps its state per process, so every server gets its own bucket and every `S3Server.url`
call with no name gets a fresh prefix.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest

KEY = "testing"
SECRET = "testing"
REGION = "us-east-1"

__all__ = ["S3Run", "S3Server", "moto_s3", "s3_run", "s3_server"]


@dataclass(frozen=True)
class S3Server:
    """A running loopback S3 server with one bucket.

    Attributes:
        endpoint_url: ``http://127.0.0.1:<port>``.
        bucket: the bucket created for this server.
        storage_options: options for `s3fs` (and so for `moai_ckpt.Checkpointer` and
            `moai_ckpt.open_storage`): endpoint, credentials, and no shared instance cache, so a
            file system is never reused across servers.
    """

    endpoint_url: str
    bucket: str
    storage_options: dict[str, Any] = field(hash=False)

    @property
    def url_prefix(self) -> str:
        """``s3://<bucket>``: the root of everything this server holds for the caller."""
        return f"s3://{self.bucket}"

    def url(self, name: str | None = None) -> str:
        """An ``s3://`` URL below the bucket; a fresh unique one when ``name`` is omitted."""
        return f"{self.url_prefix}/{name or 'run-' + uuid.uuid4().hex[:12]}"

    def filesystem(self) -> Any:
        """A new `s3fs.S3FileSystem` talking to this server (for direct inspection in tests)."""
        import s3fs

        return s3fs.S3FileSystem(**self.storage_options)


@dataclass(frozen=True)
class S3Run:
    """One fresh run directory on the loopback server: its URL and storage options."""

    url: str
    storage_options: dict[str, Any] = field(hash=False)


def _isolated_aws_env(endpoint_url: str) -> dict[str, str | None]:
    """Environment that keeps every AWS client on the loopback server."""
    loopback = "127.0.0.1,localhost"
    no_proxy = ",".join(p for p in (os.environ.get("NO_PROXY"), loopback) if p)
    return {
        "AWS_ACCESS_KEY_ID": KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_SESSION_TOKEN": None,
        "AWS_SECURITY_TOKEN": None,
        "AWS_PROFILE": None,
        "AWS_DEFAULT_PROFILE": None,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_REGION": REGION,
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
        # a client that forgets endpoint_url still lands on loopback, never on AWS
        "AWS_ENDPOINT_URL": endpoint_url,
        "AWS_ENDPOINT_URL_S3": endpoint_url,
        "NO_PROXY": no_proxy,
        "no_proxy": no_proxy,
    }


@contextmanager
def _patched_env(values: dict[str, str | None]) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in values}
    try:
        for name, value in values.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _clear_s3fs_instances() -> None:
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


@contextmanager
def moto_s3(bucket: str | None = None) -> Iterator[S3Server]:
    """Run a moto S3 server on ``127.0.0.1`` (a free port) for the duration of the block.

    Args:
        bucket: name of the bucket to create (a unique ``moai-test-...`` name by default).

    Yields:
        The running server: endpoint, bucket and storage options.

    Raises:
        ImportError: ``moto[server]`` or ``s3fs`` is not installed (``pip install moai-ckpt[dev]``).
    """
    try:
        import botocore.session
        import s3fs  # noqa: F401  (fail here, with the hint, rather than deep in fsspec)
        from moto.server import ThreadedMotoServer
    except ImportError as exc:
        raise ImportError(
            f"the loopback S3 server needs moto[server] and s3fs: pip install 'moai-ckpt[dev]' ({exc})"
        ) from exc

    # werkzeug logs every request to stderr; tests only care about failures
    werkzeug_log = logging.getLogger("werkzeug")
    saved_level = werkzeug_log.level
    werkzeug_log.setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        name = bucket or f"moai-test-{uuid.uuid4().hex[:12]}"
        with _patched_env(_isolated_aws_env(endpoint)):
            client = botocore.session.get_session().create_client(
                "s3", endpoint_url=endpoint, region_name=REGION, aws_access_key_id=KEY, aws_secret_access_key=SECRET
            )
            client.create_bucket(Bucket=name)
            client.close()
            options: dict[str, Any] = {
                "key": KEY,
                "secret": SECRET,
                "endpoint_url": endpoint,
                "client_kwargs": {"region_name": REGION},
                "skip_instance_cache": True,
            }
            _clear_s3fs_instances()
            try:
                yield S3Server(endpoint_url=endpoint, bucket=name, storage_options=options)
            finally:
                _clear_s3fs_instances()
    finally:
        server.stop()
        werkzeug_log.setLevel(saved_level)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A loopback S3 server shared by the test session (skips when moto or s3fs is missing)."""
    pytest.importorskip("s3fs", reason="s3:// tests need s3fs: pip install 'moai-ckpt[dev]'")
    pytest.importorskip("moto.server", reason="s3:// tests need moto[server]: pip install 'moai-ckpt[dev]'")
    with moto_s3() as server:
        yield server


@pytest.fixture
def s3_run(s3_server: S3Server) -> S3Run:
    """A fresh, empty run directory on the session's S3 server."""
    return S3Run(url=s3_server.url(), storage_options=dict(s3_server.storage_options))
