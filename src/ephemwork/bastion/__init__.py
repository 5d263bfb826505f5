"""The bastion: the header-routing proxy, the control API, the session registry and the
embedded SSH server of local mode.

This package depends on ``ephemwork.wire`` and the shared core only; it never imports the
client package or any AWS library, so ``serve-bastion`` stays small.
"""
