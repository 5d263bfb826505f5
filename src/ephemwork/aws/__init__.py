"""Provisioning of the EC2 bastion with aioboto3.

Only the laptop's ``bastion`` commands and the ``ec2`` tunnel import this package; the
bastion process (``serve-bastion``) never does, so it never loads botocore.
"""
