"""The running guest kernel's symbols: its System.map, and with --kaslr the
offset it runs at, found from a vCPU's page tables once someone asks."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable, Sequence

from microvmm.diag.symbols import KaslrSymbols, SymbolMap, SymbolMapError, find_system_map

if TYPE_CHECKING:
    from microvmm.vmconfig import VmConfig

logger = logging.getLogger(__name__)


def load_running_symbols(config: "VmConfig", memory: Callable[[], object],
                         runners: Callable[[], Sequence]) -> SymbolMap | KaslrSymbols | None:
    """The kernel's System.map (--system-map, or found beside the kernel), None
    without one. With --kaslr, wrapped so that addresses are looked up at the
    offset `memory()` and the vCPUs of `runners()` show."""
    path = config.system_map or find_system_map(config.kernel)
    if not path:
        return None
    try:
        symbols = SymbolMap.from_file(path)
    except SymbolMapError as err:
        logger.warning("%s; diagnostics will show raw addresses", err)
        return None
    if not config.kaslr:
        return symbols
    return KaslrSymbols(symbols, lambda: find_kaslr_offset(symbols, memory(), runners()))


def find_kaslr_offset(symbols: SymbolMap, memory, runners: Sequence) -> int | None:
    """`--kaslr`: how far the running kernel is from its System.map
    addresses, read from the page tables of a vCPU's CR3 (diag/kaslr.py);
    None while that is not known. Said once when found."""
    from microvmm.diag.kaslr import kaslr_offset
    link_text = symbols.address_of("_text")
    if link_text is None or memory is None:
        return None
    for runner in runners:
        # A running vCPU answers between two KVM_RUNs; a stopped one is read here.
        snapshot = runner.request_snapshot(timeout=0.5) if runner.thread.is_alive() else None
        if snapshot is None and not runner.thread.is_alive():
            try:
                snapshot = runner.snapshot()
            except Exception as err:  # an odd state: no offset, no crash
                logger.debug("vCPU %d: no state for the KASLR offset: %s", runner.index, err)
        if snapshot is None:
            continue
        offset = kaslr_offset(memory, snapshot.cr3, link_text)
        if offset is not None:
            logger.info("--kaslr: the kernel runs %#x bytes from its System.map addresses "
                        "(_text at %#x; from the guest's page tables, CR3 %#x)",
                        offset, link_text + offset, snapshot.cr3)
            return offset
    return None
