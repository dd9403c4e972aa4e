"""The settings of ``FsspecStorageBackend``, checked in its ``__init__`` before any I/O.

Part size and parts in flight decide the upload's memory: about ``(max_concurrency + 1) x
block_size`` (the parts in flight and the block being read). The defaults keep a 1 GB round
trip under 200 MB of RSS growth (``tests/test_backend_faults.py``) at close to the rate of
64 MiB parts; S3 itself allows parts from 5 MiB to 5 GiB.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import InvalidArgumentError

__all__ = ["DEFAULT_BLOCK_SIZE", "DEFAULT_CONCURRENCY", "check_block_size", "check_concurrency",
           "filesystem_options"]

_MIB = 1024 * 1024
DEFAULT_BLOCK_SIZE = 16 * _MIB
DEFAULT_CONCURRENCY = 4
_PART_LIMITS = (5 * _MIB, 5 * 1024 * _MIB)  # S3's smallest and largest part
# Credentials in storage_options would travel with the backend object (pickles, reprs, a
# store config someone saves): S3 credentials come from the provider chain instead.
_S3_SECRET_OPTIONS = {"key", "secret", "token", "username", "password"}
_S3_SECRET_CLIENT_KWARGS = {"aws_access_key_id", "aws_secret_access_key", "aws_session_token"}


def check_block_size(block_size: int | None) -> int:
    if block_size is None:
        return DEFAULT_BLOCK_SIZE
    low, high = _PART_LIMITS
    if isinstance(block_size, bool) or not isinstance(block_size, int) \
            or not low <= block_size <= high:
        raise InvalidArgumentError(
            f"block_size must be a whole number of bytes from 5 MiB to 5 GiB (S3's part "
            f"limits), got {block_size!r}", argument="block_size")
    return block_size


def check_concurrency(max_concurrency: int | None) -> int:
    if max_concurrency is None:
        return DEFAULT_CONCURRENCY
    if isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int) \
            or not 1 <= max_concurrency <= 64:
        raise InvalidArgumentError(f"max_concurrency must be a whole number from 1 to 64 (parts "
                                   f"in flight at once), got {max_concurrency!r}",
                                   argument="max_concurrency")
    return max_concurrency


def filesystem_options(protocol: str, storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The caller's options plus ours: no listing cache (another process's uploads must be
    seen), and no retry loop inside botocore (ours is the one, see ``Retrying``)."""
    if storage_options is not None and not isinstance(storage_options, Mapping):
        raise InvalidArgumentError(f"storage_options must be a mapping, got "
                                   f"{type(storage_options).__name__}", argument="storage_options")
    options = dict(storage_options or {})
    if protocol == "s3":
        secrets = (_S3_SECRET_OPTIONS & set(options)) | (
            _S3_SECRET_CLIENT_KWARGS & set(options.get("client_kwargs") or {}))
        if secrets:
            raise InvalidArgumentError(
                f"storage_options {sorted(secrets)} carry credentials, which repro never "
                "holds: set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in the "
                "environment instead", argument="storage_options")
        config = dict(options.get("config_kwargs") or {})
        config.setdefault("retries", {"total_max_attempts": 1, "mode": "standard"})
        # botocore waits 60 s for a connection and for each read by default: a blackholed
        # endpoint would then take minutes per attempt, not the bounded retry we promise
        config.setdefault("connect_timeout", 10)
        config.setdefault("read_timeout", 60)
        options["config_kwargs"] = config
    if protocol != "file":
        options.setdefault("use_listings_cache", False)
    return options
