"""Test helpers shared by the fixtures in ``tests/conftest.py``; no tests live here."""
