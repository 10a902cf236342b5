"""Point-to-point exchange between neighbouring pipeline stages, with a timeout on every wait.

Megatron's ``P2PCommunicator`` waits on its requests without a timeout, and on gloo a
point-to-point wait without one never ends when the peer is gone. This module posts the
same operations Megatron posts (``torch.distributed.batch_isend_irecv`` of the sends and
receives of one step, then a wait on every request, never just one: a gloo pitfall) and
waits with ``Work.wait(timeout)``, so a stalled pipeline raises
:class:`PipelineTimeout` instead of hanging. Receive buffers are created like Megatron's:
``torch.empty(shape, dtype=config.pipeline_dtype, requires_grad=True)`` on the current
device.
"""

from __future__ import annotations

import datetime
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

__all__ = ["PipelineP2P", "PipelineTimeout"]


class PipelineTimeout(RuntimeError):
    """A send or receive between two stages did not complete within the timeout."""


class PipelineP2P:
    """Sends and receives of one stage with its neighbours in the pipeline group.

    Args:
        pp_group: the pipeline-parallel process group.
        pipeline_dtype: dtype of the activations and gradients that cross stages
            (Megatron's ``config.pipeline_dtype``).
        timeout_s: the longest any single exchange may take, in seconds.
    """

    def __init__(self, pp_group, pipeline_dtype: torch.dtype, timeout_s: float):
        self.pp_group = pp_group
        size, rank = pp_group.size(), pp_group.rank()
        self.prev_rank = dist.get_global_rank(pp_group, (rank - 1) % size)
        self.next_rank = dist.get_global_rank(pp_group, (rank + 1) % size)
        self.dtype = pipeline_dtype
        self.timeout = datetime.timedelta(seconds=timeout_s)
        if torch.cuda.is_available():
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")

    def exchange(
        self,
        send_next: Optional[torch.Tensor] = None,
        send_prev: Optional[torch.Tensor] = None,
        recv_prev_shape: Optional[Sequence[int]] = None,
        recv_next_shape: Optional[Sequence[int]] = None,
    ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Post the given sends and receives together and wait for all of them.

        Args:
            send_next: activation ``[s, b, h]`` for the next stage, or None.
            send_prev: gradient ``[s, b, h]`` for the previous stage, or None.
            recv_prev_shape / recv_next_shape: shape to receive from the previous / next
                stage, or None.

        Returns:
            ``(from_prev, from_next)``: the received tensors (None where nothing was asked).

        Raises:
            PipelineTimeout: a request did not complete within ``timeout_s``.
            RuntimeError: the transport failed (for example the peer process died).
        """
        ops: List[dist.P2POp] = []
        from_prev = from_next = None
        if send_prev is not None:
            ops.append(dist.P2POp(dist.isend, send_prev, self.prev_rank, self.pp_group))
        if recv_prev_shape is not None:
            from_prev = self._buffer(recv_prev_shape)
            ops.append(dist.P2POp(dist.irecv, from_prev, self.prev_rank, self.pp_group))
        if send_next is not None:
            ops.append(dist.P2POp(dist.isend, send_next, self.next_rank, self.pp_group))
        if recv_next_shape is not None:
            from_next = self._buffer(recv_next_shape)
            ops.append(dist.P2POp(dist.irecv, from_next, self.next_rank, self.pp_group))
        if ops:
            works = dist.batch_isend_irecv(ops)
            for work in works:
                try:
                    work.wait(self.timeout)
                except RuntimeError as exc:
                    if "timed out" in str(exc).lower():
                        raise PipelineTimeout(
                            f"no answer within {self.timeout.total_seconds():g} s: {exc}"
                        ) from exc
                    raise  # e.g. the peer process died: its own error says why
        return from_prev, from_next

    def _buffer(self, shape: Sequence[int]) -> torch.Tensor:
        return torch.empty(tuple(shape), dtype=self.dtype, device=self.device, requires_grad=True)
