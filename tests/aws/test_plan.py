"""Plans of the `bastion` commands: complete, and made without network or credentials."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ephemwork.aws.plan import BastionSpec, destroy_plan, init_plan, parse_s3_uri, render_plan
from ephemwork.errors import UsageError
from helpers.repo import REPO_ROOT

INIT_ARGS = [
    "bastion",
    "init",
    "--team",
    "payments",
    "--subnet-id",
    "subnet-0abc",
    "--alb-security-group-id",
    "sg-0alb",
    "--bastion-binary-s3-uri",
    "s3://artifacts/ephemwork.pyz",
]

# Runs the CLI with an audit hook that fails on any socket use or read of AWS config files,
# and reports whether botocore was imported.
_GUARD = """
import json, sys
def hook(event, args):
    if event.startswith("socket.") and event not in ("socket.__new__",):
        raise RuntimeError(f"network use: {event} {args!r}")
    if event == "open" and isinstance(args[0], str) and "/.aws/" in args[0]:
        raise RuntimeError(f"credential lookup: {args[0]}")
sys.addaudithook(hook)
from ephemwork.cli import main
try:
    main(sys.argv[1:], standalone_mode=False)
finally:
    sys.stderr.write(json.dumps({"botocore": "botocore" in sys.modules}) + "\\n")
"""


def _spec() -> BastionSpec:
    return BastionSpec(
        team="payments",
        region="eu-west-1",
        instance_type="t4g.nano",
        subnet_id="subnet-0abc",
        alb_security_group_id="sg-0alb",
        binary_s3_uri="s3://artifacts/ephemwork.pyz",
    )


def _run_guarded(args: list[str], tmp_path: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _GUARD, *args],
        cwd=str(tmp_path),
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_ROOT / "src"), "HOME": "/nonexistent"},
        timeout=60,
    )


class TestInitPlan:
    def test_lists_every_resource(self) -> None:
        """The init plan has the role, profile, security group and instance."""
        kinds = [resource.kind for resource in init_plan(_spec()).resources]
        assert kinds == ["iam role", "iam instance profile", "ec2 security group", "ec2 instance"]

    def test_tags_every_resource(self) -> None:
        """Every planned resource carries the managed and team tags."""
        for resource in init_plan(_spec()).resources:
            assert resource.tags["ephemwork:managed"] == "true"
            assert resource.tags["ephemwork:team"] == "payments"

    def test_looks_up_ami(self) -> None:
        """Without --ami-id the plan reads the public AL2023 arm64 parameter."""
        actions = [call.action for call in init_plan(_spec()).calls]
        assert "ssm:GetParameter" in actions

    def test_renders_user_data(self) -> None:
        """The rendered plan shows the user data."""
        text = render_plan(init_plan(_spec()), "region eu-west-1")
        assert "Match User ephemwork" in text

    def test_rejects_bad_uri(self) -> None:
        """A URI that is not s3://BUCKET/KEY is a usage error."""
        with pytest.raises(UsageError):
            BastionSpec(
                team="payments",
                region="eu-west-1",
                instance_type="t4g.nano",
                subnet_id="subnet-0abc",
                alb_security_group_id="sg-0alb",
                binary_s3_uri="https://example/ephemwork.pyz",
            )

    def test_rejects_short_bucket(self) -> None:
        """A bucket name S3 would refuse is named, with the naming rule."""
        with pytest.raises(UsageError) as caught:
            parse_s3_uri("s3://b/ephemwork.pyz")

        assert str(caught.value) == (
            "'s3://b/ephemwork.pyz' names the bucket 'b', which is not a valid S3 bucket name: "
            "use 3 to 63 characters from a-z, 0-9, '.' and '-', starting and ending with a "
            "letter or digit."
        )

    def test_parses_object_uri(self) -> None:
        """A valid URI splits into bucket and key."""
        assert parse_s3_uri("s3://my-artifacts/ephemwork/e.pyz") == (
            "my-artifacts",
            "ephemwork/e.pyz",
        )


class TestDestroyPlan:
    def test_deletes_role_last(self) -> None:
        """destroy deletes the role after everything that uses it."""
        assert destroy_plan("payments").calls[-1].action == "iam:DeleteRole"


class TestPlanCommands:
    @pytest.mark.parametrize(
        "args",
        [
            INIT_ARGS,
            ["bastion", "destroy", "--team", "payments"],
            ["bastion", "status", "--team", "payments"],
        ],
    )
    def test_no_network_or_credentials(self, args: list[str], tmp_path: object) -> None:
        """A plan makes no socket call, reads no AWS config and never imports botocore."""
        result = _run_guarded(args, tmp_path)

        assert result.returncode == 0, result.stderr
        assert json.loads(result.stderr.strip().splitlines()[-1]) == {"botocore": False}
        assert "Nothing is called" in result.stdout


class TestServeBastionImports:
    def test_never_loads_botocore(self) -> None:
        """Importing the bastion server and the CLI loads no botocore."""
        code = (
            "import sys, ephemwork.cli, ephemwork.bastion.server;"
            "print('botocore' in sys.modules, 'aioboto3' in sys.modules)"
        )
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
        )
        assert result.stdout.strip() == "False False"
