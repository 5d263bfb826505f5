"""Run the command-line interface with ``python -m ephemwork``."""

from ephemwork.cli import main

if __name__ == "__main__":
    main()
