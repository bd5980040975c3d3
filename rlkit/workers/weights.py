"""The learner's side of weight sync, as functions of (policy, rank, ZeRO stage).

Everything that reads full weights goes through :func:`full_groups`: under ZeRO-3 every rank holds
a shard of each parameter, so the full tensors of a group are gathered from every rank for as long
as the group is in use, and every rank must walk the same groups (the driver calls these on all
ranks together, :func:`rlkit.sync.on_learners`). At ZeRO ≤ 2 rank 0 holds the full weights.

A sync sends *items*: ``(HF name, tensor)`` pairs, or for a LoRA policy the adapters
(:class:`rlkit.workers.lora_sync.LoraDelta`, merged on the rollout side). While each item's bytes
are at hand the learner also takes its checksum (the float64 sum of the full weight the engine must
end up holding), so the driver can check every tensor of every sync against the engine
(:mod:`rlkit.sync`) without a second pass or gather.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator

import torch

from rlkit.workers.lora_sync import LoraDelta, lora_deltas, merged_weight

GROUP_BYTES = 64 * 2**20
"""Bytes gathered at a time under ZeRO-3 (and the default sync bucket)."""


def full_numel(p: torch.Tensor) -> int:
    """Elements of a parameter's full tensor (ZeRO-3 keeps only a shard in ``p``)."""
    return int(getattr(p, "ds_numel", p.numel()))


def full_shape(p: torch.Tensor) -> tuple[int, ...]:
    return tuple(getattr(p, "ds_shape", p.shape))


def weight_bytes(policy: torch.nn.Module) -> int:
    return sum(full_numel(p) * p.element_size() for p in policy.parameters())


def param_elems(policy: torch.nn.Module) -> dict[str, int]:
    """Parameter elements this rank holds, and in the full model (equal unless ZeRO-3)."""
    params = list(policy.parameters())
    return {"local": sum(p.numel() for p in params), "full": sum(full_numel(p) for p in params)}


def is_lora(policy: torch.nn.Module) -> bool:
    return hasattr(policy, "merge_and_unload")


def gathered(params: list[torch.Tensor], zero_stage: int):
    """Full tensors of ``params`` for the ``with`` block (a collective under ZeRO-3)."""
    if zero_stage == 3:
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


def full_groups(policy: torch.nn.Module, zero_stage: int,
                group_bytes: int = GROUP_BYTES) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """The policy's full weights in HF names, in groups of about ``group_bytes``.

    The tensors are valid until the next group is requested (under ZeRO-3 each group is gathered
    from every rank for that long), and every rank must exhaust the iterator."""
    group, size = [], 0
    named = list(policy.named_parameters())
    for i, (name, p) in enumerate(named):
        group.append((name, p))
        size += full_numel(p) * p.element_size()
        if size >= group_bytes or i == len(named) - 1:
            with gathered([q for _, q in group], zero_stage):
                yield [(n, q.detach()) for n, q in group]
            group, size = [], 0


def item_name(item: Any) -> str:
    """Name of a sync item: a (name, tensor) pair or a LoRA delta."""
    return item.name if isinstance(item, LoraDelta) else item[0]


def item_bytes(item: Any) -> int:
    return item.nbytes if isinstance(item, LoraDelta) else item[1].numel() * item[1].element_size()


def tensor_sum(t: torch.Tensor) -> float:
    """The checksum of one weight: its float64 sum, accumulated without a float64 copy."""
    return float(torch.sum(t.detach(), dtype=torch.float64))


def pack(items: Iterable[Any], bucket_bytes: int) -> list[list[Any]]:
    """Sync items in buckets of about ``bucket_bytes``."""
    buckets, cur, size = [], [], 0
    for item in items:
        cur.append(item)
        size += item_bytes(item)
        if size >= bucket_bytes:
            buckets.append(cur)
            cur, size = [], 0
    return buckets + ([cur] if cur else [])


def sync_buckets(policy: torch.nn.Module, zero_stage: int, bucket_bytes: int) -> Iterator[list[Any]]:
    """The items of one sync in buckets: full weights (gathered group by group under ZeRO-3), or a
    LoRA policy's adapters only."""
    if is_lora(policy):
        yield from pack(lora_deltas(policy), bucket_bytes)
    else:
        yield from full_groups(policy, zero_stage, bucket_bytes)


def bucket_sums(policy: torch.nn.Module, bucket: list[Any]) -> dict[str, float]:
    """Checksums of a bucket's weights as the engine must hold them (merged, for LoRA deltas)."""
    deltas = {d.name: d for d in bucket if isinstance(d, LoraDelta)}
    if deltas:
        return {n: tensor_sum(merged_weight(policy, n, deltas)) for n in deltas}
    return {n: tensor_sum(t) for n, t in bucket}


@torch.no_grad()
def object_state(policy: torch.nn.Module, rank: int, zero_stage: int, bucket_bytes: int) -> dict[str, Any]:
    """Rank 0: the sync items put in the Ray object store once per bucket (every rollout worker
    then reads the same objects), with their names, bytes and checksums. No clone: ``ray.put``
    serializes each bucket into the store, which is the one copy (made while the bucket is
    gathered under ZeRO-3)."""
    import ray

    refs, names, sums, nbytes = [], [], {}, 0
    for bucket in sync_buckets(policy, zero_stage, bucket_bytes):
        if rank == 0:
            refs.append(ray.put(bucket))
            names += [item_name(i) for i in bucket]
            nbytes += sum(item_bytes(i) for i in bucket)
            sums.update(bucket_sums(policy, bucket))
    return {"refs": refs, "names": names, "bytes": float(nbytes), "sums": sums}


@torch.no_grad()
def shm_state(policy: torch.nn.Module, rank: int, zero_stage: int, writer_slot: dict, tag: str,
              group_bytes: int = GROUP_BYTES) -> dict[str, Any]:
    """Rank 0, same-node sync: full weights copied into the next shared-memory slot; the writer
    (:class:`rlkit.workers.shm_sync.ShmWriter`) is created on first use and kept in ``writer_slot``."""
    from rlkit.workers.shm_sync import ShmWriter

    named = list(policy.named_parameters())
    meta = [(n, torch.empty(full_shape(p), dtype=p.dtype, device="meta")) for n, p in named]
    sums: dict[str, float] = {}

    def items() -> Iterator[tuple[str, torch.Tensor]]:
        for group in full_groups(policy, zero_stage, group_bytes):
            for name, t in group:
                if rank == 0:
                    sums[name] = tensor_sum(t)
                yield name, t

    if rank != 0:
        for _ in items():  # join every gather
            pass
        return {}
    if writer_slot.get("writer") is None:
        writer_slot["writer"] = ShmWriter(meta, tag)
    writer = writer_slot["writer"]
    segment = writer.write(items())
    return {"segment": segment, "entries": writer.entries, "names": [n for n, _ in named],
            "bytes": float(sum(t.numel() * t.element_size() for _, t in meta)), "sums": sums}


@torch.no_grad()
def checksum(policy: torch.nn.Module, zero_stage: int, names: list[str]) -> dict[str, float]:
    """Checksums of the weights a rollout engine must hold under these HF names."""
    if is_lora(policy):
        deltas = {d.name: d for d in lora_deltas(policy)}
        return {n: tensor_sum(merged_weight(policy, n, deltas)) for n in names}
    state = dict(policy.named_parameters())
    with gathered([state[n] for n in names], zero_stage):
        return {n: tensor_sum(state[n]) for n in names}


@torch.no_grad()
def param_vector(policy: torch.nn.Module, zero_stage: int) -> torch.Tensor:
    """Every full weight, flattened and concatenated (tests compare ranks and runs with it)."""
    return torch.cat([t.flatten().clone() for group in full_groups(policy, zero_stage) for _, t in group])
