"""Allows `python -m fsar ...` (used under `torchrun -m fsar`)."""

from fsar.cli import main

raise SystemExit(main())
