#!/bin/bash
# ephemwork bastion for team ${team}: rendered by `ephemwork bastion init`, run once by
# cloud-init as root on first boot of Amazon Linux 2023.
set -euo pipefail

# Python 3.11 runs the zipapp; the AWS CLI (part of the AMI) downloads it with the
# instance role, which may read only this one object.
dnf install -y python3.11
install -d -m 0755 /opt/ephemwork
aws s3 cp --region ${region} ${binary_s3_uri} /opt/ephemwork/ephemwork.pyz
chmod 0644 /opt/ephemwork/ephemwork.pyz

# The SSH user of the tunnels. EC2 Instance Connect installs its short-lived keys; it has
# no password and its forced command only waits.
if ! id -u ${ssh_user} >/dev/null 2>&1; then
    useradd --system --create-home --shell /bin/bash ${ssh_user}
fi

cat >/etc/ssh/sshd_config.d/50-ephemwork.conf <<'SSHD_DROP_IN'
${sshd_drop_in}SSHD_DROP_IN
chmod 0644 /etc/ssh/sshd_config.d/50-ephemwork.conf
sshd -t
systemctl reload sshd

cat >/etc/systemd/system/ephemwork-bastion.service <<'SYSTEMD_UNIT'
${systemd_unit}SYSTEMD_UNIT
systemctl daemon-reload
systemctl enable --now ephemwork-bastion.service
