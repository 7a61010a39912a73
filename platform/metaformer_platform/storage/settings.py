"""The one source of S3 settings: endpoint, region, credentials and retries, read from the standard environment.

boto3 (``storage/s3.py``: shards and every file the platform moves) and pyarrow (Ray Train's checkpoint filesystem) are both built
from ``S3Settings.from_env()``, so they always reach the same server with the same keys and retry policy:
AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, AWS_REGION / AWS_DEFAULT_REGION, AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN (without static keys, each SDK walks the rest of the chain:
AWS_PROFILE, config files, roles), AWS_RETRY_MODE / AWS_MAX_ATTEMPTS.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pyarrow.fs

    from metaformer_platform.storage.types import S3Client

__all__ = ["AWS_ENV_VARS", "AWS_SECRET_VARS", "CREDENTIAL_VARS", "S3Settings", "aws_env"]

# The S3 settings a driver forwards to workers of a cluster started before the job (Ray's runtime_env).
# Only where and how to connect: never a credential, because Ray writes a job's runtime_env into
# world-readable files under its session folder, onto worker command lines and into `ray list actors
# --detail`. Credentials reach workers the way the ecosystem intends: the nodes' own environment (set where
# `ray start` runs), an instance role / IRSA, a Kubernetes Secret mounted as env or file, or a shared
# credentials file named by AWS_SHARED_CREDENTIALS_FILE.
AWS_ENV_VARS = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_PROFILE",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_RETRY_MODE",
    "AWS_MAX_ATTEMPTS",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
)
AWS_SECRET_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
CREDENTIAL_VARS = "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN or AWS_PROFILE if you use them)"


def aws_env() -> dict[str, str]:
    """The non-secret S3 settings of this process's environment (endpoint, region, profile, retries,
    credential file paths), for workers that do not inherit it, so that they reach the storage the driver
    checked. Credentials are never in it: see AWS_ENV_VARS."""
    return {name: os.environ[name] for name in AWS_ENV_VARS if name in os.environ}


@dataclass(frozen=True)
class S3Settings:
    """How to reach S3: one resolution of the environment, handed to boto3 and to pyarrow alike."""

    endpoint: str | None
    region: str
    access_key: str | None
    secret_key: str | None
    session_token: str | None
    retry_mode: str
    max_attempts: int

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> S3Settings:
        """The settings of ``env`` (default: this process's environment)."""
        env = os.environ if env is None else env
        has_keys = bool(env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"))
        try:
            attempts = int(env.get("AWS_MAX_ATTEMPTS", "8"))
        except ValueError:
            raise ValueError(f"AWS_MAX_ATTEMPTS={env['AWS_MAX_ATTEMPTS']!r} is not a whole number") from None
        return cls(
            endpoint=env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None,
            # The region only names the signing scope for S3-compatible servers; AWS itself redirects.
            region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
            access_key=env["AWS_ACCESS_KEY_ID"] if has_keys else None,
            secret_key=env["AWS_SECRET_ACCESS_KEY"] if has_keys else None,
            session_token=(env.get("AWS_SESSION_TOKEN") or None) if has_keys else None,
            retry_mode=env.get("AWS_RETRY_MODE", "standard"),
            max_attempts=attempts,
        )

    @property
    def endpoint_label(self) -> str:
        """The endpoint for messages."""
        return self.endpoint or "AWS's default endpoint"

    def boto3_client(self, *, max_attempts: int | None = None, **config: float | int) -> S3Client:
        """A boto3 S3 client with these settings (``max_attempts`` lowers the attempts for a quick check);
        ``config`` adds botocore ``Config`` options (timeouts, pool)."""
        import boto3
        from botocore.config import Config

        # AWS_MAX_ATTEMPTS counts the first try too: botocore's total_max_attempts (its max_attempts would not)
        retries: dict[str, str | int] = {"mode": self.retry_mode, "total_max_attempts": max_attempts or self.max_attempts}
        keys: dict[str, str | None] = {}
        if self.access_key:  # else boto3 walks its own chain (profiles, roles)
            keys = {"aws_access_key_id": self.access_key, "aws_secret_access_key": self.secret_key,
                    "aws_session_token": self.session_token}
        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, config=Config(retries=retries, region_name=self.region, **config), **keys
        )

    def pyarrow_filesystem(self) -> pyarrow.fs.S3FileSystem:
        """A ``pyarrow.fs.S3FileSystem`` with these settings.

        Static keys go into the filesystem itself: it is pickled into Ray's run config, and Ray Train's
        controller actor does not inherit the job's environment."""
        from pyarrow import fs as pafs

        kwargs: dict[str, object] = {
            "region": self.region,
            # the bucket must exist (the driver checks it); a typo must not create a new one
            "allow_bucket_creation": False,
            "allow_bucket_deletion": False,
            "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=self.max_attempts),
        }
        if self.endpoint:
            scheme, sep, rest = self.endpoint.partition("://")
            kwargs["endpoint_override"] = rest.rstrip("/") if sep else self.endpoint
            kwargs["scheme"] = scheme if sep else "https"
        if self.access_key:
            kwargs.update(access_key=self.access_key, secret_key=self.secret_key)
            if self.session_token:
                kwargs["session_token"] = self.session_token
        return pafs.S3FileSystem(**kwargs)
