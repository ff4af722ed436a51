"""``python -m fdivctl`` — same as the ``fdivctl`` command."""

from fdivctl.cli import main

if __name__ == "__main__":
    main()
