"""The target-manager interface: what the driver needs of tgt (`tgt.TgtTargets`) or LIO (`lio.LioTargets`)."""

from __future__ import annotations

from typing import Protocol


class Targets(Protocol):
    """Target management: one target `IQN_PREFIX:KEY` per image, its LUN 1 backed by STORE/KEY."""

    async def check(self) -> None:
        """The target manager answers; OSError if not."""

    async def luns(self) -> dict[str, str]:
        """key -> backing path of LUN 1 (empty if the target has none), for targets under IQN_PREFIX."""

    async def create_lun(self, key: str, path: str, size: int) -> None:
        """Target + LUN 1 on `path` + ACL; nothing is left behind if it fails."""

    async def delete_lun(self, key: str) -> None:
        """Target and LUN gone (sessions on it are dropped); no error if there is none."""

    async def resize_lun(self, key: str, path: str, size: int) -> None:
        """Make the target see the backing file's new size."""

    async def bind(self, key: str, initiators: tuple[str, ...]) -> None:
        """Allow `initiators` (all of them when empty) to log in to the target."""

    async def ensure(self, key: str, path: str, size: int) -> bool:
        """Create what is missing of the target and its LUN; True if anything was created."""
