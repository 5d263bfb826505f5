"""`Provisioner` against a moto server on 127.0.0.1; moto stands in for EC2, IAM and SSM."""

from __future__ import annotations

from typing import Any

import boto3
import pytest

from ephemwork.aws.plan import MANAGED_TAG, SSM_CORE_POLICY_ARN, TEAM_TAG, BastionSpec
from ephemwork.aws.provision import INIT_STEPS, Provisioner
from ephemwork.aws.session import AwsSettings
from ephemwork.errors import AwsError
from helpers.moto import MotoServer

REGION = "us-east-1"


def _client(server: MotoServer, service: str) -> Any:
    return boto3.client(service, endpoint_url=server.url, region_name=REGION)


def _spec(server: MotoServer) -> BastionSpec:
    ec2 = _client(server, "ec2")
    subnet = ec2.describe_subnets()["Subnets"][0]["SubnetId"]
    alb_group = ec2.create_security_group(GroupName="alb", Description="alb")["GroupId"]
    return BastionSpec(
        team="payments",
        region=REGION,
        instance_type="t4g.nano",
        subnet_id=subnet,
        alb_security_group_id=alb_group,
        binary_s3_uri="s3://artifacts/ephemwork/ephemwork.pyz",
    )


def _provisioner(server: MotoServer, **kwargs: Any) -> Provisioner:
    settings = AwsSettings(region=REGION, endpoint_url=server.url)
    return Provisioner(settings, echo=lambda line: None, poll_interval=0.05, **kwargs)


def _live_instances(server: MotoServer) -> list[dict[str, Any]]:
    response = _client(server, "ec2").describe_instances(
        Filters=[{"Name": "instance-state-name", "Values": ["pending", "running"]}]
    )
    return [i for r in response["Reservations"] for i in r["Instances"]]


def _managed_groups(server: MotoServer) -> list[dict[str, Any]]:
    response = _client(server, "ec2").describe_security_groups(
        Filters=[{"Name": f"tag:{MANAGED_TAG}", "Values": ["true"]}]
    )
    groups: list[dict[str, Any]] = response["SecurityGroups"]
    return groups


def _role_names(server: MotoServer) -> list[str]:
    return [role["RoleName"] for role in _client(server, "iam").list_roles()["Roles"]]


def _profile_names(server: MotoServer) -> list[str]:
    profiles = _client(server, "iam").list_instance_profiles()["InstanceProfiles"]
    return [profile["InstanceProfileName"] for profile in profiles]


class TestInit:
    async def test_creates_planned_instance(self, aws_env: MotoServer) -> None:
        """init starts one running instance with the planned type, tags and settings."""
        spec = _spec(aws_env)
        result = await _provisioner(aws_env).init(spec)

        [instance] = _live_instances(aws_env)
        tags = {tag["Key"]: tag["Value"] for tag in instance["Tags"]}
        assert instance["InstanceId"] == result.instance_id
        assert instance["State"]["Name"] == "running"
        assert instance["InstanceType"] == "t4g.nano"
        assert instance["SubnetId"] == spec.subnet_id
        assert instance["MetadataOptions"]["HttpTokens"] == "required"
        assert tags[MANAGED_TAG] == "true"
        assert tags[TEAM_TAG] == "payments"
        assert result.private_ip == instance["PrivateIpAddress"]

    async def test_root_volume_encrypted(self, aws_env: MotoServer) -> None:
        """The instance's root volume is encrypted."""
        await _provisioner(aws_env).init(_spec(aws_env))

        [instance] = _live_instances(aws_env)
        volume_id = instance["BlockDeviceMappings"][0]["Ebs"]["VolumeId"]
        volume = _client(aws_env, "ec2").describe_volumes(VolumeIds=[volume_id])["Volumes"][0]
        assert volume["Encrypted"] is True

    async def test_security_group_allows_only_alb(self, aws_env: MotoServer) -> None:
        """The bastion's group admits port 80 from the ALB's group and nothing else."""
        spec = _spec(aws_env)
        result = await _provisioner(aws_env).init(spec)

        group = _client(aws_env, "ec2").describe_security_groups(
            GroupIds=[result.security_group_id]
        )["SecurityGroups"][0]
        [permission] = group["IpPermissions"]
        assert permission["FromPort"] == 80
        assert permission["ToPort"] == 80
        assert permission["IpRanges"] == []
        assert [p["GroupId"] for p in permission["UserIdGroupPairs"]] == [
            spec.alb_security_group_id
        ]

    async def test_role_policies(self, aws_env: MotoServer) -> None:
        """The role has the SSM core policy and an inline policy reading only the zipapp."""
        spec = _spec(aws_env)
        await _provisioner(aws_env).init(spec)

        iam = _client(aws_env, "iam")
        attached = iam.list_attached_role_policies(RoleName=spec.name)["AttachedPolicies"]
        inline = iam.get_role_policy(RoleName=spec.name, PolicyName="ephemwork-read-zipapp")
        assert [p["PolicyArn"] for p in attached] == [SSM_CORE_POLICY_ARN]
        assert inline["PolicyDocument"]["Statement"] == [
            {
                "Effect": "Allow",
                "Action": "s3:GetObject",
                "Resource": "arn:aws:s3:::artifacts/ephemwork/ephemwork.pyz",
            }
        ]

    async def test_second_run_changes_nothing(self, aws_env: MotoServer) -> None:
        """A second init finds every resource by tag and creates nothing."""
        spec = _spec(aws_env)
        first = await _provisioner(aws_env).init(spec)
        second = await _provisioner(aws_env).init(spec)

        assert second.created == []
        assert second.instance_id == first.instance_id
        assert len(_live_instances(aws_env)) == 1

    @pytest.mark.parametrize("step", INIT_STEPS)
    async def test_failure_rolls_back(self, aws_env: MotoServer, step: str) -> None:
        """A failure injected at any step leaves no resource behind and names the code."""
        spec = _spec(aws_env)

        def fault(current: str) -> None:
            if current == step:
                raise AwsError("injected", code="InjectedFault")

        with pytest.raises(AwsError) as caught:
            await _provisioner(aws_env, fault=fault).init(spec)

        assert caught.value.code == "InjectedFault"
        assert _live_instances(aws_env) == []
        assert _managed_groups(aws_env) == []
        assert spec.name not in _role_names(aws_env)
        assert spec.name not in _profile_names(aws_env)


class TestDestroy:
    async def test_removes_everything(self, aws_env: MotoServer) -> None:
        """destroy after init leaves no instance, group, profile or role."""
        spec = _spec(aws_env)
        await _provisioner(aws_env).init(spec)
        removed = await _provisioner(aws_env).destroy("payments")

        assert len(removed) == 4
        assert _live_instances(aws_env) == []
        assert _managed_groups(aws_env) == []
        assert spec.name not in _role_names(aws_env)
        assert spec.name not in _profile_names(aws_env)

    async def test_nothing_to_remove(self, aws_env: MotoServer) -> None:
        """destroy with no bastion removes nothing and succeeds."""
        assert await _provisioner(aws_env).destroy("payments") == []


class TestStatus:
    async def test_reports_state(self, aws_env: MotoServer) -> None:
        """status reports the running state; moto cannot answer the SSM ping status."""
        result = await _provisioner(aws_env).init(_spec(aws_env))
        status = await _provisioner(aws_env).status("payments")

        assert status.instance_id == result.instance_id
        assert status.state == "running"
        assert status.ping_status.startswith("unknown")
