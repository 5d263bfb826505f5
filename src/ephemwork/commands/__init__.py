"""The bodies of the client commands, composed from the client and (in local mode) bastion."""
