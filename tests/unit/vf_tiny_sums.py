"""A tiny single-turn verifiers taskset: add two numbers."""
from collections.abc import Iterable

import verifiers.v1 as vf


class SumData(vf.TaskData):
    answer: int = 0


class SumConfig(vf.TasksetConfig):
    count: int = 6


class SumTask(vf.Task[SumData, vf.State, vf.TaskConfig]):
    @vf.reward
    async def correct(self, trace) -> float:
        return float(trace.last_reply.strip().endswith(str(self.data.answer)))

    @vf.metric
    async def length(self, trace) -> float:
        return float(len(trace.last_reply))


class SumTaskset(vf.Taskset[SumTask, SumConfig]):
    def load(self) -> Iterable[SumTask]:
        for i in range(self.config.count):
            yield SumTask(SumData(prompt=f"What is {i} + {i + 1}?", system_prompt="Answer with a number.",
                                  answer=2 * i + 1), self.config.task)


__all__ = ["SumTaskset"]
