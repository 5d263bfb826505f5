"""AWS settings (region, profile and endpoint) and the aioboto3 clients built from them.

Nothing here runs at import time: aioboto3 is imported inside `AwsSettings.client`, so that
plans, ``--help`` and the bastion never load botocore.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs

# Overrides the endpoint of every AWS service, for example a moto server in tests. botocore
# also reads AWS_ENDPOINT_URL itself; this one wins over it.
ENDPOINT_ENV = "EPHEMWORK_AWS_ENDPOINT_URL"

# Few retries: a plan is interactive, and throttling here is rare.
_MAX_ATTEMPTS = 3


@attrs.frozen
class AwsSettings:
    """The region, profile and optional endpoint that every AWS call of one command uses."""

    region: str
    profile: str | None = None
    endpoint_url: str | None = None

    @classmethod
    def resolve(
        cls,
        region: str,
        profile: str | None = None,
        endpoint_url: str | None = None,
        *,
        configured_endpoint: str | None = None,
    ) -> AwsSettings:
        """Pick the endpoint: *endpoint_url* (a flag), then the environment, then the config."""
        endpoint = endpoint_url or os.environ.get(ENDPOINT_ENV) or configured_endpoint or None
        return cls(region=region, profile=profile, endpoint_url=endpoint)

    def describe(self) -> str:
        """Summarise the settings for plans and logs."""
        parts = [f"region {self.region}"]
        if self.profile:
            parts.append(f"profile {self.profile}")
        if self.endpoint_url:
            parts.append(f"endpoint {self.endpoint_url}")
        return ", ".join(parts)

    @asynccontextmanager
    async def client(self, service: str) -> AsyncIterator[Any]:
        """Yield an aioboto3 client for *service*, closed when the block ends."""
        import aioboto3
        from botocore.config import Config

        from ephemwork.aws.errors import map_aws_errors

        config = Config(retries={"max_attempts": _MAX_ATTEMPTS, "mode": "standard"})
        # The profile is read here; credentials are resolved at the first call, which the
        # caller wraps in map_aws_errors too.
        with map_aws_errors(f"{service} client", self):
            session = aioboto3.Session(profile_name=self.profile, region_name=self.region)
            context = session.client(service, endpoint_url=self.endpoint_url, config=config)
            client = await context.__aenter__()
        try:
            yield client
        finally:
            await context.__aexit__(None, None, None)
