"""The `helexa` command: a thin dispatcher over subcommands that live in their own modules.

helexa agent ...        mesh.agent        run this host's agent
helexa tui ...          tui.app           the live dashboard
helexa status|models|load|unload|chat|key   mesh.ops   operator commands against an agent
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in {"-h", "--help"}:
        print(__doc__.strip() if __doc__ else "helexa")
        return 0
    command, rest = args[0], args[1:]
    if command == "agent":
        from helexa.mesh.agent import main as agent_main

        return agent_main(rest)
    if command == "tui":
        from helexa.tui.app import main as tui_main

        return tui_main(rest)
    from helexa.mesh.cli.ops import main as ops_main

    return ops_main(args)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
