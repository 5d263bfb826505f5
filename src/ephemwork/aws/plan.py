"""Plans of ``bastion init``, ``destroy`` and ``status``, computed without any AWS call.

A `Plan` lists each resource with its name, tags and settings, and each AWS call in the
order `provision` makes them. Building and printing a plan touches neither the network nor
the credential chain, so it is safe to run anywhere.
"""

from __future__ import annotations

import json
import re
from typing import Any

import attrs

from ephemwork.aws.userdata import SSH_USER, UserDataInputs, render_user_data
from ephemwork.errors import UsageError
from ephemwork.identity import validate_name

MANAGED_TAG = "ephemwork:managed"
TEAM_TAG = "ephemwork:team"
SSM_CORE_POLICY_ARN = "arn:aws:iam::aws:policy/AmazonSSMManagedInstanceCore"
AL2023_ARM64_PARAMETER = "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-arm64"
INLINE_POLICY_NAME = "ephemwork-read-zipapp"
ROOT_DEVICE = "/dev/xvda"
ROOT_VOLUME_GIB = 8
# Instance states that still hold the bastion's name; terminated ones linger for an hour.
LIVE_STATES = ("pending", "running", "stopping", "stopped")

_S3_URI = re.compile(r"^s3://(?P<bucket>[^/]*)/(?P<key>\S+)$")
# The naming rules for general purpose buckets: 3 to 63 characters from a-z, 0-9, '.' and '-',
# starting and ending with a letter or digit.
_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")

ASSUME_ROLE_POLICY: dict[str, Any] = {
    "Version": "2012-10-17",
    "Statement": [
        {
            "Effect": "Allow",
            "Principal": {"Service": "ec2.amazonaws.com"},
            "Action": "sts:AssumeRole",
        }
    ],
}


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """Split ``s3://bucket/key`` into bucket and key, or raise `UsageError`."""
    match = _S3_URI.match(uri)
    if match is None:
        raise UsageError(f"{uri!r} is not an S3 object URI; use s3://BUCKET/PATH/ephemwork.pyz.")

    bucket = match["bucket"]
    if _BUCKET_NAME.fullmatch(bucket) is None:
        raise UsageError(
            f"{uri!r} names the bucket {bucket!r}, which is not a valid S3 bucket name: use 3 "
            "to 63 characters from a-z, 0-9, '.' and '-', starting and ending with a letter "
            "or digit."
        )
    return bucket, match["key"]


def team_tags(team: str) -> dict[str, str]:
    """Return the tags that mark every resource of *team*'s bastion."""
    return {MANAGED_TAG: "true", TEAM_TAG: team}


def resource_name(team: str) -> str:
    """Return the shared name of the role, instance profile, security group and instance."""
    return f"ephemwork-bastion-{team}"


def tag_filters(team: str) -> list[dict[str, Any]]:
    """EC2 ``Filters`` that select *team*'s resources by tag."""
    return [{"Name": f"tag:{key}", "Values": [value]} for key, value in team_tags(team).items()]


def aws_tags(tags: dict[str, str]) -> list[dict[str, str]]:
    """Tags as the ``[{"Key": .., "Value": ..}]`` list that AWS APIs take."""
    return [{"Key": key, "Value": value} for key, value in tags.items()]


@attrs.frozen
class BastionSpec:
    """Every input of ``bastion init``; validated on creation."""

    team: str
    region: str
    instance_type: str
    subnet_id: str
    alb_security_group_id: str
    binary_s3_uri: str
    ami_id: str | None = None
    control_port: int = 7070
    proxy_port: int = 80

    def __attrs_post_init__(self) -> None:
        validate_name("team", self.team, source="--team or tunnel.team")
        parse_s3_uri(self.binary_s3_uri)
        for value, prefix, option in (
            (self.subnet_id, "subnet-", "--subnet-id"),
            (self.alb_security_group_id, "sg-", "--alb-security-group-id"),
        ):
            if not value.startswith(prefix):
                raise UsageError(f"{option} {value!r} must start with {prefix!r}.")
        if self.ami_id is not None and not self.ami_id.startswith("ami-"):
            raise UsageError(f"--ami-id {self.ami_id!r} must start with 'ami-'.")

    @property
    def name(self) -> str:
        """The shared name of every resource."""
        return resource_name(self.team)

    @property
    def tags(self) -> dict[str, str]:
        """The tags of every resource, plus ``Name`` where AWS shows it."""
        return team_tags(self.team)

    @property
    def object_arn(self) -> str:
        """ARN of the zipapp object, the only thing the instance role may read."""
        bucket, key = parse_s3_uri(self.binary_s3_uri)
        return f"arn:aws:s3:::{bucket}/{key}"

    def inline_policy(self) -> dict[str, Any]:
        """Return the role's inline policy: ``s3:GetObject`` on the zipapp object only."""
        return {
            "Version": "2012-10-17",
            "Statement": [
                {"Effect": "Allow", "Action": "s3:GetObject", "Resource": self.object_arn}
            ],
        }

    def user_data(self) -> str:
        """Render the first-boot script of the instance."""
        return render_user_data(
            UserDataInputs(
                team=self.team,
                region=self.region,
                binary_s3_uri=self.binary_s3_uri,
                control_port=self.control_port,
                proxy_port=self.proxy_port,
            )
        )


@attrs.frozen
class Resource:
    """One AWS resource a plan creates, removes or reads."""

    kind: str
    name: str
    tags: dict[str, str]
    settings: dict[str, Any]


@attrs.frozen
class Call:
    """One AWS API call, as ``service:Operation`` and a summary of its parameters."""

    service: str
    operation: str
    params: dict[str, Any] = attrs.field(factory=dict)

    @property
    def action(self) -> str:
        """The IAM action of the call, such as ``ec2:RunInstances``."""
        prefix = {"ec2-instance-connect": "ec2-instance-connect"}.get(self.service, self.service)
        return f"{prefix}:{self.operation}"


@attrs.frozen
class Plan:
    """Plan of one command: a title, the resources, the calls and free-form notes."""

    title: str
    resources: list[Resource]
    calls: list[Call]
    notes: list[str] = attrs.field(factory=list)
    user_data: str | None = None


def init_plan(spec: BastionSpec) -> Plan:
    """Build the plan of ``bastion init`` for *spec*."""
    name = spec.name
    tags = spec.tags
    ami = spec.ami_id or f"(latest from SSM parameter {AL2023_ARM64_PARAMETER})"
    resources = [
        Resource(
            "iam role",
            name,
            tags,
            {
                "assume role policy": "ec2.amazonaws.com may assume it",
                "managed policy": SSM_CORE_POLICY_ARN,
                f"inline policy {INLINE_POLICY_NAME}": json.dumps(spec.inline_policy()),
            },
        ),
        Resource("iam instance profile", name, tags, {"role": name}),
        Resource(
            "ec2 security group",
            name,
            {**tags, "Name": name},
            {
                "vpc": f"the VPC of {spec.subnet_id}",
                "ingress": f"tcp {spec.proxy_port} from {spec.alb_security_group_id} only; no SSH",
                "egress": "all (SSM, EC2 messages and S3 over HTTPS)",
            },
        ),
        Resource(
            "ec2 instance",
            name,
            {**tags, "Name": name},
            {
                "instance type": spec.instance_type,
                "ami": ami,
                "architecture": "arm64",
                "subnet": f"{spec.subnet_id} (private: no public IP)",
                "security group": name,
                "instance profile": name,
                "metadata": "IMDSv2 required (HttpTokens=required, hop limit 1)",
                "root volume": f"{ROOT_DEVICE} gp3 {ROOT_VOLUME_GIB} GiB, encrypted",
                "user data": "below",
            },
        ),
    ]

    filters = {"Filters": f"{MANAGED_TAG}=true, {TEAM_TAG}={spec.team}"}
    calls = [
        Call("ec2", "DescribeInstances", {**filters, "to find": "an existing bastion"}),
        Call("ec2", "DescribeSubnets", {"SubnetIds": [spec.subnet_id]}),
    ]
    if spec.ami_id is None:
        calls.append(Call("ssm", "GetParameter", {"Name": AL2023_ARM64_PARAMETER}))
    calls += [
        Call("iam", "GetRole", {"RoleName": name}),
        Call("iam", "CreateRole", {"RoleName": name, "Tags": tags, "if": "missing"}),
        Call("iam", "AttachRolePolicy", {"PolicyArn": SSM_CORE_POLICY_ARN}),
        Call("iam", "PutRolePolicy", {"PolicyName": INLINE_POLICY_NAME}),
        Call("iam", "GetInstanceProfile", {"InstanceProfileName": name}),
        Call("iam", "CreateInstanceProfile", {"InstanceProfileName": name, "if": "missing"}),
        Call("iam", "AddRoleToInstanceProfile", {"RoleName": name}),
        Call("ec2", "DescribeSecurityGroups", {**filters}),
        Call("ec2", "CreateSecurityGroup", {"GroupName": name, "if": "missing"}),
        Call(
            "ec2",
            "AuthorizeSecurityGroupIngress",
            {"port": spec.proxy_port, "from": spec.alb_security_group_id},
        ),
        Call("ec2", "RunInstances", {"if": "no bastion was found"}),
        Call("ec2", "DescribeInstances", {"until": "the instance is running"}),
    ]
    notes = [
        "Existing resources with these names and tags are kept as they are.",
        "If a step fails, the resources this run created are deleted in reverse order.",
    ]
    return Plan(f"bastion init for team {spec.team!r}", resources, calls, notes, spec.user_data())


def destroy_plan(team: str, instance_id: str | None = None) -> Plan:
    """Build the plan of ``bastion destroy`` for *team*."""
    validate_name("team", team, source="--team or tunnel.team")
    name = resource_name(team)
    tags = team_tags(team)
    filters = {"Filters": f"{MANAGED_TAG}=true, {TEAM_TAG}={team}"}
    resources = [
        Resource("ec2 instance", instance_id or f"tagged {tags}", tags, {"action": "terminate"}),
        Resource("ec2 security group", name, tags, {"action": "delete"}),
        Resource("iam instance profile", name, tags, {"action": "delete"}),
        Resource("iam role", name, tags, {"action": "detach policies, delete"}),
    ]
    calls = [
        Call("ec2", "DescribeInstances", filters),
        Call("ec2", "TerminateInstances", {"InstanceIds": "those found"}),
        Call("ec2", "DescribeInstances", {"until": "terminated"}),
        Call("ec2", "DescribeSecurityGroups", filters),
        Call("ec2", "DeleteSecurityGroup", {"GroupId": "the one found"}),
        Call("iam", "GetInstanceProfile", {"InstanceProfileName": name}),
        Call("iam", "RemoveRoleFromInstanceProfile", {"RoleName": name}),
        Call("iam", "DeleteInstanceProfile", {"InstanceProfileName": name}),
        Call("iam", "GetRole", {"RoleName": name, "check": f"tag {MANAGED_TAG}=true"}),
        Call("iam", "ListAttachedRolePolicies", {"RoleName": name}),
        Call("iam", "DetachRolePolicy", {"PolicyArn": SSM_CORE_POLICY_ARN}),
        Call("iam", "ListRolePolicies", {"RoleName": name}),
        Call("iam", "DeleteRolePolicy", {"PolicyName": INLINE_POLICY_NAME}),
        Call("iam", "DeleteRole", {"RoleName": name}),
    ]
    notes = ["Only resources tagged ephemwork:managed=true for this team are touched."]
    return Plan(f"bastion destroy for team {team!r}", resources, calls, notes)


def status_plan(team: str, instance_id: str | None = None) -> Plan:
    """Build the plan of ``bastion status`` for *team* (or one instance id)."""
    validate_name("team", team, source="--team or tunnel.team")
    find: dict[str, Any] = (
        {"InstanceIds": [instance_id]}
        if instance_id
        else {"Filters": f"{MANAGED_TAG}=true, {TEAM_TAG}={team}"}
    )
    calls = [
        Call("ec2", "DescribeInstances", find),
        Call("ssm", "DescribeInstanceInformation", {"InstanceIds": "the instance found"}),
        Call(
            "ssm",
            "SendCommand",
            {"DocumentName": "AWS-RunShellScript", "commands": "systemctl is-active; curl health"},
        ),
        Call("ssm", "GetCommandInvocation", {"until": "the command finishes"}),
    ]
    return Plan(f"bastion status for team {team!r}", [], calls, ["Read-only: changes nothing."])


def render_plan(plan: Plan, where: str) -> str:
    """Render *plan* as the text that the commands print without ``--live``."""
    lines = [f"Plan: {plan.title} ({where}). Nothing is called; add --live to run it.", ""]
    if plan.resources:
        lines.append("Resources:")
        for resource in plan.resources:
            lines.append(f"  {resource.kind} {resource.name}")
            tag_text = ", ".join(f"{key}={value}" for key, value in resource.tags.items())
            lines.append(f"    tags: {tag_text}")
            for key, value in resource.settings.items():
                lines.append(f"    {key}: {value}")
        lines.append("")

    lines.append("AWS calls, in order:")
    for number, call in enumerate(plan.calls, start=1):
        params = ", ".join(f"{key}={value}" for key, value in call.params.items())
        lines.append(f"  {number:2d}. {call.action}" + (f" ({params})" if params else ""))

    for note in plan.notes:
        lines.append(f"Note: {note}")

    if plan.user_data is not None:
        lines += ["", f"User data ({SSH_USER} tunnel user, serve-bastion unit):", plan.user_data]
    return "\n".join(lines)
