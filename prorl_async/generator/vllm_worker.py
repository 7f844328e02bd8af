"""The worker extension vLLM loads into its worker process (``worker_extension_cls``): it runs *inside* vLLM,
between engine steps, not in the generator's process. It joins the learner's weight group with a
:class:`~prorl_async.transport.weights.receiver.WeightReceiver` and loads each update with vLLM's
``reload_weights``. Only plain values cross vLLM's RPC; the weights come over the group. The generator reaches it
through :class:`prorl_async.generator.engine.Engine` (``collective_rpc``); ``transport/weights/sender.py``'s
docstring has the protocol.
"""

from __future__ import annotations

from typing import Any

import torch

from prorl_async.transport.weights.receiver import WeightReceiver
from prorl_async.transport.weights.sender import WeightSyncError


class WeightSyncWorkerExtension:
    """Mixed into vLLM's worker class (``worker_extension_cls=EXTENSION``); reached with ``collective_rpc``.

    Methods run on the worker, between engine steps; ``self`` is the vLLM worker (``device``,
    ``model_runner``, ``reload_weights``). Only plain values cross vLLM's RPC; the weights come over the
    group. ``weight_sync``'s docstring has the exact calls.
    """

    def weight_sync_join(self, cfg: dict[str, Any], host: str, port: int, generator_id: int,
                         holds_version: int | None = None) -> dict[str, Any]:
        """(Re)join the learner's weight group; returns ``member``, ``after_version`` and ``backend``.

        ``holds_version``: the version the engine's weights are (the learner catches an older one up).
        """
        from prorl_async.config import WeightSyncConfig

        self.weight_sync_leave()
        member = f"gen{generator_id}.rank{getattr(self, 'rank', 0)}"
        rx = WeightReceiver(WeightSyncConfig(**cfg), host, port, member, self.device,  # type: ignore[attr-defined]
                            holds_version)
        self._weight_sync = rx
        return {"member": member, "after_version": rx.after_version, "backend": rx.backend}

    def weight_sync_receive(self, version: int | None = None) -> dict[str, Any]:
        """Receive the next update into the running model (``reload_weights``, streaming).

        Returns the :class:`ReceiveStats` fields plus ``inflight_tokens``: {vLLM request id: output tokens
        sampled before this update} (``None`` if this vLLM does not expose it). Call with generation
        paused; reset the prefix cache (running requests included) before resuming.
        """
        rx: WeightReceiver | None = getattr(self, "_weight_sync", None)
        if rx is None or rx.group is None:
            raise WeightSyncError("weight_sync_receive before weight_sync_join (or after a failure: join again)")
        inflight = self._weight_sync_inflight()
        heads = self._weight_sync_tied_heads()
        stats = rx.receive(lambda weights: self.reload_weights(weights_iterator=weights), version)  # type: ignore[attr-defined]
        for head, packed in heads:
            if head.cpu_linear is packed:  # not reprocessed by the reload: repack from the new, shared weight
                head.quant_method.process_weights_after_loading(head)
        return {**stats.as_dict(), "inflight_tokens": inflight}

    def weight_sync_raw_broadcast(self) -> int:
        """Benchmark baseline: receive the sender's raw flat buffer (see :meth:`WeightSender.raw_broadcast`)."""
        rx: WeightReceiver | None = getattr(self, "_weight_sync", None)
        if rx is None:
            raise WeightSyncError("weight_sync_raw_broadcast before weight_sync_join")
        return rx.raw_broadcast()

    def weight_sync_leave(self) -> None:
        rx: WeightReceiver | None = getattr(self, "_weight_sync", None)
        if rx is not None:
            rx.close()
        self._weight_sync = None

    def _weight_sync_tied_heads(self) -> list[tuple[Any, Any]]:
        """(LM head, its ``cpu_linear``) for each head that shares its weight with another module (tied).

        vLLM on CPU computes linear layers from a prepacked copy of their weight made when the layer is processed
        (``cpu_linear``). ``reload_weights`` reprocesses a layer only when a weight of its own was loaded: a tied
        head that was not (its name absent from the update, or skipped by the model's loader) keeps packing the
        *old* embedding (log-probs off by ~1 on the tiny model). Empty off CPU."""
        from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        owners: dict[int, int] = {}
        for m in model.modules():
            w = getattr(m, "weight", None)
            if isinstance(w, torch.Tensor) and w.numel():
                owners[w.data_ptr()] = owners.get(w.data_ptr(), 0) + 1
        return [(m, m.cpu_linear) for m in model.modules() if isinstance(m, ParallelLMHead)
                and hasattr(m, "cpu_linear") and owners.get(m.weight.data_ptr(), 0) > 1]

    def _weight_sync_inflight(self) -> dict[str, int] | None:
        requests = getattr(getattr(self, "model_runner", None), "requests", None)
        if not isinstance(requests, dict):
            return None
        return {rid: len(state.output_token_ids) for rid, state in requests.items()}
