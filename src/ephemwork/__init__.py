"""ephemwork: route one staging service's requests to a developer's laptop."""

__version__ = "0.1.0"
