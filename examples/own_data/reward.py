"""The example's reward: 1 when the number in the answer tag equals the row's ``answer`` column, else 0.

prorl-async calls it in a scoring worker process as ``reward(completion, **row)``: ``completion`` is the sample's
text (the config's ``prefill`` included), and the row's columns arrive as keyword arguments; a function names the
columns it needs and takes the rest as ``**row`` (or leaves them out: only the parameters it declares are passed).

It returns a dict: ``reward`` trains the policy; every other number (here ``formatted``) is only logged, per name,
as a mean over the generator's samples (``reward_extras`` in ``metrics.jsonl``). Returning a plain float works too.
A reward function that raises, hangs or returns no number scores 0, and the run counts why and goes on.
"""

import re

# the closing tag may be missing: the config stops sampling at "</answer>", and vLLM leaves a stop string out
_TAG = re.compile(r"<answer>\s*(.*?)\s*(?:</answer>|$)", re.DOTALL)


def reward(completion: str, answer: str, **row) -> dict[str, float]:
    found = _TAG.search(completion)
    if found is None:
        return {"reward": 0.0, "formatted": 0.0}
    try:
        correct = float(found.group(1)) == float(answer)
    except ValueError:
        correct = False
    return {"reward": float(correct), "formatted": 1.0}
