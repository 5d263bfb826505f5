"""The bastion's first-boot script, rendered from the templates in ``templates/``.

The script installs Python 3.11, downloads the zipapp, creates the tunnel user, adds the
sshd drop-in that confines that user to the tunnel, and starts ``serve-bastion`` under
systemd. The same text appears in the plan and goes into ``RunInstances``.
"""

from __future__ import annotations

from importlib import resources
from string import Template

import attrs

SSH_USER = "ephemwork"
PYTHON = "/usr/bin/python3.11"


@attrs.frozen
class UserDataInputs:
    """The values the templates need."""

    team: str
    region: str
    binary_s3_uri: str
    control_port: int = 7070
    proxy_port: int = 80
    # Inclusive range of the tunnel ports: serve-bastion hands them out, and sshd lets the
    # tunnel user listen on these and no other ports.
    port_range: tuple[int, int] = (20000, 20999)
    ssh_user: str = SSH_USER
    python: str = PYTHON


def load_template(name: str) -> Template:
    """Return the template file *name* from ``ephemwork/aws/templates``."""
    text = resources.files("ephemwork.aws").joinpath("templates", name).read_text("utf-8")
    return Template(text)


def render_sshd_drop_in(inputs: UserDataInputs) -> str:
    """Render ``/etc/ssh/sshd_config.d/50-ephemwork.conf``."""
    low, high = inputs.port_range
    # One PermitListen line with every port: a later PermitListen line would be ignored,
    # because sshd uses the first value it reads for each keyword.
    permit_listen = " ".join(f"127.0.0.1:{port}" for port in range(low, high + 1))
    return load_template("sshd_ephemwork.conf").substitute(
        ssh_user=inputs.ssh_user, control_port=inputs.control_port, permit_listen=permit_listen
    )


def render_systemd_unit(inputs: UserDataInputs) -> str:
    """Render ``/etc/systemd/system/ephemwork-bastion.service``."""
    low, high = inputs.port_range
    return load_template("ephemwork-bastion.service").substitute(
        python=inputs.python,
        proxy_port=inputs.proxy_port,
        control_port=inputs.control_port,
        port_range=f"{low}-{high}",
    )


def render_user_data(inputs: UserDataInputs) -> str:
    """Render the whole first-boot shell script."""
    return load_template("userdata.sh").substitute(
        team=inputs.team,
        region=inputs.region,
        binary_s3_uri=inputs.binary_s3_uri,
        ssh_user=inputs.ssh_user,
        sshd_drop_in=render_sshd_drop_in(inputs),
        systemd_unit=render_systemd_unit(inputs),
    )
