"""Ascend NPU discovery: which chips ``npu-smi info`` lists, and what ATC calls them.

The guides read the chip name off ``npu-smi info`` by eye (``310P3``) and pass
``--soc_version=Ascend310P3`` to ATC; the suite parses the same table so that neither the
soc version nor the device class in the throughput report is typed by hand.
"""
from __future__ import annotations

import re
import shutil
from dataclasses import dataclass

from tooling.tools import ToolTimeout, run_tool


class NpuSmiError(ValueError):
    """``npu-smi info`` printed something that is not the device table."""


@dataclass(frozen=True)
class NpuChip:
    npu: int  # the card ("NPU" column)
    chip: int  # the chip on that card
    device: int  # the logical device id that ACL / ais_bench take
    name: str  # e.g. 310P3: ATC's soc version is "Ascend" + name, and it is the device class
    health: str
    bus_id: str

    @property
    def soc_version(self) -> str:
        return f"Ascend{self.name}"


_BORDER = re.compile(r"^\s*\+[-=+]+\+\s*$")


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def parse_npu_smi_info(text: str) -> list[NpuChip]:
    """The chips of an ``npu-smi info`` table, in the order listed.

    Each chip is a block of two rows between border lines: ``NPU Name | Health | ...`` then
    ``Chip Device | Bus-Id | ...`` (cards without a logical device column use the NPU id).
    Blocks after the device table (newer drivers append a process table) are ignored.
    """
    lines = text.splitlines()
    header = next(
        (i for i, line in enumerate(lines) if line.lstrip().startswith("|") and "NPU" in line and "Name" in line),
        None,
    )
    if header is None:
        shown = "\n".join(lines[:5]).strip() or "(nothing)"
        raise NpuSmiError(f"npu-smi info printed no device table (no 'NPU ... Name' header); it printed:\n{shown}")
    blocks: list[list[str]] = []
    current: list[str] = []
    for line in lines[header + 1 :]:
        if _BORDER.match(line):
            if current:
                blocks.append(current)
            current = []
        elif line.strip().startswith("|"):
            current.append(line)
    if current:
        blocks.append(current)
    blocks = blocks[1:]  # the block right after the header is its second row (Chip / Device / Bus-Id)

    chips: list[NpuChip] = []
    for block in blocks:
        first = _cells(block[0])
        if "Process" in block[0] or "NPU" in first[0]:
            break  # the process table that follows the device table
        if len(block) != 2 or len(first) < 2:
            raise NpuSmiError(f"npu-smi info: expected two rows per chip, got {len(block)}:\n" + "\n".join(block))
        card = first[0].split()
        location = _cells(block[1])
        ids = location[0].split()
        if len(card) != 2 or not card[0].isdigit() or not ids or not all(i.isdigit() for i in ids):
            raise NpuSmiError("npu-smi info: cannot read the NPU id, name and chip id from:\n" + "\n".join(block))
        chips.append(
            NpuChip(
                npu=int(card[0]),
                chip=int(ids[0]),
                device=int(ids[1]) if len(ids) > 1 else int(card[0]),
                name=card[1],
                health=first[1],
                bus_id=location[1] if len(location) > 1 else "",
            )
        )
    if not chips:
        raise NpuSmiError("npu-smi info lists no NPU under its table header")
    return chips


def probe_npus(timeout_s: float = 30.0) -> tuple[list[NpuChip], str]:
    """The chips on this host, or an empty list and why there are none."""
    exe = shutil.which("npu-smi")
    if exe is None:
        return [], "npu-smi not on PATH (no Ascend driver installed)"
    try:
        done = run_tool([exe, "info"], timeout_s=timeout_s)
    except (OSError, ToolTimeout) as exc:
        return [], f"npu-smi info did not run: {exc}"
    if done.returncode != 0:
        return [], f"npu-smi info exited with {done.returncode}: {(done.stdout + done.stderr).strip()[:300]}"
    try:
        return parse_npu_smi_info(done.stdout), ""
    except NpuSmiError as exc:
        return [], str(exc)


def chip_for_device(chips: list[NpuChip], device: int) -> NpuChip:
    for chip in chips:
        if chip.device == device:
            return chip
    listed = ", ".join(f"{c.device} ({c.name})" for c in chips) or "none"
    raise NpuSmiError(f"no NPU with logical device id {device}; npu-smi lists {listed}")
