import io

from gpt2_common.progress import Progress, model_summary


def test_summary_groups_blocks_in_both_spellings():
    torch_names = {"transformer.wte.weight": 100, "transformer.h.0.attn.c_attn.weight": 30,
                   "transformer.h.0.mlp.c_fc.bias": 4, "transformer.h.1.ln_1.weight": 2, "transformer.ln_f.bias": 1}
    flax_names = {"wte/embedding": 100, "h_0/attn/c_attn/kernel": 30, "h_0/mlp/c_fc/bias": 4,
                  "h_1/ln_1/scale": 2, "ln_f/bias": 1}
    assert model_summary(torch_names) == model_summary(flax_names)
    lines = model_summary(torch_names).splitlines()
    assert [line.split()[0] for line in lines] == ["module", "wte", "h.0", "h.1", "ln_f", "total"]
    assert lines[2].split()[1] == "34" and lines[-1].split()[1] == "137"


def test_plain_lines_without_a_terminal():
    stream = io.StringIO()
    progress = Progress(10, enabled=True, stream=stream)
    progress.update(5, 3.2, 1000.0, "step 5 | loss 3.2000")
    progress.write("val loss 3.1")
    progress.close()
    assert stream.getvalue() == "step 5 | loss 3.2000\nval loss 3.1\n"


def test_both_trainers_print_one_step_line_with_the_optional_fields_they_have():
    from gpt2_common.progress import step_line

    record = {"step": 7, "loss": 3.25, "lr": 6e-4, "grad_norm": 0.5, "step_time_s": 0.0724, "tokens_per_s": 452477.0,
              "mfu": None}
    assert step_line(record, 100) == ("step      7/100 | loss 3.2500 | lr 6.000e-04 | grad norm 0.500 | 72 ms/step | "
                                      "452,477 tok/s")
    full = step_line({**record, "mfu": 0.391, "loss_scale": 1024.0, "memory_gib": 8.5, "skipped_steps": 2}, 100)
    assert full.endswith("| mfu 39.1% | loss scale 1024 | mem 8.50 GiB | skipped 2")
