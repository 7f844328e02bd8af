"""A minimal generator for the weight-sync tests: vLLM ``AsyncLLM`` (CPU) with the weight-sync worker extension,
driven by JSON commands on stdin; it answers ``@@ws {json}`` lines on stdout (vLLM logs there too).

It uses the calls the module docstring of ``prorl_async.transport.weights.sender`` documents: join, then for an update
pause (keep) -> ``weight_sync_receive`` -> reset the prefix cache, running requests included -> resume, and
stamps each token with the version of the weights that produced it from ``inflight_tokens``.

Commands (one JSON object a line):
- ``{"cmd": "generate", "requests": [{"id", "prompt_ids", "n", "max_tokens"}], "update_after": K, "version": v}``:
  run the requests (temperature 1, ``ignore_eos``); with ``update_after``, receive version ``v`` (the learner
  broadcasts it right after sending the command) once the first sample has K tokens, then let them finish;
  answers ``generated`` with every sample's tokens, log-probs and per-token versions;
- ``{"cmd": "update", "version": v}``: receive an update between requests; answers ``updated``;
- ``{"cmd": "rejoin"}``: leave the weight group and join again; answers ``joined``;
- ``{"cmd": "exit"}``.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any


def emit(event: str, **fields: Any) -> None:
    print("@@ws " + json.dumps({"event": event, **fields}), flush=True)


class Generator:
    def __init__(self, engine: Any, cfg: dict, host: str, port: int, generator_id: int) -> None:
        self.engine, self.cfg, self.host, self.port, self.generator_id = engine, cfg, host, port, generator_id
        self.version = 0  # the weights vLLM loaded from disk
        self.after_version = -1

    async def join(self) -> dict:
        await self.engine.collective_rpc("weight_sync_leave")
        [info] = await self.engine.collective_rpc(
            "weight_sync_join", args=(self.cfg, self.host, self.port, self.generator_id)
        )
        self.after_version = info["after_version"]
        return info

    async def update(self, version: int) -> dict:
        """Pause -> receive -> reset (running requests too) -> resume: no engine step sees a half-swapped state."""
        assert version > max(self.after_version, self.version), (version, self.after_version, self.version)
        t0 = time.perf_counter()
        await self.engine.pause_generation(mode="keep", clear_cache=False)
        try:
            [got] = await self.engine.collective_rpc("weight_sync_receive", args=(version,))
            reset = await self.engine.reset_prefix_cache(reset_running_requests=True)
        finally:
            await self.engine.resume_generation()
        self.version = got["version"]
        return {**got, "prefix_reset": reset, "pause_s": time.perf_counter() - t0}

    async def generate(self, requests: list[dict], update_after: int | None, version: int | None) -> dict:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        from prorl_async.transport.weights.receiver import split_request_id

        samples: dict[tuple[str, int], dict] = {}
        for r in requests:
            for i in range(r["n"]):
                samples[(r["id"], i)] = {"id": r["id"], "index": i, "prompt_ids": r["prompt_ids"], "token_ids": [],
                                         "logprobs": [], "start_version": self.version}
        first = samples[(requests[0]["id"], 0)]
        reached = asyncio.Event()

        async def run(r: dict) -> None:
            params = SamplingParams(n=r["n"], temperature=1.0, max_tokens=r["max_tokens"], logprobs=0,
                                    ignore_eos=True, output_kind=RequestOutputKind.DELTA)
            async for out in self.engine.generate(TokensPrompt(prompt_token_ids=r["prompt_ids"]), params, r["id"]):
                for c in out.outputs:
                    s = samples[(r["id"], c.index)]
                    s["token_ids"] += list(c.token_ids)
                    s["logprobs"] += [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids, strict=True)]
                if update_after is not None and len(first["token_ids"]) >= update_after:
                    reached.set()

        tasks = [asyncio.create_task(run(r)) for r in requests]
        updates = []
        if update_after is not None:
            await reached.wait()
            updates.append(await self.update(version))
        await asyncio.gather(*tasks)
        for s in samples.values():  # tokens before a sample's boundary came from the weights before the update
            s["versions"] = [s.pop("start_version")] * len(s["token_ids"])
            for u in updates:
                counts = {split_request_id(k): v for k, v in (u["inflight_tokens"] or {}).items()}
                boundary = counts[(s["id"], s["index"])]
                s["versions"][boundary:] = [u["version"]] * (len(s["token_ids"]) - boundary)
        return {"samples": list(samples.values()), "updates": updates}


async def main(model_dir: str, host: str, port: int, generator_id: int, cfg: dict) -> None:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from prorl_async.transport.weights.sender import EXTENSION

    args = AsyncEngineArgs(model=model_dir, dtype="float32", enforce_eager=True, max_model_len=512, seed=0,
                           worker_extension_cls=EXTENSION, disable_log_stats=True)
    engine = AsyncLLM.from_engine_args(args)
    gen = Generator(engine, cfg, host, port, generator_id)
    emit("joined", **await gen.join())
    loop = asyncio.get_running_loop()
    try:
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            cmd = json.loads(line)
            if cmd["cmd"] == "generate":
                emit("generated", **await gen.generate(cmd["requests"], cmd.get("update_after"), cmd.get("version")))
            elif cmd["cmd"] == "update":
                emit("updated", **await gen.update(cmd["version"]))
            elif cmd["cmd"] == "rejoin":
                emit("joined", **await gen.join())
            elif cmd["cmd"] == "exit":
                break
    finally:
        engine.shutdown()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), json.loads(sys.argv[5])))
