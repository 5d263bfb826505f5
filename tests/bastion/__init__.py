"""Tests for ephemwork.bastion."""
