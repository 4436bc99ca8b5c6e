"""Send stage: C-STORE the result objects to the PACS and check the status it returns.

Only Success or a Warning status counts as delivered; anything else raises ``SendFailed`` so the
job is retried with backoff.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pydicom
from pynetdicom import build_context

from node.config import Peer
from node.errors import SendFailed
from node.scu import associate

logger = logging.getLogger(__name__)

WARNING_STATUSES = {0x0001, 0xB000, 0xB006, 0xB007}
RESULT_TRANSFER_SYNTAXES = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]
"""Explicit, then Implicit VR Little Endian: every result object is written uncompressed."""

Chooser = Callable[[frozenset[str]], list[Path]]
"""Given the SOP classes the peer accepted at association, the files to send."""


def store_files(
    paths: list[Path],
    peer: Peer,
    calling_ae: str,
    *,
    timeout_s: float = 30.0,
    choose: Chooser | None = None,
) -> list[Path]:
    """Send DICOM files to ``peer`` in one association; return the files sent.

    A presentation context is proposed for the SOP class of every file.  Without ``choose``
    every file is sent; with it, ``choose`` gets the SOP classes the peer accepted and returns
    the files to send (``node.outputs.chooser``: a profile and its fallback; it raises
    ``SendFailed`` when nothing acceptable is left).

    Raises
    ------
    SendFailed
        On any failure: no connection, association refused, a file of a SOP class the peer
        refused, no or a failure C-STORE status.
    """
    datasets = {p: pydicom.dcmread(p) for p in paths}
    contexts = [
        build_context(sop_class, RESULT_TRANSFER_SYNTAXES)
        for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets.values()})
    ]
    with associate(
        peer, contexts, calling_ae=calling_ae, timeout_s=timeout_s, error=SendFailed
    ) as assoc:
        accepted = frozenset(str(cx.abstract_syntax) for cx in assoc.accepted_contexts)
        chosen = list(paths) if choose is None else choose(accepted)
        refused = sorted({str(datasets[p].SOPClassUID) for p in chosen} - accepted)
        if refused:
            raise SendFailed(f"{peer.name} refused SOP class(es) {', '.join(refused)}")
        for ds in (datasets[p] for p in chosen):
            status = assoc.send_c_store(ds)
            code = int(status.Status) if status is not None and "Status" in status else None
            if code is None:
                raise SendFailed(f"{peer.name}: no C-STORE response (timeout or abort)")
            if code != 0x0000 and code not in WARNING_STATUSES:
                raise SendFailed(f"{peer.name}: C-STORE status 0x{code:04X}")
            if code != 0x0000:
                logger.warning(
                    "%s answered warning 0x%04X for %s", peer.name, code, ds.SOPInstanceUID
                )
    return chosen
