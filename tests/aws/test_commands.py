"""The `ephemwork bastion` commands as subprocesses, live against a moto server on 127.0.0.1."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import boto3
import pytest

from helpers.cli import ephemwork_argv
from helpers.moto import MotoServer


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ephemwork_argv(*args),
        cwd=cwd,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def init_args(aws_env: MotoServer) -> list[str]:
    """Flags of `bastion init` for moto's default subnet and a new ALB group."""
    ec2 = boto3.client("ec2", endpoint_url=aws_env.url, region_name="us-east-1")
    subnet = ec2.describe_subnets()["Subnets"][0]["SubnetId"]
    alb = ec2.create_security_group(GroupName="alb", Description="alb")["GroupId"]
    return [
        "bastion",
        "init",
        "--live",
        "--team",
        "payments",
        "--subnet-id",
        subnet,
        "--alb-security-group-id",
        alb,
        "--bastion-binary-s3-uri",
        "s3://artifacts/ephemwork.pyz",
    ]


class TestBastionCommands:
    def test_init_twice_then_destroy(self, init_args: list[str], tmp_path: Path) -> None:
        """init creates, a second init changes nothing, destroy removes everything."""
        first = _run(*init_args, cwd=tmp_path)
        second = _run(*init_args, cwd=tmp_path)
        destroy = _run("bastion", "destroy", "--live", "--team", "payments", cwd=tmp_path)

        assert first.returncode == 0, first.stderr
        assert "instance id: i-" in first.stdout
        assert "nothing changed" in second.stdout
        assert "Removed 4 resources" in destroy.stdout

    @pytest.mark.parametrize("output_format", ["cdk-python", "cloudformation", "terraform"])
    def test_alb_rules(self, output_format: str, tmp_path: Path) -> None:
        """alb-rules prints the health check and the availability zone pitfall."""
        result = _run(
            "bastion", "alb-rules", "--team", "payments", "--format", output_format, cwd=tmp_path
        )
        assert "/ephemwork-health" in result.stdout
        assert "availability zone 'all'" in result.stdout
