"""`python -m memkfac.cli` (and `torchrun -m memkfac.cli`) run the `memkfac` command."""

from memkfac.cli import main

raise SystemExit(main())
