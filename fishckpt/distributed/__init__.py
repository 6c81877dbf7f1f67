"""Training across processes with torch.distributed: the masked gradient all-reduce for DDP.

``import fishckpt`` does not import this package; single-process training never loads the
distributed parts of torch it uses. DTensor (FSDP2) parameters are handled by
:class:`fishckpt.SparseAdamW` and :func:`fishckpt.mask_gradients` themselves.
"""

from .ddp import MaskedAllReduceState, masked_allreduce_hook, register_masked_comm_hook

__all__ = ["MaskedAllReduceState", "masked_allreduce_hook", "register_masked_comm_hook"]
