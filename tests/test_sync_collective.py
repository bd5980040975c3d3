"""The collective weight-sync transport over gloo, the CPU twin of its NCCL path (same code).

Pure parts first (the automatic choice, the errors of a forced transport, the wire layout), then
two plain processes broadcasting over a group built from a ``TCPStore``, then real runs: Ray,
DeepSpeed learner ranks on gloo and HF-engine rollout workers receiving into their parameters,
verified by the runtime's per-tensor checksums after every sync.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from rlkit.sync import (
    Placed,
    choose_transport,
    collective_backend,
    transport_error,
)

CPU_A, CPU_B = Placed("a", "cpu"), Placed("b", "cpu")
GPU_0, GPU_1 = Placed("a", "cuda", "GPU-0"), Placed("a", "cuda", "GPU-1")


# ------------------------------------------------------------------ the choice, without Ray
@pytest.mark.parametrize(("learner", "workers", "lora", "zero", "room", "want"), [
    (CPU_A, [CPU_A, CPU_A], False, 2, True, "shm"),          # CPU, one node: one copy through /dev/shm
    (CPU_A, [CPU_A], False, 2, False, "object"),             # no room in /dev/shm
    (CPU_A, [CPU_A], True, 2, True, "object"),               # LoRA adapters on one CPU node
    (CPU_A, [CPU_A, CPU_B], False, 2, True, "collective"),   # across nodes: gloo
    (CPU_A, [CPU_B], True, 2, True, "collective"),
    (GPU_0, [GPU_0, GPU_0], False, 2, True, "ipc"),          # colocated on one GPU
    (GPU_0, [GPU_0], False, 3, True, "collective"),          # ZeRO-3: rank 0 holds a shard only
    (GPU_0, [GPU_0], True, 2, True, "collective"),           # LoRA sends adapters
    (GPU_0, [GPU_1], False, 2, True, "collective"),          # other GPU: NCCL
    (GPU_0, [CPU_A], False, 2, True, "collective"),          # engine on CPU: gloo
])
def test_auto_transport_by_placement(learner, workers, lora, zero, room, want):
    assert choose_transport(learner, workers, lora=lora, zero_stage=zero, shm_room=room) == want


def test_backend_by_device():
    assert collective_backend(GPU_0, [GPU_1]) == "nccl"
    assert collective_backend(GPU_0, [GPU_1, CPU_A]) == "gloo"
    assert collective_backend(CPU_A, [CPU_B]) == "gloo"
    assert collective_backend(CPU_A, [CPU_B], "nccl") == "nccl"


@pytest.mark.parametrize(("name", "learner", "workers", "lora", "zero", "backend", "words"), [
    ("ipc", GPU_0, [Placed("b", "cuda", "GPU-0")], False, 2, "auto", "cannot cross nodes"),
    ("ipc", GPU_0, [GPU_1], False, 2, "auto", "learner rank 0's GPU"),
    ("ipc", CPU_A, [CPU_A], False, 2, "auto", "learner rank 0's GPU"),
    ("ipc", GPU_0, [GPU_0], False, 3, "auto", "ZeRO-3"),
    ("shm", CPU_A, [CPU_B], False, 2, "auto", "learner rank 0's node"),
    ("shm", CPU_A, [CPU_A], True, 2, "auto", "LoRA"),
    ("shm", GPU_0, [GPU_0], False, 2, "auto", "on CPU"),
    ("collective", CPU_A, [CPU_B], False, 2, "nccl", "rollout.sync_backend: nccl needs"),
])
def test_forced_transport_that_cannot_work_names_the_key(name, learner, workers, lora, zero, backend, words):
    why = transport_error(name, learner, workers, lora=lora, zero_stage=zero, backend=backend)
    assert why is not None and words in why
    assert why.startswith("rollout.sync_")


@pytest.mark.parametrize("name", ["object", "collective"])
def test_object_and_gloo_collective_work_anywhere(name):
    assert transport_error(name, CPU_A, [CPU_B, GPU_0], lora=True, zero_stage=3) is None


def test_config_accepts_every_transport_and_rejects_others():
    from rlkit.config import ConfigError, load_config

    for name in ("auto", "shm", "object", "collective"):
        assert load_config(None, [f"rollout.sync_transport={name}"]).rollout.sync_transport == name
    # ipc only where the placement puts every engine on learner rank 0's one GPU (rlkit.placement).
    gpu = ["resources.learner_gpus=0.5", "resources.rollout_gpus=0.5"]
    assert load_config(None, ["rollout.sync_transport=ipc", *gpu]).rollout.sync_transport == "ipc"
    with pytest.raises(ConfigError, match="key 'rollout.sync_transport': ipc needs every engine"):
        load_config(None, ["rollout.sync_transport=ipc"])
    with pytest.raises(ConfigError, match="key 'rollout.sync_backend': nccl needs"):
        load_config(None, ["rollout.sync_backend=nccl"])
    with pytest.raises(ConfigError, match="rollout.sync_transport"):
        load_config(None, ["rollout.sync_transport=nccl"])
    with pytest.raises(ConfigError, match="rollout.sync_backend"):
        load_config(None, ["rollout.sync_backend=mpi"])


def test_wire_layout_matches_the_sent_buckets():
    """The layout the receivers get before the bytes is exactly what the sender's buckets hold."""
    from rlkit.workers import weights

    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4, bias=False))
    model[1].to(torch.bfloat16)
    layout = weights.wire_layout(model, bucket_bytes=400)
    sent = list(weights.sync_buckets(model, 0, 400))
    assert [[w.name for w in b] for b in layout] == [[n for n, _ in b] for b in sent]
    assert [[(w.shape, w.torch_dtype, w.nbytes) for w in b] for b in layout] == \
        [[(tuple(t.shape), t.dtype, t.numel() * t.element_size()) for _, t in b] for b in sent]
    assert len(layout) > 1  # 400-byte buckets split the 8×16 fp32 weight from the rest


def test_wire_layout_of_lora_sends_factors_only():
    peft = pytest.importorskip("peft")
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlkit.workers import weights

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    model = peft.get_peft_model(LlamaForCausalLM(cfg), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    (w_a, w_b), = weights.wire_layout(model, 1 << 20)
    assert (w_a.part, w_b.part) == ("lora_A", "lora_B")
    assert w_a.name == w_b.name == "model.layers.0.self_attn.q_proj.weight"
    assert (w_a.shape, w_b.shape, w_a.scaling) == ((2, 32), (32, 2), 2.0)


# ------------------------------------------------------------------ two plain processes over gloo
def _member(rank: int, world: int, port: int, tag: str, out) -> None:
    from rlkit.sync import broadcast, join_group

    group = join_group("127.0.0.1", port, tag, rank, world, "gloo")
    got = [torch.zeros(3, 4), torch.zeros(5, dtype=torch.bfloat16), torch.zeros((), dtype=torch.int64)]
    broadcast(group, got)
    out.put([t.tolist() for t in got])


def test_broadcast_over_a_group_of_its_own():
    """Rank 0 sends fp32, bf16 and a 0-d int64 tensor as raw bytes to two receivers; the group is
    built from the store directly, so torch.distributed's default group stays uninitialized."""
    import multiprocessing as mp

    import torch.distributed as dist

    from rlkit.sync import broadcast, join_group, open_store

    store = open_store("127.0.0.1")
    tag = "t_broadcast"
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_member, args=(r, 3, store.port, tag, out)) for r in (1, 2)]
    for p in procs:
        p.start()
    group = join_group("127.0.0.1", store.port, tag, 0, 3, "gloo", store=store)
    sent = [torch.arange(12.0).view(3, 4), torch.tensor([1.5, -2, 3, 0.25, 7], dtype=torch.bfloat16),
            torch.tensor(2**40)]
    broadcast(group, sent)
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert all(r == [t.tolist() for t in sent] for r in results)
    assert not dist.is_initialized()


# ------------------------------------------------------------------ real runs: Ray, DeepSpeed, HF engines
ray = pytest.importorskip("ray")
TOY_REWARD = str(Path(__file__).parent / "toy_rewards.py") + ":letter_a"


def _config(tmp_path: Path, model_dir: Path, **over):
    from rlkit.config import load_config

    overrides = [
        f"run_dir={tmp_path / 'run'}", f"model.path={model_dir}", "data.kind=arithmetic",
        "data.num_train=32", "data.num_eval=4", f"rewards.rewards=[{{name: '{TOY_REWARD}'}}]",
        "rollout.max_new_tokens=6", "rollout.threads=1", "learner.threads=1", "learner.num_ranks=2",
        "learner.micro_batch_size=4", "learner.lr=1.0e-3", "train.prompts_per_step=2",
        "train.samples_per_prompt=4", "train.steps=2", "eval.num_problems=0", "progress=false",
        "report_to=[]", "algorithm.name=grpo", "rollout.num_workers=2", "rollout.sync_transport=collective",
    ]
    return load_config(None, overrides + [f"{k}={v}" for k, v in over.items()])


@pytest.fixture(scope="module")
def ray_session():
    pytest.importorskip("deepspeed")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 * 2**20)
    yield
    ray.shutdown()


def _run(cfg):
    from rlkit.runtime import Runtime
    from rlkit.trainer import Trainer, model_dir

    return Trainer(cfg, runtime=Runtime(cfg, model_dir(cfg)))


def _kill(rt) -> None:
    for a in rt.learners + rt.rollout + [rt.reward]:
        ray.kill(a)


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_collective_sync_trains_and_every_engine_holds_the_weights(ray_session, tmp_path, tiny_llama_dir, zero_stage):
    """Two learner ranks (ZeRO-2, or ZeRO-3 gathering group by group), two HF engines: every sync is
    a gloo broadcast into the engines' parameters, checked tensor by tensor; the engines sample
    from the policy the learner scores (gap ≈ 0), a worker left out of a sync is caught, and the
    object store agrees with what the collective delivered."""
    from rlkit.metrics import StageTimer
    from rlkit.runtime import SyncError

    trainer = _run(_config(tmp_path, tiny_llama_dir, **{"learner.zero_stage": zero_stage}))
    rt = trainer.runtime
    try:
        first = rt.sync(bucket_bytes=256 * 1024)  # several buckets
        assert rt.weight_sync.transport.name == "collective" and rt.weight_sync.transport.backend == "gloo"
        before = rt.on_learners("param_vector")
        assert first["sync/bytes"] == pytest.approx(4 * before.numel(), rel=0.01)
        timer = StageTimer()
        metrics = [trainer.step(timer) for _ in range(2)]
        after = rt.on_learners("param_vector")
        assert not torch.equal(before, after)
        for m in metrics:
            assert m["gap/kl"] < 1e-4, m  # the engines generate with the weights just broadcast
        names = rt.on_learners("full_state", 1 << 30)["names"]
        want = rt.on_learners("checksum", names)
        for w in rt.rollout:
            got = ray.get(w.checksum.remote(names))
            assert got["version"] == rt.version == 2
            assert all(got["sums"][n] == pytest.approx(want[n], rel=1e-6, abs=1e-6) for n in names)
        rt.learn(None, {})
        with pytest.raises(SyncError, match="rollout worker 1 holds policy version 2"):
            rt.sync(skip=(1,))
        rt.sync()  # the group survives a skipped member; every worker is current again
        rt.sync(transport="object")
        assert rt.weight_sync.transport.name == "collective"
        rt.sync()
    finally:
        _kill(rt)


def test_collective_sync_of_lora_sends_adapters_only(ray_session, tmp_path, tiny_llama_dir):
    from rlkit.metrics import StageTimer

    cfg = _config(tmp_path, tiny_llama_dir, **{"learner.lora.enabled": "true", "learner.lora.r": 4,
                                               "learner.lora.alpha": 8, "learner.num_ranks": 1,
                                               "rollout.num_workers": 1})
    trainer = _run(cfg)
    rt = trainer.runtime
    try:
        full = 4 * ray.get(rt.learners[0].param_elems.remote())["full"]
        m = [trainer.step(StageTimer()) for _ in range(2)][-1]
        assert rt.weight_sync.transport.name == "collective"
        assert 0 < m["sync/bytes"] < 0.1 * full, (m["sync/bytes"], full)
        assert m["gap/kl"] < 1e-4, m  # merged on the engine side exactly as PEFT merges
    finally:
        _kill(rt)


def test_forced_transport_that_cannot_work_fails_at_start(ray_session, tmp_path, tiny_llama_dir):
    from rlkit.placement import PlacementError

    cfg = _config(tmp_path, tiny_llama_dir, **{"learner.num_ranks": 1, "rollout.num_workers": 1})
    # Config validation refuses ipc without GPU requests; set after it, the start-up check against
    # the live cluster refuses it before any actor starts (transport_error covers the first sync).
    cfg.rollout.sync_transport = "ipc"
    with pytest.raises(PlacementError, match="key 'rollout.sync_transport': ipc needs every engine on learner rank 0's"):
        _run(cfg)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_ipc_transport_between_two_processes_on_one_gpu(tmp_path, tiny_llama_dir):
    """The IPC transport for real: learner-side ``weights.ipc_state`` of a CUDA policy in this
    process, ``RolloutWorker.load_ipc`` in a spawned process on the same GPU; every tensor's
    checksum on the engine equals the learner's, and the bytes are the full fp32 weights."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from transformers import AutoModelForCausalLM

    from bench.gpu_check import ipc_transfer

    res = ipc_transfer(tiny_llama_dir, "cuda")
    assert res["transport"] == "ipc" and res["checksums_match"], res
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    assert res["bytes"] == 4 * sum(p.numel() for p in model.parameters())


def test_store_bucket_travels_out_of_band_and_comes_back_equal():
    """A weight bucket in the object store pickles each tensor's bytes out of band (protocol 5:
    Ray stores them without a copy and readers get views), and reads back as the same tensors,
    bf16 included."""
    import pickle

    from rlkit.workers.weights import StoreBucket

    g = torch.Generator().manual_seed(0)
    pairs = [("a.weight", torch.randn(3, 5, generator=g)), ("b.bias", torch.randn(7, generator=g).bfloat16()),
             ("c.scalar", torch.tensor(2.5))]
    buffers: list = []
    blob = pickle.dumps(StoreBucket(pairs), protocol=5, buffer_callback=buffers.append)
    assert len(buffers) == len(pairs) and len(blob) < 1000  # the bytes are not in the pickle stream
    back = pickle.loads(blob, buffers=buffers)
    assert [n for n, _ in back] == [n for n, _ in pairs]
    for (_, want), (_, got) in zip(pairs, back):
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)


def test_object_store_sync_leaves_the_stored_bytes_unchanged(ray_session, tmp_path, tiny_llama_dir):
    """The zero-copy read is safe: after an engine loaded every bucket (views of the store's memory),
    the store still holds exactly the learner's bytes, and the engine holds the learner's weights."""
    from rlkit.workers.weights import tensor_sum

    trainer = _run(_config(tmp_path, tiny_llama_dir, **{"learner.num_ranks": 1, "rollout.num_workers": 1,
                                                        "rollout.sync_transport": "object"}))
    rt = trainer.runtime
    try:
        state = rt.on_learners("full_state", 64 * 1024)
        assert len(state["refs"]) > 2
        ray.get(rt.rollout[0].load_buckets.remote(5, state["refs"]))
        got = ray.get(rt.rollout[0].checksum.remote(state["names"]))
        assert got["version"] == 5
        assert all(got["sums"][n] == pytest.approx(state["sums"][n], rel=1e-6, abs=1e-6) for n in state["names"])
        stored = [item for ref in state["refs"] for item in ray.get(ref)]
        assert [n for n, _ in stored] == state["names"]
        assert all(tensor_sum(t) == state["sums"][n] for n, t in stored)
    finally:
        _kill(rt)
