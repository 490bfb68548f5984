"""Profiles: gpt2_common.trace's reading of made-up traces (the GPU's shape included, which CI cannot record),
gpt2_jax.hlo's classification of a made-up module, and scripts/profile_step.py itself on the tiny config for both
frameworks."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpt2_common.trace import kernel_events, summarize
from gpt2_jax.hlo import hlo_kinds

ROOT = Path(__file__).resolve().parent.parent

HLO = """HloModule jit_train_step

%fused_computation (param_0: bf16[8,16], param_1: bf16[16,4]) -> bf16[8,4] {
  %param_0 = bf16[8,16]{1,0} parameter(0)
  %param_1 = bf16[16,4]{1,0} parameter(1)
  %dot.1 = bf16[8,4]{1,0} dot(%param_0, %param_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT %add.2 = bf16[8,4]{1,0} add(%dot.1, %dot.1)
}

%region_sum (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %add.3 = f32[] add(%a, %b)
}

%fused_computation.1 (param_0.1: f32[8,4]) -> f32[8] {
  %param_0.1 = f32[8,4]{1,0} parameter(0)
  %constant.1 = f32[] constant(0)
  ROOT %reduce.1 = f32[8]{0} reduce(%param_0.1, %constant.1), dimensions={1}, to_apply=%region_sum
}

%fused_computation.2 (param_0.2: f32[8,4]) -> f32[8,4] {
  %param_0.2 = f32[8,4]{1,0} parameter(0)
  ROOT %tanh.1 = f32[8,4]{1,0} tanh(%param_0.2)
}

ENTRY %main (x: bf16[8,16], w: bf16[16,4]) -> (f32[8], bf16[8,4]) {
  %x = bf16[8,16]{1,0} parameter(0)
  %w = bf16[16,4]{1,0} parameter(1)
  %gemm_fusion = bf16[8,4]{1,0} fusion(%x, %w), kind=kCustom, calls=%fused_computation
  %attn = (bf16[8,4]{1,0}, u8[0]{0}) custom-call(%x, %w), custom_call_target="__cudnn$fmhaSoftmax"
  %convert = f32[8,4]{1,0} convert(%gemm_fusion)
  %loop_tanh_fusion = f32[8,4]{1,0} fusion(%convert), kind=kLoop, calls=%fused_computation.2
  %input_reduce_fusion = f32[8]{0} fusion(%loop_tanh_fusion), kind=kInput, calls=%fused_computation.1
  ROOT %tuple = (f32[8]{0}, bf16[8,4]{1,0}) tuple(%input_reduce_fusion, %gemm_fusion)
}
"""


def test_hlo_instructions_take_the_kind_of_what_they_compute():
    kinds = hlo_kinds(HLO)
    assert kinds["gemm_fusion"] == "matmul"  # a fusion around a dot is a matmul
    assert kinds["attn"] == "attention"
    assert kinds["input_reduce_fusion"] == "reduction"
    assert kinds["loop_tanh_fusion"] == "elementwise"
    assert kinds["convert"] == "elementwise"


def gpu_trace():
    """The shape of a JAX GPU trace: kernels on a stream, and a derived "XLA Ops" line over the same time."""
    meta = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
            {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "pid": 2, "tid": 7, "name": "thread_name", "args": {"name": "Stream #7(Compute)"}},
            {"ph": "M", "pid": 2, "tid": 9, "name": "thread_name", "args": {"name": "XLA Ops"}}]
    kernels = [
        {"ph": "X", "pid": 2, "tid": 7, "ts": 0, "dur": 3000, "name": "sm90_xmma_gemm_bf16", "args": {"hlo_op": "gemm_fusion"}},
        {"ph": "X", "pid": 2, "tid": 7, "ts": 3000, "dur": 1000, "name": "cudnn_fmha_fwd", "args": {"hlo_op": "attn"}},
        {"ph": "X", "pid": 2, "tid": 7, "ts": 4000, "dur": 500, "name": "input_reduce_fusion",
         "args": {"hlo_op": "input_reduce_fusion"}},
        {"ph": "X", "pid": 2, "tid": 7, "ts": 4500, "dur": 500, "name": "loop_tanh_fusion",
         "args": {"hlo_op": "loop_tanh_fusion"}},
    ]
    derived = [{"ph": "X", "pid": 2, "tid": 9, "ts": 0, "dur": 5000, "name": "everything", "args": {"hlo_op": "x"}},
               {"ph": "X", "pid": 1, "tid": 1, "ts": 0, "dur": 8000, "name": "python", "args": {}}]
    return meta + kernels + derived


def test_a_gpu_trace_is_read_from_its_streams_and_summed_by_kind_per_step():
    kernels = kernel_events(gpu_trace())
    assert [k["name"] for k in kernels] == ["sm90_xmma_gemm_bf16", "cudnn_fmha_fwd", "input_reduce_fusion",
                                           "loop_tanh_fusion"]
    summary = summarize(kernels, steps=2, wall_s=0.004, kinds_by_op=hlo_kinds(HLO))
    assert summary["kinds"] == {"matmul": 1.5, "attention": 0.5, "elementwise": 0.25, "reduction": 0.25}
    assert summary["device_ms_per_step"] == 2.5 and summary["busy"] == pytest.approx(2.5 / 2.0)
    assert summary["kernels"][0] == {"name": "sm90_xmma_gemm_bf16", "kind": "matmul", "calls_per_step": 0.5,
                                     "ms_per_step": 1.5}


def test_nested_host_operators_count_their_self_time_once():
    ops = [{"ph": "X", "pid": 1, "tid": 1, "ts": 0, "dur": 100, "name": "aten::linear", "cat": "cpu_op"},
           {"ph": "X", "pid": 1, "tid": 1, "ts": 10, "dur": 80, "name": "aten::addmm", "cat": "cpu_op"},
           {"ph": "X", "pid": 1, "tid": 1, "ts": 20, "dur": 10, "name": "aten::copy_", "cat": "cpu_op"},
           {"ph": "X", "pid": 1, "tid": 1, "ts": 200, "dur": 50, "name": "aten::gelu", "cat": "cpu_op"}]
    selfs = {e["name"]: e["dur"] for e in kernel_events(ops)}
    assert selfs == {"aten::linear": 20, "aten::addmm": 70, "aten::copy_": 10, "aten::gelu": 50}


@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_profile_step_sums_the_step_by_kind(tmp_path, framework):
    out, hlo = tmp_path / "profile.json", tmp_path / "step.hlo.txt"
    env = {**os.environ, "XLA_FLAGS": "", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "profile_step.py"), "--config", "tiny",
                           "--framework", framework, "--steps", "1", "--warmup", "1", "--top", "5", "--json", str(out),
                           *(["--hlo", str(hlo)] if framework == "jax" else [])],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    summary = json.loads(out.read_text())
    assert summary["framework"] == framework and summary["device"] == "cpu"
    assert sum(summary["kinds"].values()) == pytest.approx(summary["device_ms_per_step"])
    # Shares of the time are the machine's and its load's to decide; that the step's matmuls are found is not.
    assert summary["kinds"]["matmul"] > 0
    # busy may exceed 1 (XLA runs a CPU program on several threads at once): only its presence is the script's
    assert isinstance(summary["busy"], float) and summary["busy"] > 0 and len(summary["kernels"]) == 5
    assert "kind" in done.stdout and "ms/step" in done.stdout
    if framework == "jax":  # the kernels' fusions, kept for reading offline
        assert hlo.read_text().startswith("HloModule") and "fusion" in hlo.read_text()


def test_without_stream_lines_the_derived_lines_are_left_out():
    renamed = [dict(e, args={"name": "Compute"}) if e.get("name") == "thread_name" and e.get("tid") == 7 else e
               for e in gpu_trace()]
    assert [k["name"] for k in kernel_events(renamed)] == ["sm90_xmma_gemm_bf16", "cudnn_fmha_fwd",
                                                          "input_reduce_fusion", "loop_tanh_fusion"]
