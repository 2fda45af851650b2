"""Where the keys are found (:func:`resolve_directory`).

``curve_dir`` if set; else ``DATA/keys`` if it exists; else, for a client
(CLI, phantom-top, a library ``Client``) while ``data`` is left at its
default, the ``var/keys`` of the checkout this package runs from, so tools run
from anywhere on the host of a ``make up`` cluster find its keys. A broker,
service or agent that finds no keys refuses to start (security off takes
``security = off``); a client that finds none connects without and is told if
the broker wants CURVE. In a directory found as ``DATA/keys`` (one host, one
user), a service or agent whose own key is missing makes it and authorizes it,
as ``phantom keygen`` would: ``python -m services.agent --node-id node-4``
joins a ``make up`` cluster with nothing else to do. With an explicit
``curve_dir`` (the production layout, keys copied between hosts) nothing is made.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: The directory under ``data`` where ``make up`` keeps the cluster's keys.
KEYS_DIR = "keys"


def setting(cfg: Mapping[str, Any], name: str) -> Any:
    if name in cfg:
        return cfg[name]
    from phantom_bus import config as cfgmod

    return cfgmod.load(names=(name,))[name]


def checkout_keys() -> Path | None:
    """``var/keys`` of the source checkout this package runs from, if it is one and has keys."""
    root = Path(__file__).resolve().parents[2]
    keys = root / "var" / KEYS_DIR
    if (root / "supervisor.conf").is_file() and keys.is_dir():
        return keys
    return None


def resolve_directory(cfg: Mapping[str, Any], *, client: bool = False) -> tuple[Path, bool] | None:
    """The key directory and whether it was set explicitly (``curve_dir``), or None if
    there is none: ``DATA/keys`` if it exists, else (``client`` with ``data`` at its
    default) the checkout's ``var/keys``."""
    explicit = str(cfg.get("curve_dir") or "")
    if not explicit and "curve_dir" not in cfg:
        explicit = str(setting(cfg, "curve_dir") or "")
    if explicit:
        return Path(explicit), True
    data = str(setting(cfg, "data"))
    keys = Path(data) / KEYS_DIR
    if keys.is_dir():
        return keys, False
    if client:
        from phantom_bus import config as cfgmod

        if isinstance(cfg, cfgmod.Config) and "data" in cfg:
            source = cfg.source("data")
        elif "data" in cfg:
            source = "given"
        else:
            source = cfgmod.load(names=("data",)).source("data")
        if source == "default":
            found = checkout_keys()
            if found is not None:
                return found, False
    return None
