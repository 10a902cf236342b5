"""Point-to-point exchange between neighbouring pipeline stages; no wait can hang.

Posts what Megatron's ``P2PCommunicator`` posts (``batch_isend_irecv`` of one step's sends
and receives, then a wait on every request, never just one: a gloo pitfall). gloo: the host
waits with ``Work.wait(timeout)`` and a stalled peer raises :class:`PipelineTimeout`.
NCCL: ``Work.wait()`` without a timeout, so the current stream waits for the NCCL stream
while the host goes on (a wait with a timeout blocks the host until the GPU is done,
``ProcessGroupNCCL.hpp`` ``WorkNCCL::wait``; Megatron's ``batch_p2p_sync`` even synchronizes
the device); a :class:`Watchdog` thread times the exchange. Receive buffers as Megatron's:
``torch.empty(shape, dtype=config.pipeline_dtype, requires_grad=True)``.
"""

from __future__ import annotations

import collections
import datetime
import os
import sys
import threading
import time
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

__all__ = ["PipelineP2P", "PipelineTimeout", "PACICommunicationError", "Watchdog", "wait_all"]


class PipelineTimeout(RuntimeError):
    """A send or receive between two stages did not complete within the timeout."""


class PACICommunicationError(RuntimeError):
    """A point-to-point operation of the pipeline (or of a tied embedding) failed, timed
    out, or would send what the receiver does not expect.

    The message names the stage, the peer stage, the micro-batch (or update) and the action.
    """


def _exit(message: str) -> None:
    sys.stderr.write(f"PACI watchdog: {message}\n")
    sys.stderr.flush()
    os._exit(1)  # the launcher (torchrun, srun) then stops the other ranks


class Watchdog:
    """Watches asynchronous (NCCL) exchanges from a daemon thread: one not completed within
    ``timeout_s`` seconds calls ``on_expire(message)`` (default: the message to stderr,
    then exit code 1). The message is the exchange's label (stage, peer, micro-batch,
    action) and the timeout. ``poll_s``: seconds between checks.

    ``device``: the CUDA device of the exchanges; the thread makes it its current device
    before its first check (``Work.is_completed()`` from a thread whose current device is
    the default, 0, would create a CUDA context there: about 0.5 GB of GPU 0 per rank)."""

    def __init__(self, timeout_s: float, on_expire: Optional[Callable[[str], None]] = None,
                 poll_s: Optional[float] = None, device: Optional[torch.device] = None):
        self.timeout_s = timeout_s
        self.device = torch.device(device) if device is not None else None
        self.on_expire = on_expire or _exit
        self.poll_s = poll_s if poll_s is not None else min(1.0, timeout_s / 10)
        self._pending: collections.deque = collections.deque()  # (deadline, works, label)
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None

    def watch(self, works: Sequence, label: str) -> None:
        """Time ``works`` (the requests of one exchange, ``label`` naming it) from now."""
        with self._lock:
            self._prune()  # completed works release their tensors now, not at the next poll
            self._pending.append((time.monotonic() + self.timeout_s, list(works), label))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, daemon=True)
                self._thread.start()

    def _prune(self) -> None:
        """Forget completed exchanges: the head first (works of one channel complete in the
        order they were posted), then any other completed one."""
        while self._pending and all(w.is_completed() for w in self._pending[0][1]):
            self._pending.popleft()
        if any(all(w.is_completed() for w in entry[1]) for entry in self._pending):
            self._pending = collections.deque(
                e for e in self._pending if not all(w.is_completed() for w in e[1]))

    def _loop(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        while True:
            time.sleep(self.poll_s)
            with self._lock:
                self._prune()
                now = time.monotonic()
                # the oldest posted exchange past its deadline (any, not only the head:
                # set_timeout can shorten later ones)
                expired = next((e for e in self._pending if now > e[0]), None)
                if expired is not None:
                    self._pending.remove(expired)
            if expired is not None:
                self.on_expire(f"{expired[2]}: not completed within {self.timeout_s:g} s")


def wait_all(works: Sequence, label: str, timeout: datetime.timedelta,
             watchdog: Optional[Watchdog] = None) -> None:
    """Wait for every request of one exchange: on the host with ``timeout`` (gloo), or,
    given a ``watchdog`` (NCCL), on the current stream while the watchdog times it.

    Raises:
        PipelineTimeout: (host wait) a request did not complete within ``timeout``.
        RuntimeError: the transport failed (for example the peer process died).
    """
    for work in works:
        if watchdog is not None:
            work.wait()  # stream-level: the host does not block
            continue
        try:
            work.wait(timeout)
        except RuntimeError as exc:
            if "timed out" in str(exc).lower():
                raise PipelineTimeout(
                    f"no answer within {timeout.total_seconds():g} s: {exc}") from exc
            raise  # e.g. the peer process died: its own error says why
    if watchdog is not None:
        watchdog.watch(works, label)


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
        self.device = (torch.device("cuda", torch.cuda.current_device())
                       if torch.cuda.is_available() else torch.device("cpu"))
        nccl = "nccl" in str(dist.get_backend(pp_group)) and self.device.type == "cuda"
        self.watchdog = Watchdog(timeout_s, device=self.device) if nccl else None

    def check_send(self, tensor: torch.Tensor, shape: Sequence[int], label: str) -> None:
        """Refuse to send what the receiving stage does not expect: its buffer is
        ``torch.empty(shape, dtype=pipeline_dtype)`` (Megatron's), and NCCL would fill it with
        the bytes of whatever is sent (or wait forever for the rest) where gloo raises.

        Raises:
            PACICommunicationError: ``tensor``'s shape or dtype differs; nothing was sent.
        """
        if tuple(tensor.shape) != tuple(shape) or tensor.dtype != self.dtype:
            raise PACICommunicationError(
                f"{label}: the tensor to send is {tuple(tensor.shape)} {tensor.dtype}, the "
                f"receiving stage expects {tuple(shape)} {self.dtype} ([sequence / CP (/ TP with "
                "sequence parallelism), micro batch, hidden] in config.pipeline_dtype, "
                "Megatron's get_tensor_shapes): the forward step must return that shape and "
                "dtype; nothing was sent")

    def exchange(
        self,
        send_next: Optional[torch.Tensor] = None,
        send_prev: Optional[torch.Tensor] = None,
        recv_prev_shape: Optional[Sequence[int]] = None,
        recv_next_shape: Optional[Sequence[int]] = None,
        label: str = "a pipeline exchange",
        send_prev_count: Optional[torch.Tensor] = None,
        recv_next_count: Optional[torch.Tensor] = None,
    ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Post the given sends and receives together and wait for all of them.

        Args:
            send_next: activation ``[s, b, h]`` for the next stage, or None.
            send_prev: gradient ``[s, b, h]`` for the previous stage, or None.
            recv_prev_shape / recv_next_shape: shape to receive from the previous / next
                stage, or None.
            label: what the exchange is, for the watchdog's message (stage, peer,
                micro-batch, action).
            send_prev_count: a ``[1]`` int32 tensor sent to the previous stage right after
                ``send_prev`` (with ``--calculate-per-token-loss``: the token count of the
                gradient's micro-batch), or None.
            recv_next_count: a ``[1]`` int32 buffer that receives, in place, what the next
                stage sent after its gradient, or None.

        Returns:
            ``(from_prev, from_next)``: the received tensors (None where nothing was asked).

        Raises:
            PipelineTimeout, RuntimeError: as :func:`wait_all`.
        """
        ops: List[dist.P2POp] = []
        from_prev = from_next = None
        if send_prev is not None:
            ops.append(dist.P2POp(dist.isend, send_prev, self.prev_rank, self.pp_group))
        if send_prev_count is not None:
            ops.append(dist.P2POp(dist.isend, send_prev_count, self.prev_rank, self.pp_group))
        if recv_prev_shape is not None:
            from_prev = self._buffer(recv_prev_shape)
            ops.append(dist.P2POp(dist.irecv, from_prev, self.prev_rank, self.pp_group))
        if send_next is not None:
            ops.append(dist.P2POp(dist.isend, send_next, self.next_rank, self.pp_group))
        if recv_next_shape is not None:
            from_next = self._buffer(recv_next_shape)
            ops.append(dist.P2POp(dist.irecv, from_next, self.next_rank, self.pp_group))
        if recv_next_count is not None:
            ops.append(dist.P2POp(dist.irecv, recv_next_count, self.next_rank, self.pp_group))
        if ops:
            wait_all(dist.batch_isend_irecv(ops), label, self.timeout, self.watchdog)
        return from_prev, from_next

    def _buffer(self, shape: Sequence[int]) -> torch.Tensor:
        return torch.empty(tuple(shape), dtype=self.dtype, device=self.device, requires_grad=True)
