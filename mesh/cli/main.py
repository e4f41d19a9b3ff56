"""The `helexa` command: a thin dispatcher over subcommands that live in their own modules.

helexa agent ...        mesh.process      run this host's agent
helexa tui ...          tui.app           the live dashboard
helexa status|models|load|unload|chat|key   mesh.cli.ops   operator commands against an agent
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from helexa.mesh.cli import ops
from helexa.mesh.process import main as agent_main


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in {"-h", "--help"}:
        print(__doc__.strip() if __doc__ else "helexa")
        return 0
    command, rest = args[0], args[1:]
    if command == "agent":
        return agent_main(rest)
    if command == "tui":
        # Lazy on purpose: Textual is the dashboard's alone and costs ~0.3 s to import; the agent and the
        # operator commands never need it.
        from helexa.tui.app import main as tui_main  # noqa: PLC0415

        return tui_main(rest)
    return ops.main(args)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
