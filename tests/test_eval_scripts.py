"""Evaluation and sampling from the command line: perplexity and HellaSwag scores of both frameworks agree with an
independent computation by transformers' GPT2LMHeadModel on the same weights and tokens (files written here in the
real formats), validation loss on shards, scripts/sample.py, and one-line errors."""

import importlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt2_common import weights as canonical
from gpt2_common.config import Config, ModelConfig
from gpt2_common.data import write_shard
from gpt2_common.errors import UserError
from gpt2_common.evaluation import hellaswag_accuracy, read_hellaswag, text_perplexity
from gpt2_common.tokenizer import get_tokenizer
from script_module import load_script

ROOT = Path(__file__).resolve().parent.parent
MODEL = ModelConfig(n_layer=2, n_head=4, n_embd=64, block_size=32, vocab_size=50257)
FRAMEWORKS = ["jax", "torch"]
TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
        "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, it "
        "was the season of Darkness, it was the spring of hope, it was the winter of despair.")
CONTEXTS = [
    ("A man is sitting on a roof. He", ["is using wrap to wrap a pair of skis.", "starts pulling up roofing.",
                                        "is ripping level tiles off.", "is holding a rope."]),
    ("The chef cracks two eggs into a bowl. She", ["whisks them with a fork.", "paints the bowl blue.",
                                                   "throws the bowl away.", "sings to the eggs."]),
    ("A dog runs across the park. It", ["catches the ball.", "reads a newspaper.", "flies away.",
                                        "sits down on the grass quietly."]),
    ("Two kids build a sandcastle. They", ["add a moat.", "eat the sand.", "fly a plane.", "file taxes."]),
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """An HF checkpoint of random weights, the same weights in transformers, and a text file."""
    tmp = tmp_path_factory.mktemp("eval")
    rng = np.random.default_rng(0)
    weights = {name: ((1.0 if len(shape) == 1 and name.endswith(".weight") else 0.0)
                      + 0.1 * rng.standard_normal(shape)).astype(np.float32)
               for name, shape in canonical.canonical_shapes(MODEL).items()}
    canonical.save_hf(weights, MODEL, tmp / "hf")
    import transformers

    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp / "hf", attn_implementation="eager").eval()
    (tmp / "text.txt").write_text(TEXT)
    return tmp, weights, hf


def hf_log_probs(hf, tokens: np.ndarray) -> np.ndarray:
    """log p(next token | tokens so far) [B, T, vocab] from transformers, in float64."""
    with torch.no_grad():
        return torch.log_softmax(hf(torch.from_numpy(tokens).long()).logits.double(), dim=-1).numpy()


def hf_perplexity_nll(hf, tokens: list[int], context: int, stride: int) -> tuple[float, int]:
    """Each token after the first scored once, by the first window that holds it (windows of context + 1 tokens
    starting every `stride`), from transformers' logits."""
    total, count, scored_until, begin = 0.0, 0, 1, 0
    while True:
        end = min(begin + context + 1, len(tokens))
        log_probs = hf_log_probs(hf, np.array([tokens[begin:end - 1]]))[0]
        for j in range(max(scored_until, begin + 1), end):
            total -= log_probs[j - 1 - begin, tokens[j]]
            count += 1
        scored_until = end
        if end == len(tokens):
            return total, count
        begin += stride


def token_nll_fn(framework, weights):
    return importlib.import_module(f"gpt2_{framework}.evaluate").token_nll_fn(Config(model=MODEL), weights)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_text_perplexity_agrees_with_transformers(setup, framework):
    tmp, weights, hf = setup
    tokens = get_tokenizer().encode_ordinary(TEXT)
    assert len(tokens) > 2 * MODEL.block_size  # several windows, overlapping
    total, count = hf_perplexity_nll(hf, tokens, MODEL.block_size, 12)
    ours = text_perplexity(tmp / "text.txt", MODEL.block_size, 12, token_nll_fn(framework, weights))
    assert ours["tokens"] == count == len(tokens) - 1
    assert ours["nll"] == pytest.approx(total / count, rel=1e-5)
    assert ours["perplexity"] == pytest.approx(np.exp(total / count), rel=1e-5)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_hellaswag_agrees_with_transformers(setup, framework):
    tmp, weights, hf = setup
    enc = get_tokenizer()
    picks, picks_norm, records = [], [], []
    for i, (ctx, endings) in enumerate(CONTEXTS):
        ctx_tokens = enc.encode_ordinary(ctx)
        losses = []
        for ending in endings:
            tokens = ctx_tokens + enc.encode_ordinary(" " + ending)
            log_probs = hf_log_probs(hf, np.array([tokens[:-1]]))[0]
            losses.append([-log_probs[j - 1, tokens[j]] for j in range(len(ctx_tokens), len(tokens))])
        picks.append(int(np.argmin([sum(x) for x in losses])))
        picks_norm.append(int(np.argmin([np.mean(x) for x in losses])))
        # transformers' pick is the label for every other record: the expected accuracy is not 0 or 1 by accident
        records.append({"ctx": ctx, "endings": endings, "label": picks[-1] if i % 2 == 0 else (picks[-1] + 1) % 4})
    path = tmp / f"hellaswag_{framework}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    expected_norm = np.mean([p == r["label"] for p, r in zip(picks_norm, records)])
    result = hellaswag_accuracy(read_hellaswag(path), MODEL.block_size, token_nll_fn(framework, weights))
    assert result == {"examples": 4, "acc": 0.5, "acc_norm": expected_norm}
    # and the scores themselves, token by token
    example = read_hellaswag(path)[0]
    targets = np.where(example.mask[:, 1:], example.tokens[:, 1:], -1)
    nll = token_nll_fn(framework, weights)(example.tokens[:, :-1], targets)
    log_probs = hf_log_probs(hf, example.tokens[:, :-1])
    expected = -np.take_along_axis(log_probs, np.maximum(targets, 0)[..., None], axis=-1)[..., 0] * (targets != -1)
    np.testing.assert_allclose(nll, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_evaluate_script_on_shards_text_and_hellaswag(setup, framework, capsys):
    tmp, _, hf = setup
    evaluate = load_script("evaluate")
    shards = tmp / "shards"
    tokens = np.random.default_rng(1).integers(0, MODEL.vocab_size, 10 * 32 + 1)
    write_shard(shards / "val_000000.bin", tokens)
    write_shard(shards / "train_000000.bin", np.zeros(1000, np.int64))  # not read: the directory's val_* are
    checkpoint = str(tmp / "hf")

    def run(*args):
        evaluate.main(["--checkpoint", checkpoint, "--framework", framework, "--json", *args])
        return json.loads(capsys.readouterr().out)

    result = run("--shards", str(shards), "--batch-size", "4")
    windows = np.stack([tokens[i * 32:i * 32 + 33] for i in range(8)])  # 10 windows make 2 batches of 4
    log_probs = hf_log_probs(hf, windows[:, :-1])
    expected = -np.take_along_axis(log_probs, windows[:, 1:, None], axis=-1).mean()
    assert result["tokens"] == 8 * 32 and result["loss"] == pytest.approx(expected, rel=1e-5)
    text = run("--text", str(tmp / "text.txt"))
    assert text["stride"] == 16 and text["perplexity"] > 1
    hellaswag = tmp / "h.jsonl"
    hellaswag.write_text(json.dumps({"ctx": CONTEXTS[0][0], "endings": CONTEXTS[0][1], "label": 1}) + "\n")
    assert run("--hellaswag", str(hellaswag))["examples"] == 1
    evaluate.main(["--checkpoint", checkpoint, "--framework", framework, "--shards", str(shards)])
    assert capsys.readouterr().out.startswith("val loss ")


def test_sample_script_greedy_agrees_across_frameworks(setup, capsys):
    tmp, _, hf = setup
    sample = load_script("sample")
    texts = []
    for framework in FRAMEWORKS:
        sample.main(["--checkpoint", str(tmp / "hf"), "--framework", framework, "--prompt", "It was the",
                     "--temperature", "0", "--max-new-tokens", "8", "--num-samples", "2"])
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1]
    prompt = get_tokenizer().encode_ordinary("It was the")
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=8, do_sample=False, pad_token_id=0)
    expected = get_tokenizer().decode(out[0].tolist())
    assert texts[0].split("---------------\n")[:2] == [expected + "\n"] * 2
    with pytest.raises(UserError, match="--top-p must be in"):
        sample.main(["--checkpoint", str(tmp / "hf"), "--top-p", "0"])


@pytest.mark.parametrize("script", ["sample", "evaluate"])
def test_scripts_give_one_line_errors_for_a_missing_checkpoint(tmp_path, script):
    extra = ["--text", "x.txt"] if script == "evaluate" else []
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / f"{script}.py"), "--checkpoint",
                             str(tmp_path / "nowhere"), *extra], capture_output=True, text=True, timeout=600)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert "nowhere" in result.stderr and "does not exist" in result.stderr


# --- what sample.py and evaluate.py may ask of the machine (issue 32, items 3, 4 and 5) ------------------------------

def one_line(capsys, main) -> str:
    """What run_cli prints for `main`: exactly one line on stderr, exit status 2."""
    from gpt2_common.errors import run_cli

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    return err[len("error: "):].rstrip("\n")


def memory_for_rows(monkeypatch, rows: int, row_bytes: int, precision: str = "fp32") -> None:
    """Makes the machine's free memory what `rows` rows of `row_bytes` and the weights fit in (gpt2_common.limits
    plans with half of it)."""
    from gpt2_common import limits

    available = 2 * (limits.weights_bytes(MODEL, precision) + row_bytes * rows + row_bytes // 2)
    monkeypatch.setattr(limits, "available_memory", lambda: available)


@pytest.mark.parametrize("flags, message", [
    (["--seed", "99999999999999999999999"], "--seed 99999999999999999999999 is out of range; it must be in "
                                            "[0, 4294967295]"),  # was OverflowError from jax's PRNG
    (["--seed", "-1"], "--seed -1 is out of range; it must be in [0, 4294967295]"),
    (["--max-new-tokens", "100000000"], "--max-new-tokens 100000000 is out of range; it must be in [1, 1000000] (a "
                                        "longer text is the work of several calls)"),
    (["--num-samples", "100000000"], "--num-samples 100000000 is out of range; it must be in [1, 1000000]"),
    (["--instruction", "Say hi.", "--prompt", "x"], "give --prompt or --instruction, not both (--instruction puts "
                                                    "the instruction in the Alpaca template, which is the prompt)"),
])
def test_sample_refuses_what_is_out_of_bounds_in_one_line(tmp_path, capsys, flags, message):
    sample = load_script("sample")
    assert one_line(capsys, lambda: sample.main(["--checkpoint", str(tmp_path / "hf"), *flags])) == message


def test_sample_seeds_at_the_edges_are_drawn(setup, capsys):
    tmp, _, _ = setup
    sample = load_script("sample")
    for seed in ("0", "4294967295"):
        sample.main(["--checkpoint", str(tmp / "hf"), "--prompt", "It was", "--seed", seed, "--max-new-tokens", "4"])
        assert capsys.readouterr().out.startswith("It was")


def test_sample_generates_in_batches_that_fit_the_memory(setup, capsys, monkeypatch):
    """--num-samples 100000 --max-new-tokens 2 grew to 23 GB in one batch, until the OOM killer came: the samples
    now go in batches sized from the memory free, each printed when done, the same samples as one batch draws."""
    from gpt2_common import limits
    from gpt2_jax import sample as jax_sample

    tmp, _, _ = setup
    script = load_script("sample")
    argv = ["--checkpoint", str(tmp / "hf"), "--prompt", "It was", "--temperature", "1", "--seed", "3",
            "--max-new-tokens", "6", "--num-samples", "5"]
    script.main(argv)
    whole = capsys.readouterr().out
    batches = []
    make_generate = jax_sample.make_generate

    def spied(*args, **kwargs):
        generate = make_generate(*args, **kwargs)
        return lambda prompts, *a, **k: batches.append(len(prompts)) or generate(prompts, *a, **k)

    monkeypatch.setattr(jax_sample, "make_generate", spied)
    row = limits.decode_row_bytes(MODEL, "fp32", 6, slides=False)
    memory_for_rows(monkeypatch, 2, row)
    script.main(argv)
    assert batches == [2, 2, 1] and capsys.readouterr().out == whole and whole.count("---------------") == 5
    memory_for_rows(monkeypatch, 0, row)
    assert one_line(capsys, lambda: script.main(argv)) == (
        f"one sample of --max-new-tokens 6 needs {limits.shown_bytes(row)} for its cache and buffers, more than half "
        "the memory free now; lower --max-new-tokens or free memory")


def test_sample_says_when_it_cuts_the_prompt_and_asks_instructions_in_the_alpaca_template(setup, capsys):
    from gpt2_common.instruct import format_prompt

    tmp, _, _ = setup
    sample = load_script("sample")
    sample.main(["--checkpoint", str(tmp / "hf"), "--prompt", " word" * 40, "--max-new-tokens", "2"])
    out = capsys.readouterr()
    assert "note: the prompt is 40 tokens; it is cut to the last 32 (the model's context)" in out.err  # was silent
    assert out.out.startswith(" word" * 40)
    greedy = ["--checkpoint", str(tmp / "hf"), "--temperature", "0", "--max-new-tokens", "5"]
    sample.main([*greedy, "--instruction", "Name a colour.", "--input", "The sky"])
    answer = capsys.readouterr().out
    sample.main([*greedy, "--prompt", format_prompt("Name a colour.", "The sky")])
    assert capsys.readouterr().out == format_prompt("Name a colour.", "The sky") + answer  # the response alone


def test_evaluate_refuses_a_batch_that_does_not_fit_the_memory(setup, capsys, monkeypatch):
    from gpt2_common import limits

    tmp, _, _ = setup
    shards = tmp / "many"
    write_shard(shards / "val_000000.bin", np.random.default_rng(1).integers(0, MODEL.vocab_size, 10 * 32 + 1))
    evaluate = load_script("evaluate")
    row = limits.eval_row_bytes(MODEL, "fp32")
    memory_for_rows(monkeypatch, 3, row)
    argv = ["--checkpoint", str(tmp / "hf"), "--shards", str(shards), "--json"]
    evaluate.main([*argv, "--batch-size", "3"])
    assert json.loads(capsys.readouterr().out)["tokens"] == 9 * 32
    assert one_line(capsys, lambda: evaluate.main([*argv, "--batch-size", "4"])) == (
        f"--batch-size 4 needs {limits.shown_bytes(4 * row)} for the logits and activations of its 4 sequences of 32 "
        "tokens, more than half the memory free now; lower --batch-size")
