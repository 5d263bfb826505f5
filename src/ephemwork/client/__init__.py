"""The laptop side of ephemwork: dev-server supervisor, local state, control API client, tunnel.

This package depends on `ephemwork.wire` and the shared core only, never on
`ephemwork.bastion`; local mode composes both above this package.
"""
