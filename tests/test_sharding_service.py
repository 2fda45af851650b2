"""The sharding shell's promise: readers never see an epoch that is not on disk yet."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from phantom_bus import config
from phantom_bus.service import SERVICE_SETTINGS
from services.sharding.service import SETTINGS, ShardingService
from services.sharding.store import MapStore


def test_map_served_during_a_save_is_the_committed_one(tmp_path: Path) -> None:
    cfg = config.load(env={"PHANTOM_DATA": str(tmp_path)}, names=(*SERVICE_SETTINGS, *SETTINGS))
    svc = ShardingService(cfg)
    first = svc.op_map()["epoch"]
    real_save = svc.store.save

    def slow_save(*args: object) -> None:
        time.sleep(0.3)  # a slow disk: the window in which a SIGKILL could strike
        real_save(*args)  # type: ignore[arg-type]

    svc.store.save = slow_save  # type: ignore[method-assign]

    async def scenario() -> tuple[int, int, int]:
        adding = asyncio.ensure_future(svc.op_add_node("node-1", "z1", 1.0))
        await asyncio.sleep(0.1)
        during = svc.op_map()["epoch"]
        on_disk = MapStore(tmp_path).load()[0].epoch  # type: ignore[index]
        await adding
        return during, on_disk, svc.op_map()["epoch"]

    during, on_disk, after = asyncio.run(scenario())
    assert during == first == on_disk  # the change is not served before it is saved
    assert after > first
    assert svc.op_map(since_epoch=after) is None
    svc.store.close()
