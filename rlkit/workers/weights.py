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

Per transport: :func:`object_state` (Ray object store), :func:`shm_state` (shared memory),
:func:`collective_send` (a broadcast over the sync group, whose layout :func:`wire_layout` gives
the receivers first) and :func:`ipc_state` (CUDA IPC handles).
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


def param_groups(policy: torch.nn.Module, group_bytes: int) -> list[list[tuple[str, torch.Tensor]]]:
    """The policy's named parameters in groups of about ``group_bytes`` of full weights: the units
    that :func:`full_groups` gathers and a collective sync sends (no data is read)."""
    groups, group, size = [], [], 0
    for name, p in policy.named_parameters():
        group.append((name, p))
        size += full_numel(p) * p.element_size()
        if size >= group_bytes:
            groups.append(group)
            group, size = [], 0
    return groups + ([group] if group else [])


def full_groups(policy: torch.nn.Module, zero_stage: int,
                group_bytes: int = GROUP_BYTES) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """The policy's full weights in HF names, in groups of about ``group_bytes``.

    The tensors are valid until the next group is requested (under ZeRO-3 each group is gathered
    from every rank for that long), and every rank must exhaust the iterator."""
    for group in param_groups(policy, group_bytes):
        with gathered([q for _, q in group], zero_stage):
            yield [(n, q.detach()) for n, q in group]


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


class StoreBucket(list):
    """A bucket of ``(name, tensor)`` pairs as it travels through the Ray object store: each tensor
    is pickled as a flat byte array (NumPy, which Ray stores out of band and hands every reader as
    a read-only view of the store's shared memory: no deserialization copy), and comes back as a
    tensor over those bytes. This is the one zero-copy path between rlkit's actors, and it is safe:
    the learner's bytes are copied into the store by ``ray.put`` (nothing later writes the
    learner's tensors into it), and the engine only reads the views (``copy_`` into its own
    parameters, :meth:`rlkit.workers.hf_engine.HFEngine.load_weights`). Everything else that
    crosses actors is copied (Ray's default for torch tensors; rlkit does not turn on
    ``RAY_ENABLE_ZERO_COPY_TORCH_TENSORS``). ``tests/test_sync_collective.py`` checks the store's
    bytes are unchanged after engines loaded them. LoRA deltas are pickled as they are."""

    def __reduce__(self):
        pairs = [(n, str(t.dtype).removeprefix("torch."), tuple(t.shape),
                  t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()) for n, t in self]
        return _store_bucket_pairs, (pairs,)


def _store_bucket_pairs(pairs: list) -> list[tuple[str, torch.Tensor]]:
    """The reader's side of :class:`StoreBucket`: tensors over the (read-only) stored bytes."""
    import warnings

    out = []
    with warnings.catch_warnings():
        # The views are read-only by contract (see StoreBucket); torch warns on any such array.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for name, dtype, shape, raw in pairs:
            out.append((name, torch.from_numpy(raw).view(getattr(torch, dtype)).view(shape)))
    return out


@torch.no_grad()
def object_state(policy: torch.nn.Module, rank: int, zero_stage: int, bucket_bytes: int) -> dict[str, Any]:
    """Rank 0: the sync items put in the Ray object store once per bucket (every rollout worker
    then reads the same objects), with their names, bytes and checksums. No clone: ``ray.put``
    serializes each bucket into the store, which is the one copy (made while the bucket is
    gathered under ZeRO-3); readers get views of it (:class:`StoreBucket`)."""
    import ray

    refs, names, sums, nbytes = [], [], {}, 0
    for bucket in sync_buckets(policy, zero_stage, bucket_bytes):
        if rank == 0:
            lora = any(isinstance(i, LoraDelta) for i in bucket)
            refs.append(ray.put(bucket if lora else StoreBucket(bucket)))
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


# ---------------------------------------------------------------------- collective and IPC
def sync_place(policy: torch.nn.Module) -> dict[str, Any]:
    """This rank's node, device and GPU UUID (:class:`rlkit.sync.Placed`)."""
    return device_place(next(policy.parameters()).device)


def device_place(device: torch.device) -> dict[str, Any]:
    """Node, device kind and (on CUDA) the physical GPU's UUID of ``device`` in this process."""
    import ray

    gpu = str(torch.cuda.get_device_properties(device).uuid) if device.type == "cuda" else None
    return {"node": ray.get_runtime_context().get_node_id(), "device": device.type, "gpu": gpu}


def wire_layout(policy: torch.nn.Module, bucket_bytes: int) -> list[list[Any]]:
    """What :func:`collective_send` will broadcast, bucket by bucket, without the bytes: full
    weights by shape (nothing is gathered under ZeRO-3), or a LoRA policy's two factors per adapter."""
    from rlkit.sync import WireTensor

    if is_lora(policy):
        return [[WireTensor(d.name, tuple(t.shape), _dtype_name(t), part, d.scaling, d.fan_in_fan_out)
                 for d in bucket for part, t in (("lora_A", d.A), ("lora_B", d.B))]
                for bucket in pack(lora_deltas(policy), bucket_bytes)]
    return [[WireTensor(n, full_shape(p), _dtype_name(p)) for n, p in group]
            for group in param_groups(policy, bucket_bytes)]


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def wire_tensors(item: Any) -> list[torch.Tensor]:
    """The tensors of one sync item in :func:`wire_layout`'s order."""
    return [item.A, item.B] if isinstance(item, LoraDelta) else [item[1]]


@torch.no_grad()
def collective_send(policy: torch.nn.Module, rank: int, zero_stage: int, group: Any,
                    bucket_bytes: int) -> dict[str, Any]:
    """Rank 0 broadcasts the sync items bucket by bucket over the sync group (:func:`rlkit.sync.
    broadcast`), in :func:`wire_layout`'s order, and takes each weight's checksum meanwhile. Under
    ZeRO-3 the other ranks only join the gathers."""
    from rlkit.sync import broadcast

    names, sums, nbytes = [], {}, 0
    for bucket in sync_buckets(policy, zero_stage, bucket_bytes):
        if rank != 0:
            continue
        # A gloo group sends from host memory: tensors on a GPU are staged there (NCCL sends in place).
        broadcast(group, [t.contiguous().to(group.device) for item in bucket for t in wire_tensors(item)])
        names += [item_name(i) for i in bucket]
        nbytes += sum(item_bytes(i) for i in bucket)
        sums.update(bucket_sums(policy, bucket))
    return {"names": names, "bytes": float(nbytes), "sums": sums}


@torch.no_grad()
def ipc_state(policy: torch.nn.Module, zero_stage: int, bucket_bytes: int) -> dict[str, Any]:
    """Rank 0, engines on its GPU: a CUDA IPC handle of every weight (``torch.multiprocessing``'s
    reduction, which shares the parameter's memory as it is, no copy), bucket by bucket, with names,
    bytes and checksums. The engines copy from them before the driver lets training go on."""
    from torch.multiprocessing.reductions import reduce_tensor

    if zero_stage == 3 or is_lora(policy):
        raise ValueError("rollout.sync_transport: ipc shares rank 0's full weights: not with LoRA or ZeRO-3")
    buckets, names, sums, nbytes = [], [], {}, 0
    for group in full_groups(policy, zero_stage, bucket_bytes):
        if any(t.device.type != "cuda" for _, t in group):
            raise ValueError("rollout.sync_transport: ipc needs the learner's weights on CUDA")
        buckets.append([(n, reduce_tensor(t)) for n, t in group])
        names += [n for n, _ in group]
        nbytes += sum(t.numel() * t.element_size() for _, t in group)
        sums.update({n: tensor_sum(t) for n, t in group})
    return {"buckets": buckets, "names": names, "bytes": float(nbytes), "sums": sums}


def open_group(slot: dict, tag: str, world: int, backend: str) -> tuple[str, int]:
    """Rank 0: host the rendezvous store of sync group ``tag`` on a free port of this node; the
    group itself is joined by :func:`join_opened`, while the rollout workers join theirs."""
    import ray

    from rlkit.sync import open_store

    host = ray.util.get_node_ip_address()
    store = open_store(host)
    slot[tag] = (host, store, world, backend)
    return host, int(store.port)


def join_opened(slot: dict, tag: str) -> None:
    from rlkit.sync import join_group

    host, store, world, backend = slot[tag]
    slot[tag] = join_group(host, 0, tag, 0, world, backend, store=store)


def send_on_group(policy: torch.nn.Module, rank: int, zero_stage: int, slot: dict, tag: str,
                  bucket_bytes: int) -> dict[str, Any]:
    """:func:`collective_send` on group ``tag`` (rank 0 holds it; other ZeRO-3 ranks only gather)."""
    return collective_send(policy, rank, zero_stage, slot.get(tag), bucket_bytes)
