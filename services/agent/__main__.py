"""``python -m services.agent --node-id ID [--zone Z] [--address HOST:PORT] [--weight W]``."""

from __future__ import annotations

import argparse
import sys

from phantom_bus import config as cfgmod
from phantom_bus import log
from services.agent.agent import SETTINGS, Agent, run_agent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="phantom-agent", description="Phantom node agent")
    cfgmod.add_flags(parser, SETTINGS)
    parser.add_argument("--watch-pid", type=int, help="also report this process's CPU and memory")
    args = parser.parse_args(argv)
    try:
        cfg = cfgmod.from_args(args, SETTINGS)
        log.setup("agent", json=cfg.log_json, level=cfg.log_level, node=cfg.node_id or "?")
        agent = Agent(cfg, watch_pid=args.watch_pid)
    except (cfgmod.ConfigError, ValueError) as exc:
        print(f"phantom-agent: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(
            f"phantom-agent: cannot record the incarnation under {args.data or 'var'}: {exc}", file=sys.stderr
        )
        return 1
    from phantom_bus.service import serve_metrics

    serve_metrics(cfg, "agent")
    return run_agent(agent)


if __name__ == "__main__":
    sys.exit(main())
