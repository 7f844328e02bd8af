"""Prefix sharing: a group's prompt runs once, its n responses attend to that one copy (packed rows).

A GRPO group is one prompt and n responses. Run as n separate sequences, the prompt's tokens go through
the model n times; with prompts ten times longer than responses (few-shot reasoning tasks) that is ~90%
of the learner's compute. Here a micro-batch row holds a *unit*, one prompt followed by the responses
of some samples of its group::

    tokens     p0 p1 p2 | a0 a1 a2 | b0 b1 | pad
    positions   0  1  2 |  3  4  5 |  3  4 |  0
    segment     0  0  0 |  1  1  1 |  2  2 | -1

and a block attention mask lets every token see the earlier tokens of its own segment plus the whole
prompt: response ``a`` never sees ``b``, and each response sees exactly what it would see as a sequence
of its own, at the same positions (explicit ``position_ids``). So each response's log-probs equal the
unshared ones, and since the prompt's keys and values are ordinary activations of the forward, the
gradients of all n responses flow back into the one prompt computation and add up there -- the same
gradient as n copies. The log-prob of response token 0 comes from the prompt's last position (the
gather index repeats for every response of the unit).

This is what expanding a prompt's KV cache over the group does, in one forward call per micro-batch:
no cache object (so gradient checkpointing, which turns the cache off, still works) and every FSDP
module runs once per forward, as in the unshared path.

Invariants:

- a unit never spans groups; a group is split into several units (each with its prompt) only when the
  prompt plus its responses exceed the micro-batch token budget; the first unit takes as many
  responses as fit, in sample order;
- the group structure is given (:class:`prorl_async.learner.batch.GroupBatch`: one prompt per group), never
  recovered by comparing prompts;
- ``share=False`` (or a group of one) gives one unit per sample: rows of one sequence each, collated exactly
  as the unshared learner always did (2-D padding mask, no ``position_ids``);
- ``MicroBatch.rows`` lists the samples in the order of the gathered tokens and of ``resp_mask`` rows.

Packed rows (``learner.attention = "flex_attention"``, :func:`collate_packed`): a micro-batch is one row of
its units back to back, no padding at all, each unit's positions starting at 0::

    tokens     p0 p1 | a0 a1 | q0 q1 q2 | c0
    unit        0  0 |  0  0 |  1  1  1 |  1
    segment     0  0 |  1  1 |  2  2  2 |  3      (a unit's prompt and each response: a segment of their own)
    prompt      0  0 |  0  0 |  2  2  2 |  2      (the segment of the prompt each token may see)

A token sees the earlier tokens of its segment and of its unit's prompt: the same pairs as the rows above,
so the same log-probs and gradients. FlexAttention's block mask skips every 128 x 128 tile no pair in it
may see, so attention costs the allowed pairs (plus partly filled tiles), not the row's square: the dense
mask of a 25k-token row (three 8k responses) spends 5.5x the allowed pairs, and its mask alone is 0.6 GB.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

PACKABLE_ATTENTION = ("sdpa", "eager", "flex_attention")
"""Attention implementations that take an arbitrary mask: a 4-D tensor (sdpa, eager) or a block mask (flex)."""


@dataclass(frozen=True)
class Unit:
    """One micro-batch row: the prompt of ``samples[0]`` then the response of every sample, in order."""

    samples: tuple[int, ...]
    length: int
    """Tokens in the row: the prompt once plus every response."""


@dataclass
class MicroBatch:
    """Rows of units as model inputs, and where the response tokens' predictions are."""

    rows: list[int]  # sample indices, in the order of gather/targets and of resp_mask's rows
    input_ids: torch.Tensor  # (U, L)
    attention_mask: Any  # (U, L) padding mask, (U, 1, L, L) bool block mask, a FlexAttention BlockMask, or None
    position_ids: torch.Tensor | None  # (U, L) with a block mask, else None (0..L-1)
    gather: torch.Tensor  # (N,) flat indices into the (U * L) hidden states predicting each response token
    targets: torch.Tensor  # (N,)
    resp_mask: torch.Tensor  # (R, Tr) bool, R = len(rows)
    weight: float = 1.0  # 0 for a filler that only keeps ranks in step
    units: int = 0


def plan_units(
    prompt_lens: Sequence[int],
    response_lens: Sequence[int],
    *,
    share: bool,
    budget_tokens: int,
) -> list[Unit]:
    """Units covering every sample once, group by group: group g has a prompt of ``prompt_lens[g]`` tokens and
    the samples ``g * n .. g * n + n - 1`` (``n = len(response_lens) // len(prompt_lens)``).

    With ``share`` each group is packed into as few units as the budget allows (at least one response per
    unit); otherwise every sample is a unit of its own.
    """
    n = len(response_lens) // max(len(prompt_lens), 1)
    if not prompt_lens or n * len(prompt_lens) != len(response_lens):
        raise ValueError(f"{len(response_lens)} responses do not split into {len(prompt_lens)} groups")
    units: list[Unit] = []
    for g, p in enumerate(prompt_lens):
        group = range(g * n, (g + 1) * n)
        if not share or n == 1:
            units += [Unit((i,), p + response_lens[i]) for i in group]
            continue
        members: list[int] = []
        length = p
        for i in group:
            if members and length + response_lens[i] > budget_tokens:
                units.append(Unit(tuple(members), length))
                members, length = [], p
            members.append(i)
            length += response_lens[i]
        units.append(Unit(tuple(members), length))
    return units


@dataclass
class _LaidOut:
    """One unit as a run of tokens: its prompt, then each response (see the module doc)."""

    tokens: torch.Tensor
    positions: torch.Tensor  # prompt 0..p-1, every response p..p+n-1
    segment: torch.Tensor  # 0 for the prompt, j + 1 for response j
    gather: torch.Tensor  # indices into the run of the positions predicting each response token
    samples: tuple[int, ...]
    resp_lens: list[int]


def _lay_out(unit: Unit, prompts: Sequence[torch.Tensor], responses: Sequence[torch.Tensor]) -> _LaidOut:
    prompt = prompts[unit.samples[0]]
    p = len(prompt)
    resps = [responses[i] for i in unit.samples]
    lens = [len(r) for r in resps]
    gather: list[torch.Tensor] = []
    offset = p
    for n in lens:
        # Token 0 is predicted by the prompt's last position, token t by the response's position t - 1.
        gather += [torch.tensor([p - 1]), torch.arange(offset, offset + n - 1)]
        offset += n
    return _LaidOut(
        tokens=torch.cat([prompt, *resps]),
        positions=torch.cat([torch.arange(p), *(torch.arange(p, p + n) for n in lens)]),
        segment=torch.cat([torch.zeros(p, dtype=torch.long), *(torch.full((n,), j + 1) for j, n in enumerate(lens))]),
        gather=torch.cat(gather),
        samples=unit.samples,
        resp_lens=lens,
    )


def _response_mask(laid: Sequence[_LaidOut]) -> torch.Tensor:
    """(R, Tr) bool: True at each sample's response tokens, samples in the units' order."""
    lens = torch.tensor([n for x in laid for n in x.resp_lens])
    return torch.arange(int(lens.max()))[None, :] < lens[:, None]


def collate(
    units: Sequence[Unit],
    prompts: Sequence[torch.Tensor],
    responses: Sequence[torch.Tensor],
    device: torch.device,
    weight: float = 1.0,
) -> MicroBatch:
    """Right-padded rows of ``units`` (see the module doc); a block mask only when some unit shares.

    ``prompts[i]`` and ``responses[i]`` are sample i's (a group's samples may hold the same prompt tensor).
    """
    width = max(u.length for u in units)
    laid = [_lay_out(u, prompts, responses) for u in units]
    input_ids = torch.zeros(len(units), width, dtype=torch.long)
    segment = torch.full((len(units), width), -1, dtype=torch.long)  # 0 prompt, j + 1 response j, -1 padding
    positions = torch.zeros(len(units), width, dtype=torch.long)
    for r, x in enumerate(laid):
        length = len(x.tokens)
        input_ids[r, :length] = x.tokens
        segment[r, :length] = x.segment
        positions[r, :length] = x.positions
    rows = [i for x in laid for i in x.samples]
    if any(len(u.samples) > 1 for u in units):
        # Built where it is used: (U, L, L) is 0.6 GB at a 25k-token row, 3 s of two CPU cores and a host copy.
        attention: torch.Tensor | None = block_attention_mask(segment.to(device))
        position_ids: torch.Tensor | None = positions.to(device)
    else:  # one sequence per row: the plain causal path, with a padding mask only when some row is short
        attention = None if min(u.length for u in units) == width else (segment >= 0).long()
        position_ids = None
    return MicroBatch(
        rows=rows,
        input_ids=input_ids.to(device),
        attention_mask=None if attention is None else attention.to(device),
        position_ids=position_ids,
        gather=torch.cat([x.gather + r * width for r, x in enumerate(laid)]).to(device),
        targets=torch.cat([responses[i] for i in rows]).to(device),
        resp_mask=_response_mask(laid).to(device),
        weight=weight,
        units=len(units),
    )


def plan_packed(lengths: Sequence[int], budget_tokens: int) -> list[list[int]]:
    """Unit indices in packed rows of at most ``budget_tokens`` tokens (no padding: a row costs its lengths' sum).

    Longest first into the first row with room (first-fit decreasing); a unit longer than the budget goes alone.
    Deterministic (ties broken by index).
    """
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fit = next((r for r, free in enumerate(room) if lengths[i] <= free), None)
        if fit is None:
            rows.append([i])
            room.append(budget_tokens - lengths[i])
        else:
            rows[fit].append(i)
            room[fit] -= lengths[i]
    return rows


def collate_packed(
    units: Sequence[Unit],
    prompts: Sequence[torch.Tensor],
    responses: Sequence[torch.Tensor],
    device: torch.device,
    weight: float = 1.0,
    *,
    block: bool = True,
) -> MicroBatch:
    """``units`` back to back in one row (the module doc's packed rows) under a FlexAttention block mask, or with
    ``block`` off the same mask dense, (1, 1, L, L) bool, which sdpa and eager attention take (at the row's square
    cost: for tests and short rows)."""
    laid = [_lay_out(u, prompts, responses) for u in units]
    starts = [0]
    heads = [0]  # the segment number of each unit's prompt: units' segments are numbered on, row-wide
    for x in laid:
        starts.append(starts[-1] + len(x.tokens))
        heads.append(heads[-1] + len(x.resp_lens) + 1)
    segment_ids = torch.cat([x.segment + h for x, h in zip(laid, heads, strict=False)]).to(device)
    prompt_ids = torch.cat([torch.full((len(x.tokens),), h) for x, h in zip(laid, heads, strict=False)]).to(device)

    def allowed(b, h, q, k):  # FlexAttention's mask_mod: batch, head, query, key indices
        return (k <= q) & ((segment_ids[k] == segment_ids[q]) | (segment_ids[k] == prompt_ids[q]))

    length = starts[-1]
    if block:
        from torch.nn.attention.flex_attention import create_block_mask

        # Compiled on CUDA, it evaluates the rule tile by tile; uncompiled it would build the L x L mask first.
        mask = create_block_mask(allowed, B=None, H=None, Q_LEN=length, KV_LEN=length, device=device,
                                 _compile=torch.device(device).type == "cuda")
    else:
        idx = torch.arange(length, device=device)
        mask = allowed(0, 0, idx[:, None], idx[None, :])[None, None]
    rows = [i for x in laid for i in x.samples]
    return MicroBatch(
        rows=rows,
        input_ids=torch.cat([x.tokens for x in laid])[None].to(device),
        attention_mask=mask,
        position_ids=torch.cat([x.positions for x in laid])[None].to(device),
        gather=torch.cat([x.gather + s for x, s in zip(laid, starts, strict=False)]).to(device),
        targets=torch.cat([responses[i] for i in rows]).to(device),
        resp_mask=_response_mask(laid).to(device),
        weight=weight,
        units=len(units),
    )


def block_attention_mask(segment: torch.Tensor) -> torch.Tensor:
    """(U, 1, L, L) bool, True where query q may attend key k: k <= q, and k in q's segment or the prompt.

    ``segment`` (U, L): 0 for prompt tokens, j + 1 for response j, -1 for padding. Padding queries see
    earlier padding and the prompt, never a response, and always themselves (no fully masked row, so no
    NaN in softmax); nothing but padding attends to padding.
    """
    length = segment.shape[1]
    idx = torch.arange(length, device=segment.device)
    causal = idx[None, :] <= idx[:, None]  # (L, L): [q, k]
    seg_q, seg_k = segment[:, :, None], segment[:, None, :]
    return (causal & ((seg_q == seg_k) | (seg_k == 0)))[:, None]


def packing_supported(config: object) -> str | None:
    """None when the model's attention honours a custom 4-D mask over full attention; else the reason not."""
    impl = getattr(config, "_attn_implementation", None) or "eager"
    if impl not in PACKABLE_ATTENTION:
        return f"attention implementation {impl!r} does not take a custom 4-D mask"
    layer_types = getattr(config, "layer_types", None) or ()
    sliding = getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
    if sliding or any(t != "full_attention" for t in layer_types):
        return "sliding-window layers would ignore their window under a custom mask"
    return None


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool block mask as the additive float mask that eager attention expects (0 or the dtype's min)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)
