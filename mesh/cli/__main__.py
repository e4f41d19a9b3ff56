"""`python -m helexa.mesh.cli ...`: the `helexa` command without its console script."""

from helexa.mesh.cli.main import main

raise SystemExit(main())
