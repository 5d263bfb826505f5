"""`map_aws_errors`: each botocore failure becomes our error with the fix in its message."""

from __future__ import annotations

import pytest
from botocore import exceptions as boto

from ephemwork.aws.errors import map_aws_errors
from ephemwork.aws.session import AwsSettings
from ephemwork.errors import AwsError, AwsSetupError, EphemworkError

SETTINGS = AwsSettings(region="eu-west-1", profile="staging")


def _client_error(code: str, operation: str = "DescribeInstances") -> boto.ClientError:
    return boto.ClientError({"Error": {"Code": code, "Message": "no"}}, operation)


def _mapped(exc: Exception, action: str = "ec2:DescribeInstances") -> EphemworkError:
    with (
        pytest.raises(EphemworkError) as caught,
        map_aws_errors(action, SETTINGS, subject="i-0123"),
    ):
        raise exc
    return caught.value


class TestMapAwsErrors:
    def test_no_credentials(self) -> None:
        """Missing credentials point at aws configure sso."""
        error = _mapped(boto.NoCredentialsError())
        assert isinstance(error, AwsSetupError)
        assert "aws configure sso" in str(error)

    def test_expired_sso(self) -> None:
        """An expired SSO token points at aws sso login."""
        error = _mapped(boto.UnauthorizedSSOTokenError())
        assert "aws sso login" in str(error)

    def test_wrong_region(self) -> None:
        """An unreachable endpoint names the region to check."""
        error = _mapped(boto.EndpointConnectionError(endpoint_url="https://ec2.eu-wst-1"))
        assert "tunnel.region" in str(error)

    def test_instance_not_found(self) -> None:
        """An unknown instance id names the id and the region."""
        error = _mapped(_client_error("InvalidInstanceID.NotFound"))
        assert "'i-0123'" in str(error)

    def test_not_managed_by_ssm(self) -> None:
        """TargetNotConnected says the instance is not managed by SSM."""
        error = _mapped(_client_error("TargetNotConnected", "StartSession"), "ssm:StartSession")
        assert "not managed by SSM" in str(error)

    def test_permission_names_action(self) -> None:
        """A denied call names the IAM action to allow."""
        error = _mapped(
            _client_error("AccessDeniedException", "SendSSHPublicKey"),
            "ec2-instance-connect:SendSSHPublicKey",
        )
        assert "'ec2-instance-connect:SendSSHPublicKey'" in str(error)

    def test_other_code_kept(self) -> None:
        """Any other client error keeps its AWS error code."""
        error = _mapped(_client_error("InsufficientInstanceCapacity"))
        assert isinstance(error, AwsError)
        assert error.code == "InsufficientInstanceCapacity"
