"""gpt2_jax.hlo.collectives: reading collectives, their groups and their runs a step from HLO text (a made-up module
with the spellings XLA uses), and scripts/collectives.py itself on tiny over 8 simulated devices."""

import json
import subprocess
import sys
from pathlib import Path

from gpt2_jax.hlo import collectives

ROOT = Path(__file__).resolve().parent.parent

HLO = """HloModule jit_train_step

%add (a: f32[], b: f32[]) -> f32[] {
  ROOT %sum = f32[] add(f32[] %a, f32[] %b)
}

%chunk_body (p: (s32[], f32[8,4])) -> (s32[], f32[8,4]) {
  %ar.chunk = f32[8,4]{1,0} all-reduce(f32[8,4]{1,0} %x), channel_id=3, replica_groups=[4,2]<=[8], to_apply=%add
  ROOT %t = (s32[], f32[8,4]) tuple(%i, %ar.chunk)
}

%chunk_cond (p: (s32[], f32[8,4])) -> pred[] {
  ROOT %lt = pred[] compare(s32[] %i, s32[] %n), direction=LT
}

%micro_body (p: (s32[], f32[16])) -> (s32[], f32[16]) {
  %ag = bf16[16,32]{1,0} all-gather(bf16[2,32]{1,0} %w), channel_id=2, replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}
  %loop = (s32[], f32[8,4]) while(%init), condition=%chunk_cond, body=%chunk_body, backend_config={"known_trip_count":{"n":"3"}}
  ROOT %t = (s32[], f32[16]) tuple(%i, %g)
}

%micro_cond (p: (s32[], f32[16])) -> pred[] {
  ROOT %lt = pred[] compare(s32[] %i, s32[] %n), direction=LT
}

ENTRY %main (param: f32[16]) -> f32[16] {
  %steps = (s32[], f32[16]) while(%init), condition=%micro_cond, body=%micro_body, backend_config={"known_induction_variable":{"tuple_index":"0"},"known_trip_count":{"n":"4"}}
  %ar = (f32[50304,64]{1,0}, f32[64]{0}) all-reduce-start(%g1, %g2), channel_id=1, replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}, to_apply=%add
  %rs = f32[2]{0} reduce-scatter(f32[16]{0} %g), replica_groups={}, dimensions={0}, to_apply=%add
  ROOT %p = f32[16] collective-permute(f32[16] %x), source_target_pairs={{0,1},{1,0}}
}
"""


def test_collectives_their_groups_and_runs_a_step():
    found = {c.op: c for c in collectives(HLO)}
    assert len(collectives(HLO)) == 5
    assert (found["all-reduce"].shapes, found["all-reduce"].bytes) == (((50304, 64), (64,)), (50304 * 64 + 64) * 4)
    assert (found["all-reduce"].group, found["all-reduce"].runs) == (4, 1)  # the named axis of the mesh
    assert (found["all-gather"].bytes, found["all-gather"].group, found["all-gather"].runs) == (16 * 32 * 2, 8, 4)
    assert (found["reduce-scatter"].group, found["collective-permute"].group) == (0, 2)  # {}: every device
    chunk = [c for c in collectives(HLO) if c.computation == "chunk_body"]
    assert [(c.group, c.runs) for c in chunk] == [(2, 12)]  # 3 chunks in each of 4 micro-batches


def test_the_script_on_eight_simulated_devices(tmp_path):
    out = tmp_path / "collectives.json"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "collectives.py"), "--config", "tiny",
                           "--devices", "8", "--set", "mesh.data=8", "train.batch_size=32",
                           "train.micro_batch_size=16", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "8 cpu devices (data=8, fsdp=1, tensor=1), 2 micro-batch(es) of 16" in done.stdout
    assert "of which 0.000 MB in collectives that run more than once a step" in done.stdout
    found = json.loads(out.read_text())
    gradient = max(found, key=lambda c: c["bytes"])
    assert (gradient["op"], gradient["group"], gradient["runs"]) == ("all-reduce", 8, 1)
