"""`python -m coalmine` is the `coalmine` command."""

from coalmine.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
