"""Compatibility re-export: GPU sizing moved to :mod:`epvsseg.gpu` (the detector owns its batch sizing).

Kept only until ``bids_app.participant`` imports :mod:`epvsseg.gpu` (or :func:`epvsseg.detect.detect`) directly;
delete this module then.
"""

from epvsseg.gpu import (  # noqa: F401
    RESERVE_BYTES,
    USABLE_FRACTION,
    batch_for_memory,
    describe_device,
    free_cuda_bytes,
    unet_slice_bytes,
)
