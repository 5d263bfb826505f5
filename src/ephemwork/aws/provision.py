"""``bastion init``, ``destroy`` and ``status`` with ``--live``: the AWS calls of the plan.

`init_bastion` is idempotent: it looks each resource up by name and tag first and creates
only what is missing. When a step fails, it deletes what this run created, newest first, and
raises the first error with its AWS error code. A *fault* callback, called with each step's
name before the step runs, lets tests inject a failure at every step.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

import attrs
import structlog

from ephemwork.aws.errors import map_aws_errors
from ephemwork.aws.plan import (
    AL2023_ARM64_PARAMETER,
    ASSUME_ROLE_POLICY,
    INLINE_POLICY_NAME,
    LIVE_STATES,
    MANAGED_TAG,
    ROOT_DEVICE,
    ROOT_VOLUME_GIB,
    SSM_CORE_POLICY_ARN,
    BastionSpec,
    aws_tags,
    resource_name,
    tag_filters,
    team_tags,
)
from ephemwork.aws.session import AwsSettings
from ephemwork.errors import AwsError, AwsSetupError, EphemworkError

log = structlog.get_logger(__name__)

Echo = Callable[[str], None]
Fault = Callable[[str], None]

INIT_STEPS = (
    "find",
    "subnet",
    "ami",
    "role",
    "role-policies",
    "instance-profile",
    "security-group",
    "security-group-ingress",
    "instance",
    "wait-running",
)

# Seconds to wait for the instance to run, or to terminate.
STATE_TIMEOUT = 600.0
# A new instance profile takes a few seconds to become usable by RunInstances.
PROFILE_PROPAGATION_TIMEOUT = 60.0


@attrs.frozen
class InitResult:
    """Result of ``init``: the resources it found or created, with the values the ALB needs."""

    instance_id: str
    private_ip: str
    security_group_id: str
    vpc_id: str
    created: list[str]

    @property
    def changed(self) -> bool:
        """Whether this run created anything."""
        return bool(self.created)


@attrs.frozen
class InstanceStatus:
    """Status of one bastion as ``status`` reports it."""

    instance_id: str
    state: str
    private_ip: str
    vpc_id: str
    security_group_ids: list[str]
    ping_status: str
    bastion_health: str


def _no_fault(step: str) -> None:
    del step


def _tag_list_to_dict(tags: list[dict[str, str]] | None) -> dict[str, str]:
    return {tag["Key"]: tag["Value"] for tag in tags or []}


class _Rollback:
    """Undo actions of one ``init`` run, run newest first when a later step fails."""

    _undo: list[tuple[str, Callable[[], Awaitable[object]]]]

    def __init__(self) -> None:
        self._undo = []

    def push(self, what: str, action: Callable[[], Awaitable[object]]) -> None:
        self._undo.append((what, action))

    async def run(self, echo: Echo) -> list[str]:
        failed: list[str] = []
        for what, action in reversed(self._undo):
            try:
                await action()
            except Exception as exc:  # a failed undo must not hide the original error
                log.error("bastion.rollback_failed", resource=what, error=str(exc))
                failed.append(what)
                continue
            log.info("bastion.rolled_back", resource=what)
            echo(f"rolled back: {what}")
        return failed


class Provisioner:
    """The live ``bastion`` commands for one region and profile."""

    settings: AwsSettings
    echo: Echo
    fault: Fault
    poll_interval: float

    def __init__(
        self,
        settings: AwsSettings,
        *,
        echo: Echo = print,
        fault: Fault | None = None,
        poll_interval: float = 5.0,
    ) -> None:
        self.settings = settings
        self.echo = echo
        self.fault = fault or _no_fault
        self.poll_interval = poll_interval

    # -- init ---------------------------------------------------------------------------------

    async def init(self, spec: BastionSpec) -> InitResult:
        """Create what is missing of *spec*'s bastion, or roll back and raise."""
        log.info("bastion.init_started", team=spec.team, region=self.settings.region)
        rollback = _Rollback()
        created: list[str] = []
        step = INIT_STEPS[0]
        async with AsyncExitStack() as stack:
            ec2 = await stack.enter_async_context(self.settings.client("ec2"))
            iam = await stack.enter_async_context(self.settings.client("iam"))
            ssm = await stack.enter_async_context(self.settings.client("ssm"))
            try:
                step = "find"
                self.fault(step)
                existing = await self._find_instance(ec2, spec.team)

                step = "subnet"
                self.fault(step)
                vpc_id = await self._subnet_vpc(ec2, spec.subnet_id)

                step = "ami"
                self.fault(step)
                ami_id = spec.ami_id
                if ami_id is None and existing is None:
                    ami_id = await self._latest_ami(ssm)

                step = "role"
                self.fault(step)
                if await self._ensure_role(iam, spec):
                    created.append(f"iam role {spec.name}")
                    rollback.push(
                        f"iam role {spec.name}", lambda: self._delete_role(iam, spec.name)
                    )

                step = "role-policies"
                self.fault(step)
                await self._ensure_role_policies(iam, spec)

                step = "instance-profile"
                self.fault(step)
                if await self._ensure_instance_profile(iam, spec):
                    created.append(f"iam instance profile {spec.name}")
                    rollback.push(
                        f"iam instance profile {spec.name}",
                        lambda: self._delete_instance_profile(iam, spec.name),
                    )

                step = "security-group"
                self.fault(step)
                group_id, group_created = await self._ensure_security_group(ec2, spec, vpc_id)
                if group_created:
                    created.append(f"ec2 security group {group_id}")
                    rollback.push(
                        f"ec2 security group {group_id}",
                        lambda: self._delete_security_group(ec2, group_id),
                    )

                step = "security-group-ingress"
                self.fault(step)
                await self._ensure_ingress(ec2, spec, group_id)

                step = "instance"
                self.fault(step)
                if existing is None:
                    assert ami_id is not None
                    instance_id = await self._run_instance(ec2, spec, ami_id, group_id)
                    created.append(f"ec2 instance {instance_id}")
                    rollback.push(
                        f"ec2 instance {instance_id}",
                        lambda: self._terminate(ec2, [instance_id]),
                    )
                else:
                    instance_id = existing["InstanceId"]

                step = "wait-running"
                self.fault(step)
                instance = await self._wait_for_state(ec2, instance_id, "running")
            except asyncio.CancelledError:
                await rollback.run(self.echo)
                raise
            except EphemworkError as exc:
                log.error("bastion.init_failed", team=spec.team, step=step, error=str(exc))
                failed = await rollback.run(self.echo)
                raise _step_error(step, exc, failed) from exc

        log.info("bastion.init_finished", team=spec.team, instance_id=instance_id, created=created)
        return InitResult(
            instance_id=instance_id,
            private_ip=instance.get("PrivateIpAddress", ""),
            security_group_id=group_id,
            vpc_id=vpc_id,
            created=created,
        )

    async def _find_instance(self, ec2: Any, team: str) -> dict[str, Any] | None:
        filters = [*tag_filters(team), {"Name": "instance-state-name", "Values": list(LIVE_STATES)}]
        with map_aws_errors("ec2:DescribeInstances", self.settings):
            response = await ec2.describe_instances(Filters=filters)
        instances = [i for r in response["Reservations"] for i in r["Instances"]]
        if len(instances) > 1:
            ids = ", ".join(i["InstanceId"] for i in instances)
            raise AwsSetupError(
                f"Team {team!r} has {len(instances)} bastion instances ({ids}); terminate all "
                "but one, or run `ephemwork bastion destroy --live` and init again."
            )
        return instances[0] if instances else None

    async def _subnet_vpc(self, ec2: Any, subnet_id: str) -> str:
        with map_aws_errors("ec2:DescribeSubnets", self.settings, subject=subnet_id):
            response = await ec2.describe_subnets(SubnetIds=[subnet_id])
        return str(response["Subnets"][0]["VpcId"])

    async def _latest_ami(self, ssm: Any) -> str:
        with map_aws_errors("ssm:GetParameter", self.settings, subject=AL2023_ARM64_PARAMETER):
            response = await ssm.get_parameter(Name=AL2023_ARM64_PARAMETER)
        return str(response["Parameter"]["Value"])

    async def _ensure_role(self, iam: Any, spec: BastionSpec) -> bool:
        try:
            with map_aws_errors("iam:GetRole", self.settings, subject=spec.name):
                response = await iam.get_role(RoleName=spec.name)
        except AwsError as exc:
            if exc.code != "NoSuchEntity":
                raise
        else:
            _require_managed("iam role", spec.name, _tag_list_to_dict(response["Role"].get("Tags")))
            return False

        with map_aws_errors("iam:CreateRole", self.settings, subject=spec.name):
            await iam.create_role(
                RoleName=spec.name,
                AssumeRolePolicyDocument=json.dumps(ASSUME_ROLE_POLICY),
                Description=f"ephemwork bastion of team {spec.team}",
                Tags=aws_tags(spec.tags),
            )
        log.info("bastion.created", resource="iam role", name=spec.name)
        self.echo(f"created: iam role {spec.name}")
        return True

    async def _ensure_role_policies(self, iam: Any, spec: BastionSpec) -> None:
        with map_aws_errors("iam:ListAttachedRolePolicies", self.settings, subject=spec.name):
            attached = await iam.list_attached_role_policies(RoleName=spec.name)
        arns = {policy["PolicyArn"] for policy in attached["AttachedPolicies"]}
        if SSM_CORE_POLICY_ARN not in arns:
            with map_aws_errors("iam:AttachRolePolicy", self.settings, subject=spec.name):
                await iam.attach_role_policy(RoleName=spec.name, PolicyArn=SSM_CORE_POLICY_ARN)

        document = json.dumps(spec.inline_policy())
        with map_aws_errors("iam:ListRolePolicies", self.settings, subject=spec.name):
            inline = await iam.list_role_policies(RoleName=spec.name)
        if INLINE_POLICY_NAME in inline["PolicyNames"]:
            with map_aws_errors("iam:GetRolePolicy", self.settings, subject=spec.name):
                current = await iam.get_role_policy(
                    RoleName=spec.name, PolicyName=INLINE_POLICY_NAME
                )
            if _policy(current["PolicyDocument"]) == spec.inline_policy():
                return
        with map_aws_errors("iam:PutRolePolicy", self.settings, subject=spec.name):
            await iam.put_role_policy(
                RoleName=spec.name, PolicyName=INLINE_POLICY_NAME, PolicyDocument=document
            )

    async def _ensure_instance_profile(self, iam: Any, spec: BastionSpec) -> bool:
        try:
            with map_aws_errors("iam:GetInstanceProfile", self.settings, subject=spec.name):
                response = await iam.get_instance_profile(InstanceProfileName=spec.name)
        except AwsError as exc:
            if exc.code != "NoSuchEntity":
                raise
            created = True
            with map_aws_errors("iam:CreateInstanceProfile", self.settings, subject=spec.name):
                await iam.create_instance_profile(
                    InstanceProfileName=spec.name, Tags=aws_tags(spec.tags)
                )
            log.info("bastion.created", resource="iam instance profile", name=spec.name)
            self.echo(f"created: iam instance profile {spec.name}")
            roles: list[str] = []
        else:
            created = False
            roles = [role["RoleName"] for role in response["InstanceProfile"]["Roles"]]

        if spec.name not in roles:
            with map_aws_errors("iam:AddRoleToInstanceProfile", self.settings, subject=spec.name):
                await iam.add_role_to_instance_profile(
                    InstanceProfileName=spec.name, RoleName=spec.name
                )
        return created

    async def _ensure_security_group(
        self, ec2: Any, spec: BastionSpec, vpc_id: str
    ) -> tuple[str, bool]:
        filters = [*tag_filters(spec.team), {"Name": "vpc-id", "Values": [vpc_id]}]
        with map_aws_errors("ec2:DescribeSecurityGroups", self.settings):
            response = await ec2.describe_security_groups(Filters=filters)
        if response["SecurityGroups"]:
            return str(response["SecurityGroups"][0]["GroupId"]), False

        with map_aws_errors("ec2:CreateSecurityGroup", self.settings, subject=spec.name):
            created = await ec2.create_security_group(
                GroupName=spec.name,
                Description=f"ephemwork bastion of team {spec.team}: proxy port from the ALB only",
                VpcId=vpc_id,
                TagSpecifications=[
                    {
                        "ResourceType": "security-group",
                        "Tags": aws_tags({**spec.tags, "Name": spec.name}),
                    }
                ],
            )
        group_id = str(created["GroupId"])
        log.info("bastion.created", resource="ec2 security group", id=group_id)
        self.echo(f"created: ec2 security group {group_id}")
        return group_id, True

    async def _ensure_ingress(self, ec2: Any, spec: BastionSpec, group_id: str) -> None:
        with map_aws_errors("ec2:DescribeSecurityGroups", self.settings, subject=group_id):
            response = await ec2.describe_security_groups(GroupIds=[group_id])
        for permission in response["SecurityGroups"][0].get("IpPermissions", []):
            sources = {pair.get("GroupId") for pair in permission.get("UserIdGroupPairs", [])}
            if (
                permission.get("FromPort") == spec.proxy_port
                and spec.alb_security_group_id in sources
            ):
                return

        with map_aws_errors("ec2:AuthorizeSecurityGroupIngress", self.settings, subject=group_id):
            await ec2.authorize_security_group_ingress(
                GroupId=group_id,
                IpPermissions=[
                    {
                        "IpProtocol": "tcp",
                        "FromPort": spec.proxy_port,
                        "ToPort": spec.proxy_port,
                        "UserIdGroupPairs": [
                            {
                                "GroupId": spec.alb_security_group_id,
                                "Description": "staging ALB to the ephemwork proxy",
                            }
                        ],
                    }
                ],
            )

    async def _run_instance(self, ec2: Any, spec: BastionSpec, ami_id: str, group_id: str) -> str:
        tags = aws_tags({**spec.tags, "Name": spec.name})
        params: dict[str, Any] = {
            "ImageId": ami_id,
            "InstanceType": spec.instance_type,
            "MinCount": 1,
            "MaxCount": 1,
            "SubnetId": spec.subnet_id,
            "SecurityGroupIds": [group_id],
            "IamInstanceProfile": {"Name": spec.name},
            "MetadataOptions": {
                "HttpTokens": "required",
                "HttpEndpoint": "enabled",
                "HttpPutResponseHopLimit": 1,
            },
            "BlockDeviceMappings": [
                {
                    "DeviceName": ROOT_DEVICE,
                    "Ebs": {
                        "VolumeSize": ROOT_VOLUME_GIB,
                        "VolumeType": "gp3",
                        "Encrypted": True,
                        "DeleteOnTermination": True,
                    },
                }
            ],
            "UserData": base64.b64encode(spec.user_data().encode()).decode(),
            "TagSpecifications": [
                {"ResourceType": "instance", "Tags": tags},
                {"ResourceType": "volume", "Tags": tags},
            ],
        }

        deadline = time.monotonic() + PROFILE_PROPAGATION_TIMEOUT
        while True:
            try:
                with map_aws_errors("ec2:RunInstances", self.settings, subject=spec.name):
                    response = await ec2.run_instances(**params)
                break
            except AwsError as exc:
                # IAM is eventually consistent: a fresh instance profile is unknown to EC2
                # for a few seconds.
                propagating = exc.code == "InvalidParameterValue" and "profile" in str(exc).lower()
                if not propagating or time.monotonic() > deadline:
                    raise
                log.info("bastion.run_instances_retry", reason="instance profile not visible yet")
                await asyncio.sleep(self.poll_interval)

        instance_id = str(response["Instances"][0]["InstanceId"])
        log.info("bastion.created", resource="ec2 instance", id=instance_id)
        self.echo(f"created: ec2 instance {instance_id}")
        return instance_id

    async def _wait_for_state(self, ec2: Any, instance_id: str, state: str) -> dict[str, Any]:
        deadline = time.monotonic() + STATE_TIMEOUT
        while True:
            with map_aws_errors("ec2:DescribeInstances", self.settings, subject=instance_id):
                response = await ec2.describe_instances(InstanceIds=[instance_id])
            instance: dict[str, Any] = response["Reservations"][0]["Instances"][0]
            current = instance["State"]["Name"]
            if current == state:
                return instance
            if time.monotonic() > deadline:
                raise AwsError(
                    f"EC2 instance {instance_id!r} is still {current!r} after "
                    f"{STATE_TIMEOUT:.0f} s, not {state!r}; check it in the EC2 console.",
                    code="Timeout",
                )
            log.info("bastion.waiting", instance_id=instance_id, state=current, wanted=state)
            await asyncio.sleep(self.poll_interval)

    # -- destroy ------------------------------------------------------------------------------

    async def destroy(self, team: str) -> list[str]:
        """Remove every resource of *team*'s bastion found by tag; return what was removed."""
        log.info("bastion.destroy_started", team=team, region=self.settings.region)
        removed: list[str] = []
        name = resource_name(team)
        async with self.settings.client("ec2") as ec2, self.settings.client("iam") as iam:
            filters = [
                *tag_filters(team),
                {"Name": "instance-state-name", "Values": list(LIVE_STATES)},
            ]
            with map_aws_errors("ec2:DescribeInstances", self.settings):
                response = await ec2.describe_instances(Filters=filters)
            ids = [i["InstanceId"] for r in response["Reservations"] for i in r["Instances"]]
            if ids:
                await self._terminate(ec2, ids)
                for instance_id in ids:
                    await self._wait_for_state(ec2, instance_id, "terminated")
                    removed.append(f"ec2 instance {instance_id}")
                    self.echo(f"terminated: ec2 instance {instance_id}")

            with map_aws_errors("ec2:DescribeSecurityGroups", self.settings):
                groups = await ec2.describe_security_groups(Filters=tag_filters(team))
            for group in groups["SecurityGroups"]:
                await self._delete_security_group(ec2, group["GroupId"])
                removed.append(f"ec2 security group {group['GroupId']}")
                self.echo(f"deleted: ec2 security group {group['GroupId']}")

            if await self._delete_instance_profile(iam, name, check_tags=True):
                removed.append(f"iam instance profile {name}")
                self.echo(f"deleted: iam instance profile {name}")
            if await self._delete_role(iam, name, check_tags=True):
                removed.append(f"iam role {name}")
                self.echo(f"deleted: iam role {name}")

        log.info("bastion.destroy_finished", team=team, removed=removed)
        return removed

    async def _terminate(self, ec2: Any, instance_ids: list[str]) -> None:
        with map_aws_errors(
            "ec2:TerminateInstances", self.settings, subject=",".join(instance_ids)
        ):
            await ec2.terminate_instances(InstanceIds=instance_ids)

    async def _delete_security_group(self, ec2: Any, group_id: str) -> None:
        deadline = time.monotonic() + STATE_TIMEOUT
        while True:
            try:
                with map_aws_errors("ec2:DeleteSecurityGroup", self.settings, subject=group_id):
                    await ec2.delete_security_group(GroupId=group_id)
                return
            except AwsError as exc:
                # The terminated instance's network interface lets go of the group late.
                if exc.code != "DependencyViolation" or time.monotonic() > deadline:
                    raise
                log.info("bastion.delete_retry", id=group_id, reason=exc.code)
                await asyncio.sleep(self.poll_interval)

    async def _delete_instance_profile(
        self, iam: Any, name: str, *, check_tags: bool = False
    ) -> bool:
        try:
            with map_aws_errors("iam:GetInstanceProfile", self.settings, subject=name):
                response = await iam.get_instance_profile(InstanceProfileName=name)
        except AwsError as exc:
            if exc.code == "NoSuchEntity":
                return False
            raise
        profile = response["InstanceProfile"]
        if check_tags:
            _require_managed("iam instance profile", name, _tag_list_to_dict(profile.get("Tags")))
        for role in profile["Roles"]:
            with map_aws_errors("iam:RemoveRoleFromInstanceProfile", self.settings, subject=name):
                await iam.remove_role_from_instance_profile(
                    InstanceProfileName=name, RoleName=role["RoleName"]
                )
        with map_aws_errors("iam:DeleteInstanceProfile", self.settings, subject=name):
            await iam.delete_instance_profile(InstanceProfileName=name)
        return True

    async def _delete_role(self, iam: Any, name: str, *, check_tags: bool = False) -> bool:
        try:
            with map_aws_errors("iam:GetRole", self.settings, subject=name):
                response = await iam.get_role(RoleName=name)
        except AwsError as exc:
            if exc.code == "NoSuchEntity":
                return False
            raise
        if check_tags:
            _require_managed("iam role", name, _tag_list_to_dict(response["Role"].get("Tags")))

        with map_aws_errors("iam:ListAttachedRolePolicies", self.settings, subject=name):
            attached = await iam.list_attached_role_policies(RoleName=name)
        for policy in attached["AttachedPolicies"]:
            with map_aws_errors("iam:DetachRolePolicy", self.settings, subject=name):
                await iam.detach_role_policy(RoleName=name, PolicyArn=policy["PolicyArn"])
        with map_aws_errors("iam:ListRolePolicies", self.settings, subject=name):
            inline = await iam.list_role_policies(RoleName=name)
        for policy_name in inline["PolicyNames"]:
            with map_aws_errors("iam:DeleteRolePolicy", self.settings, subject=name):
                await iam.delete_role_policy(RoleName=name, PolicyName=policy_name)
        with map_aws_errors("iam:DeleteRole", self.settings, subject=name):
            await iam.delete_role(RoleName=name)
        return True

    # -- status -------------------------------------------------------------------------------

    async def status(self, team: str, instance_id: str | None = None) -> InstanceStatus:
        """Report the state, SSM ping status and serve-bastion health of the bastion."""
        async with self.settings.client("ec2") as ec2, self.settings.client("ssm") as ssm:
            if instance_id is not None:
                instance = await self._wait_for_any(ec2, instance_id)
            else:
                found = await self._find_instance(ec2, team)
                if found is None:
                    raise AwsSetupError(
                        f"No bastion tagged {MANAGED_TAG}=true for team {team!r} in region "
                        f"{self.settings.region!r}; run `ephemwork bastion init --live`."
                    )
                instance = found
            instance_id = str(instance["InstanceId"])
            ping = await self._ping_status(ssm, instance_id)
            health = (
                await self._bastion_health(ssm, instance_id)
                if ping == "Online"
                else ("not checked: the SSM agent is not online")
            )

        return InstanceStatus(
            instance_id=instance_id,
            state=instance["State"]["Name"],
            private_ip=instance.get("PrivateIpAddress", ""),
            vpc_id=instance.get("VpcId", ""),
            security_group_ids=[group["GroupId"] for group in instance.get("SecurityGroups", [])],
            ping_status=ping,
            bastion_health=health,
        )

    async def _wait_for_any(self, ec2: Any, instance_id: str) -> dict[str, Any]:
        with map_aws_errors("ec2:DescribeInstances", self.settings, subject=instance_id):
            response = await ec2.describe_instances(InstanceIds=[instance_id])
        instance: dict[str, Any] = response["Reservations"][0]["Instances"][0]
        return instance

    async def _ping_status(self, ssm: Any, instance_id: str) -> str:
        try:
            with map_aws_errors(
                "ssm:DescribeInstanceInformation", self.settings, subject=instance_id
            ):
                response = await ssm.describe_instance_information(
                    Filters=[{"Key": "InstanceIds", "Values": [instance_id]}]
                )
        except EphemworkError as exc:
            log.warning("bastion.ping_status_unknown", instance_id=instance_id, error=str(exc))
            return f"unknown ({exc})"
        records = response.get("InstanceInformationList", [])
        return str(records[0]["PingStatus"]) if records else "not registered with SSM"

    async def _bastion_health(self, ssm: Any, instance_id: str) -> str:
        script = (
            "systemctl is-active ephemwork-bastion.service && "
            "curl -fsS --max-time 5 http://127.0.0.1/ephemwork-health"
        )
        try:
            with map_aws_errors("ssm:SendCommand", self.settings, subject=instance_id):
                sent = await ssm.send_command(
                    InstanceIds=[instance_id],
                    DocumentName="AWS-RunShellScript",
                    Parameters={"commands": [script]},
                )
            command_id = sent["Command"]["CommandId"]
            deadline = time.monotonic() + 60.0
            while True:
                with map_aws_errors("ssm:GetCommandInvocation", self.settings, subject=instance_id):
                    result = await ssm.get_command_invocation(
                        CommandId=command_id, InstanceId=instance_id
                    )
                if result["Status"] not in ("Pending", "InProgress", "Delayed"):
                    break
                if time.monotonic() > deadline:
                    return "unknown: the health command did not finish within 60 s"
                await asyncio.sleep(self.poll_interval)
        except EphemworkError as exc:
            log.warning("bastion.health_unknown", instance_id=instance_id, error=str(exc))
            return f"unknown ({exc})"
        output = " ".join(str(result.get("StandardOutputContent", "")).split())
        return f"{result['Status']}: {output or 'no output'}"


def _policy(document: object) -> object:
    # IAM returns policy documents URL-decoded as a dict through boto3, or as text.
    if isinstance(document, str):
        from urllib.parse import unquote

        return json.loads(unquote(document))
    return document


def _require_managed(kind: str, name: str, tags: dict[str, str]) -> None:
    if tags.get(MANAGED_TAG) != "true":
        raise AwsSetupError(
            f"{kind} {name!r} exists but is not tagged {MANAGED_TAG}=true, so ephemwork will "
            "not change it; delete or rename it, or choose another --team."
        )


def _step_error(step: str, exc: EphemworkError, failed_undo: list[str]) -> EphemworkError:
    code = exc.code if isinstance(exc, AwsError) else ""
    left = (
        f" Could not roll back {', '.join(failed_undo)}; run `ephemwork bastion destroy --live`."
        if failed_undo
        else " Everything this run created was deleted."
    )
    message = f"bastion init failed at step {step!r}: {exc}{left}"
    if isinstance(exc, AwsError):
        return AwsError(message, code=code)
    error = type(exc)(message)
    return error


__all__ = ["INIT_STEPS", "InitResult", "InstanceStatus", "Provisioner", "team_tags"]
