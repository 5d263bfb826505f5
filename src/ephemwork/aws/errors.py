"""Translate botocore exceptions into ephemwork errors that name the fix.

`map_aws_errors` wraps one AWS call. It receives the IAM action of the call, so a denied call
names the exact permission to ask for, and every other failure keeps its AWS error code.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import structlog

from ephemwork.aws.session import AwsSettings
from ephemwork.errors import AwsError, AwsSetupError, EphemworkError

log = structlog.get_logger(__name__)

_DENIED = {"AccessDenied", "AccessDeniedException", "UnauthorizedOperation", "AuthorizationError"}
_EXPIRED = {"ExpiredToken", "ExpiredTokenException", "RequestExpired"}
_BAD_CREDENTIALS = {
    "AuthFailure",
    "InvalidClientTokenId",
    "UnrecognizedClientException",
    "SignatureDoesNotMatch",
}
_INSTANCE_NOT_FOUND = {
    "InvalidInstanceID.NotFound",
    "InvalidInstanceID.Malformed",
    "EC2InstanceNotFoundException",
}
_NOT_MANAGED = {"TargetNotConnected", "InvalidInstanceId"}

_SSO_FIX = "run `aws sso login` (with --profile if you use one) and try again"


@contextmanager
def map_aws_errors(action: str, settings: AwsSettings, *, subject: str = "") -> Iterator[None]:
    """Turn a botocore failure of the IAM *action* (``ec2:RunInstances``) into our errors.

    *subject* names what the call was about, such as an instance id, for the messages.
    """
    from botocore import exceptions as boto

    try:
        yield
    except EphemworkError:
        raise
    except boto.ClientError as exc:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", "Unknown"))
        message = str(error.get("Message", "")).rstrip(".")
        log.warning("aws.call_failed", action=action, code=code, subject=subject or None)
        raise _client_error(action, settings, subject, code, message) from exc
    except (
        boto.SSOTokenLoadError,
        boto.UnauthorizedSSOTokenError,
        boto.TokenRetrievalError,
    ) as exc:
        log.warning("aws.sso_expired", action=action, error=type(exc).__name__)
        raise AwsSetupError(
            f"The AWS SSO session for {_profile(settings)} has expired or was never started; "
            f"{_SSO_FIX}."
        ) from exc
    except (boto.NoCredentialsError, boto.PartialCredentialsError) as exc:
        log.warning("aws.no_credentials", action=action)
        raise AwsSetupError(
            f"No AWS credentials found for {_profile(settings)}; run `aws configure sso` "
            "(or `aws sso login`), or set AWS_PROFILE to a configured profile."
        ) from exc
    except boto.ProfileNotFound as exc:
        log.warning("aws.profile_not_found", profile=settings.profile)
        raise AwsSetupError(
            f"AWS profile {settings.profile!r} is not in ~/.aws/config; fix tunnel.profile "
            "or run `aws configure sso --profile NAME`."
        ) from exc
    except boto.NoRegionError as exc:
        raise AwsSetupError(
            'No AWS region is set; add region = "eu-west-1" (your region) to [tunnel].'
        ) from exc
    except boto.EndpointConnectionError as exc:
        log.warning(
            "aws.endpoint_unreachable", action=action, endpoint=exc.kwargs.get("endpoint_url")
        )
        raise AwsSetupError(
            f"Cannot reach the AWS endpoint {exc.kwargs.get('endpoint_url')!r} for {action} "
            f"in region {settings.region!r}; check tunnel.region (a misspelt region has no "
            "endpoint) and your network."
        ) from exc
    except boto.BotoCoreError as exc:
        log.warning("aws.call_failed", action=action, error=str(exc))
        raise AwsError(f"AWS call {action} failed: {exc}.") from exc


def _client_error(
    action: str, settings: AwsSettings, subject: str, code: str, message: str
) -> EphemworkError:
    region = settings.region
    if code in _DENIED:
        return AwsSetupError(
            f"IAM permission missing: your AWS identity may not call {action} in region "
            f"{region!r} ({code}); ask your AWS administrator to allow {action!r} "
            "(the README lists every action ephemwork needs)."
        )
    if code in _EXPIRED:
        return AwsSetupError(f"The AWS credentials have expired ({code}); {_SSO_FIX}.")
    if code in _BAD_CREDENTIALS:
        return AwsSetupError(
            f"AWS rejected the credentials of {_profile(settings)} in region {region!r} "
            f"({code}); check AWS_PROFILE, run `aws sso login`, and check that tunnel.region "
            "is a region your account uses."
        )
    if code in _INSTANCE_NOT_FOUND:
        return AwsSetupError(
            f"EC2 instance {subject!r} was not found in region {region!r} ({code}); check "
            "tunnel.instance_id and tunnel.region, or run `ephemwork bastion status`."
        )
    if code in _NOT_MANAGED:
        return AwsSetupError(
            f"EC2 instance {subject!r} is not managed by SSM in region {region!r} ({code}): its "
            "SSM agent is offline or its role lacks AmazonSSMManagedInstanceCore; run "
            "`ephemwork bastion status` and wait for ping status Online."
        )
    detail = f": {message}" if message else ""
    return AwsError(f"AWS call {action} failed with {code}{detail}.", code=code)


def _profile(settings: AwsSettings) -> str:
    return f"profile {settings.profile!r}" if settings.profile else "the default AWS profile"
