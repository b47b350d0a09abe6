"""``python -m ddpm_components`` is the ``ddpm-components`` command."""

from ddpm_components.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
