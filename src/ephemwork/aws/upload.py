"""``bastion upload``: put the zipapp at the S3 URI that the bastion's user-data downloads."""

from __future__ import annotations

import asyncio
from pathlib import Path

import structlog

from ephemwork.aws.errors import map_aws_errors
from ephemwork.aws.plan import parse_s3_uri
from ephemwork.aws.session import AwsSettings
from ephemwork.errors import UsageError

log = structlog.get_logger(__name__)


async def upload_pyz(settings: AwsSettings, pyz: Path, uri: str) -> None:
    """Upload the file *pyz* to the S3 object *uri*."""
    bucket, key = parse_s3_uri(uri)
    try:
        body = await asyncio.to_thread(pyz.read_bytes)
    except FileNotFoundError:
        raise UsageError(
            f"{str(pyz)!r} does not exist; build it with "
            "`scripts/build_pyz.sh --target linux-aarch64` first."
        ) from None

    log.info("bastion.upload_started", uri=uri, size=len(body))
    async with settings.client("s3") as s3:
        with map_aws_errors("s3:PutObject", settings, subject=uri):
            await s3.put_object(Bucket=bucket, Key=key, Body=body)
    log.info("bastion.upload_finished", uri=uri)
