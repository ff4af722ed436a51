"""Every benchmark still runs at its small CPU shape and prints the side-by-side fields its claims rest on.

Not a timing test: the figures are not compared with any threshold, only checked to be present and finite, so a
benchmark cannot rot unnoticed when the code it measures changes.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
FIELDS = {
    "train_step.py": ["fdivctl_tokens_per_s", "trl_tokens_per_s", "tokens_per_s_ratio_vs_trl",
                      "peak_memory_ratio_vs_trl", "k3_tokens_per_s_ratio_vs_trl"],
    "distill_step.py": ["fdivctl_tokens_per_s", "trl_tokens_per_s", "tokens_per_s_ratio", "peak_memory_ratio",
                        "tokens_per_s_ratio_vs_trl_chunked"],
    "loss_engine.py": ["naive_s", "engine_s", "time_ratio", "memory_ratio", "gemm_floor_s", "gemm_floor_vs_engine",
                       "matmul_ceiling_tflops", "engine_ceiling_fraction"],
    "teacher_logits.py": ["store_tokens_per_s", "bare_tokens_per_s", "throughput_ratio", "bytes_per_token"],
    "length_grouping.py": ["random_tokens_per_s", "grouped_tokens_per_s", "tokens_per_s_ratio",
                           "grouped_padding_ratio"],
    "topk_summary.py": ["matmul_ms", "summary_torch_ms", "summary_torch_vs_matmul"],
    "chunk_launches.py": ["launches_per_chunk", "ops_per_chunk", "host_syncs_per_step"],
    "attention_mask.py": ["masked_ms", "fdivctl_ms", "speedup", "padding_ratio"],
    "attention_backend.py": ["first_seen_ratio", "seen_ratio"],
    "chunk_kernels.py": ["stats_ms", "grad_ms", "stats_gb_per_s", "grad_gb_per_s", "stats_vs_grad_bandwidth",
                         "stats_max_diff", "grad_max_diff"],
    "logits_epilogue.py": ["cublas_ms", "cublas_stats_ms", "epilogue_ms", "epilogue_vs_cublas", "max_lse_diff",
                           "pointer_ms", "tma_ms"],
}


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(FIELDS))
def test_benchmark_runs_at_its_quick_shape(script, tmp_path):
    profiled = ("train_step.py", "teacher_logits.py")
    profile = ["--profile", str(tmp_path / "profile.txt")] if script in profiled else []
    done = subprocess.run([sys.executable, str(BENCH / script), "--quick", *profile], capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert records, done.stdout[-2000:]
    for record in records:
        for field in FIELDS[script]:
            assert field in record and math.isfinite(record[field]), (script, field, record)
        if script == "train_step.py":  # TRL's trainer path, and one operator table per variant, where its time goes
            assert record["trl_path"].startswith("GRPOTrainer")
            tables = (tmp_path / "profile.txt").read_text()
            assert all(f"== {name}, shape" in tables for name in ("fdivctl", "naive")) and "aten::mm" in tables
        if script == "logits_epilogue.py":  # the epilogue's log-partitions are the rows' logsumexp (fp32 here)
            assert record["max_lse_diff"] <= 1e-4 and record["max_logit_diff"] <= 1e-4
        if script == "attention_mask.py" and record["mode"] == "score":  # no mask, the same hidden states
            assert record["max_abs_diff"] <= 1e-5
        if script == "teacher_logits.py":  # the phases split the store's time, with none negative
            phases = record["store_phases_s"]
            assert min(phases.values()) >= 0 and sum(phases.values()) == pytest.approx(record["store_s"], rel=0.05)
            # each batch after the first, for the store and the bare forward (several batches at the quick shape)
            assert record["store_batch_ms"] and record["bare_batch_ms"]
            assert min(record["store_batch_ms"] + record["bare_batch_ms"]) >= 0
            tables = (tmp_path / "profile.txt").read_text()  # the store's and the bare forward's operator tables
            assert tables.index("== store, k 16, bf16 ==") < tables.index("== bare forward ==")
            assert tables.count("aten::mm") >= 2


@pytest.mark.slow
def test_train_step_with_the_policys_layers_recomputed():
    """``--grad-checkpointing`` (GRPOConfig's default) runs every variant on the checkpointed policy and says so."""
    done = subprocess.run([sys.executable, str(BENCH / "train_step.py"), "--quick", "--repeats", "1",
                           "--grad-checkpointing"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(done.stdout.splitlines()[-1])
    assert record["grad_checkpointing"] is True
    for field in FIELDS["train_step.py"]:
        assert math.isfinite(record[field]), (field, record)
