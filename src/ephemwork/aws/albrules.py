"""``bastion alb-rules``: the load balancer side of the bastion as CDK, CloudFormation or Terraform.

ephemwork does not change the staging ALB; it prints what to add to the stack that owns it,
filled in with the values from ``bastion init`` or ``status``, with the known pitfalls as
comments next to the lines they concern.
"""

from __future__ import annotations

import attrs

from ephemwork.errors import UsageError

FORMATS = ("cdk-python", "cloudformation", "terraform")
HEALTH_PATH = "/ephemwork-health"
HEADER = "X-Ephemwork"


@attrs.frozen
class AlbValues:
    """The values the ALB side needs."""

    team: str
    vpc_id: str
    bastion_private_ip: str
    alb_security_group_id: str
    bastion_security_group_id: str
    listener_arn: str = "LISTENER_ARN"
    priority: int = 10
    proxy_port: int = 80


_PITFALLS = (
    "An IP target inside the target group's VPC must not set availability zone 'all'; "
    "leave it unset ('all' is only for IPs outside the VPC).",
    "ALB patterns that open egress only to their own tasks block the bastion: add the "
    "explicit egress rule from the ALB's security group to the bastion's on the proxy port.",
    f"The back end's CORS allowlist must include {HEADER}, or browsers drop the header "
    "after the preflight.",
)


def render_alb_rules(values: AlbValues, output_format: str) -> str:
    """Render the ALB side in *output_format*, one of `FORMATS`."""
    if output_format == "cdk-python":
        return _cdk(values)
    if output_format == "cloudformation":
        return _cloudformation(values)
    if output_format == "terraform":
        return _terraform(values)
    raise UsageError(f"--format {output_format!r} is not one of {', '.join(FORMATS)}.")


def _comments(prefix: str) -> str:
    return "\n".join(f"{prefix} Pitfall: {text}" for text in _PITFALLS)


def _cdk(v: AlbValues) -> str:
    return f'''# ephemwork bastion of team {v.team}: add to the CDK stack that owns the staging ALB.
{_comments("#")}
from aws_cdk import Duration, aws_ec2 as ec2, aws_elasticloadbalancingv2 as elbv2

bastion_targets = elbv2.ApplicationTargetGroup(
    self, "EphemworkBastion",
    vpc=ec2.Vpc.from_lookup(self, "EphemworkVpc", vpc_id="{v.vpc_id}"),
    target_type=elbv2.TargetType.IP,
    port={v.proxy_port},
    protocol=elbv2.ApplicationProtocol.HTTP,
    # No availability_zone="all" on this in-VPC IP target (see the first pitfall).
    targets=[elbv2_targets.IpTarget("{v.bastion_private_ip}", port={v.proxy_port})],
    health_check=elbv2.HealthCheck(path="{HEALTH_PATH}", healthy_http_codes="200",
                                   interval=Duration.seconds(15)),
)
listener = elbv2.ApplicationListener.from_lookup(self, "StagingListener",
                                                 listener_arn="{v.listener_arn}")
# Requests that carry the header go to the bastion; all others keep their normal path.
elbv2.ApplicationListenerRule(
    self, "EphemworkHeaderRule", listener=listener, priority={v.priority},
    conditions=[elbv2.ListenerCondition.http_header("{HEADER}", ["*"])],
    action=elbv2.ListenerAction.forward([bastion_targets]),
)
# Browsers send the CORS preflight without the header; route it when it requests that header.
elbv2.ApplicationListenerRule(
    self, "EphemworkPreflightRule", listener=listener, priority={v.priority + 1},
    conditions=[
        elbv2.ListenerCondition.http_request_methods(["OPTIONS"]),
        elbv2.ListenerCondition.http_header("Access-Control-Request-Headers", ["*x-ephemwork*"]),
    ],
    action=elbv2.ListenerAction.forward([bastion_targets]),
)
# Explicit egress from the ALB to the bastion (see the second pitfall).
ec2.CfnSecurityGroupEgress(
    self, "EphemworkAlbEgress", group_id="{v.alb_security_group_id}", ip_protocol="tcp",
    from_port={v.proxy_port}, to_port={v.proxy_port},
    destination_security_group_id="{v.bastion_security_group_id}",
)
# Needs: from aws_cdk import aws_elasticloadbalancingv2_targets as elbv2_targets
'''


def _cloudformation(v: AlbValues) -> str:
    return f"""# ephemwork bastion of team {v.team}: add under Resources of the ALB's template.
{_comments("#")}
EphemworkBastionTargets:
  Type: AWS::ElasticLoadBalancingV2::TargetGroup
  Properties:
    VpcId: {v.vpc_id}
    TargetType: ip
    Protocol: HTTP
    Port: {v.proxy_port}
    HealthCheckPath: {HEALTH_PATH}
    HealthCheckIntervalSeconds: 15
    Matcher: {{HttpCode: "200"}}
    Targets:
      # No AvailabilityZone: all on this in-VPC IP target (see the first pitfall).
      - Id: {v.bastion_private_ip}
        Port: {v.proxy_port}
EphemworkHeaderRule:
  Type: AWS::ElasticLoadBalancingV2::ListenerRule
  Properties:
    ListenerArn: {v.listener_arn}
    Priority: {v.priority}
    Conditions:
      - Field: http-header
        HttpHeaderConfig: {{HttpHeaderName: {HEADER}, Values: ["*"]}}
    Actions:
      - Type: forward
        TargetGroupArn: !Ref EphemworkBastionTargets
# Browsers send the CORS preflight without the header; route it when it requests that header.
EphemworkPreflightRule:
  Type: AWS::ElasticLoadBalancingV2::ListenerRule
  Properties:
    ListenerArn: {v.listener_arn}
    Priority: {v.priority + 1}
    Conditions:
      - Field: http-request-method
        HttpRequestMethodConfig: {{Values: [OPTIONS]}}
      - Field: http-header
        HttpHeaderConfig:
          HttpHeaderName: Access-Control-Request-Headers
          Values: ["*x-ephemwork*"]
    Actions:
      - Type: forward
        TargetGroupArn: !Ref EphemworkBastionTargets
# Explicit egress from the ALB to the bastion (see the second pitfall).
EphemworkAlbEgress:
  Type: AWS::EC2::SecurityGroupEgress
  Properties:
    GroupId: {v.alb_security_group_id}
    IpProtocol: tcp
    FromPort: {v.proxy_port}
    ToPort: {v.proxy_port}
    DestinationSecurityGroupId: {v.bastion_security_group_id}
"""


def _terraform(v: AlbValues) -> str:
    return f'''# ephemwork bastion of team {v.team}: add to the Terraform module of the staging ALB.
{_comments("#")}
resource "aws_lb_target_group" "ephemwork_bastion" {{
  name        = "ephemwork-{v.team}"
  vpc_id      = "{v.vpc_id}"
  target_type = "ip"
  protocol    = "HTTP"
  port        = {v.proxy_port}
  health_check {{
    path     = "{HEALTH_PATH}"
    matcher  = "200"
    interval = 15
  }}
}}

resource "aws_lb_target_group_attachment" "ephemwork_bastion" {{
  target_group_arn = aws_lb_target_group.ephemwork_bastion.arn
  target_id        = "{v.bastion_private_ip}"
  port             = {v.proxy_port}
  # No availability_zone = "all" on this in-VPC IP target (see the first pitfall).
}}

resource "aws_lb_listener_rule" "ephemwork_header" {{
  listener_arn = "{v.listener_arn}"
  priority     = {v.priority}
  condition {{
    http_header {{
      http_header_name = "{HEADER}"
      values           = ["*"]
    }}
  }}
  action {{
    type             = "forward"
    target_group_arn = aws_lb_target_group.ephemwork_bastion.arn
  }}
}}

# Browsers send the CORS preflight without the header; route it when it requests that header.
resource "aws_lb_listener_rule" "ephemwork_preflight" {{
  listener_arn = "{v.listener_arn}"
  priority     = {v.priority + 1}
  condition {{
    http_request_method {{
      values = ["OPTIONS"]
    }}
  }}
  condition {{
    http_header {{
      http_header_name = "Access-Control-Request-Headers"
      values           = ["*x-ephemwork*"]
    }}
  }}
  action {{
    type             = "forward"
    target_group_arn = aws_lb_target_group.ephemwork_bastion.arn
  }}
}}

# Explicit egress from the ALB to the bastion (see the second pitfall).
resource "aws_vpc_security_group_egress_rule" "ephemwork_alb_to_bastion" {{
  security_group_id            = "{v.alb_security_group_id}"
  ip_protocol                  = "tcp"
  from_port                    = {v.proxy_port}
  to_port                      = {v.proxy_port}
  referenced_security_group_id = "{v.bastion_security_group_id}"
}}
'''
