"""``python -m data_synth build|inspect``."""

from .cli import main

raise SystemExit(main())
