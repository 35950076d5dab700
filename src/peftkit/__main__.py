"""``python -m peftkit`` (also what ``torchrun -m peftkit`` runs)."""

from peftkit.cli import main

raise SystemExit(main())
