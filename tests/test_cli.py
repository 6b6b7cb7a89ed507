"""The command line: ``fastpatch sweep`` on a local model folder built offline, and its input errors."""

import json
import subprocess
import sys

import pytest
import torch

from fastpatch.cli import main

WORDS = ["<bos>", "the", "cat", "dog", "sat", "ran", "on", "mat", "rug", "and", "then", "a", "big", "small"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random GPT-2 and a word-level tokenizer, saved like any Hugging Face model folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("hf_model")
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<bos>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", unk_token="<bos>").save_pretrained(folder)
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=len(WORDS), n_positions=16, initializer_range=0.2,
                     bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(cfg).save_pretrained(folder)
    return folder


def _prompts(tmp_path, pairs):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(p) for p in pairs))
    return path


GOOD = [
    {"clean": "the cat sat on the mat and the cat", "corrupted": "the dog sat on the mat and the dog", "answer": "sat", "wrong": "ran"},
    {"clean": "a big dog ran on the rug and big", "corrupted": "a small dog ran on the rug and small", "answer": "dog", "wrong": "cat"},
]


def _good_inputs(model_dir):
    """The folder's model and GOOD tokenised as the CLI does, with its LogitDiff metric: the references' inputs."""
    from fastpatch.cli.main import _load_model
    from fastpatch.datasets import from_pairs
    from fastpatch.metrics import LogitDiff

    model, tokenizer = _load_model(model_dir, "cpu")
    data = from_pairs(tokenizer, *([p[k] for p in GOOD] for k in ("clean", "corrupted", "answer", "wrong")))
    return model, data, LogitDiff(data.answer_tokens, data.wrong_tokens)


def test_sweep_on_a_local_model_folder(tmp_path, model_dir, capsys):
    out = tmp_path / "result"
    assert main(["sweep", str(model_dir), str(_prompts(tmp_path, GOOD)), "--out", str(out), "--quiet"]) == 0
    record = json.loads((tmp_path / "result.json").read_text())
    values = torch.tensor(record["values"])
    assert record["axes"] == ["layer", "head"] and values.shape == (2, 4)
    assert float(values.max() - values.min()) > 1e-4
    assert "Plotly.newPlot" in (tmp_path / "result.html").read_text()
    assert "get_act_patch_attn_head_out_all_pos" in capsys.readouterr().out


@pytest.mark.parametrize(
    "pairs, folder, message",
    [
        (GOOD, "missing", "does not exist"),
        ([{**GOOD[0], "corrupted": "the dog sat"}], None, "must align position by position"),
        ([{**GOOD[0], "answer": "sat on"}], None, "must be exactly one"),
        ([GOOD[0], {**GOOD[1], "clean": "a big dog", "corrupted": "a small dog"}], None, "same length"),
        ([{"clean": "the cat"}], None, "missing string field"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, model_dir, capsys, pairs, folder, message):
    target = tmp_path / folder if folder else model_dir
    code = main(["sweep", str(target), str(_prompts(tmp_path, pairs)), "--out", str(tmp_path / "x"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert message in err and err.startswith("fastpatch: error:") and "\n" not in err


def test_help_and_module_entry_point(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0 and "sweep" in capsys.readouterr().out
    # ``python -m fastpatch`` is the same entry point; an input error is one line and exit code 2
    done = subprocess.run([sys.executable, "-m", "fastpatch", "sweep", "/nonexistent", "/nonexistent.jsonl"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0


def test_circuit_on_a_local_model_folder(tmp_path, model_dir, capsys):
    """``fastpatch circuit`` writes the faithfulness curve of ``faithfulness_curve`` on the same inputs; its
    full and empty circuits are the clean and corrupted models' plain forwards."""
    from fastpatch.attribution import get_attr_patch_edges
    from fastpatch.circuits import faithfulness_curve

    out = tmp_path / "circ"
    argv = ["circuit", str(model_dir), str(_prompts(tmp_path, GOOD)), "--out", str(out), "--quiet",
            "--ablation", "corrupted", "zero", "--random", "1"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    record = json.loads((tmp_path / "circ.json").read_text())
    model, data, metric = _good_inputs(model_dir)
    scores = get_attr_patch_edges(model, data.clean_tokens, data.corrupted_tokens, metric)
    curve = faithfulness_curve(model, data.clean_tokens, data.corrupted_tokens, metric, scores,
                               ablation=["corrupted", "zero"], n_random=1)
    with torch.no_grad():
        clean_value = float(metric(model(data.clean_tokens)))
        corrupted_value = float(metric(model(data.corrupted_tokens)))
    assert record["ablations"] == ["corrupted", "zero"] and record["counts"] == curve.counts.tolist()
    torch.testing.assert_close(torch.tensor(record["clean"]), torch.tensor([clean_value] * 2), rtol=1e-5, atol=1e-5)
    assert abs(record["ablated"][0] - corrupted_value) <= 1e-5 * max(1.0, abs(corrupted_value))
    for key in ("values", "faithfulness", "cpr", "cmd", "random_faithfulness", "random_cpr", "random_cmd"):
        torch.testing.assert_close(torch.tensor(record[key]), getattr(curve, key).float(), rtol=1e-4, atol=1e-5)
    faith = torch.tensor(record["faithfulness"])
    assert float(faith.max() - faith.min()) > 0.1 and torch.allclose(faith[:, -1], torch.ones(2))  # 100% of edges
    shown = record["shown_circuit"]
    circuit = curve.circuits[shown["index"]]
    assert len(shown["edges"]) == int(circuit.sum()) > 0
    assert {(w, r) for w, r, _ in shown["edges"]} == {
        (scores.writer_names[w], scores.reader_names[r]) for w, r in torch.nonzero(circuit).tolist()}
    page = (tmp_path / "circ.html").read_text()
    assert page.count("Plotly.newPlot") >= 2 and "Faithfulness curve" in page and "Circuit graph" in page
    assert "CPR" in printed and "zero" in printed


@pytest.mark.parametrize(
    "extra, folder, pairs, message",
    [
        (["--ablation", "corrupted", "ablate"], None, GOOD, "unknown ablation 'ablate'"),
        (["--score", "magic"], None, GOOD, "unknown score 'magic'"),
        ([], "missing", GOOD, "does not exist"),
        ([], None, [{"clean": "the cat"}], "missing string field"),
    ],
)
def test_circuit_bad_input_is_one_line_and_exit_2(tmp_path, model_dir, capsys, extra, folder, pairs, message):
    target = tmp_path / folder if folder else model_dir
    code = main(["circuit", str(target), str(_prompts(tmp_path, pairs)), "--out", str(tmp_path / "x"), "--quiet", *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and err.startswith("fastpatch: error:") and "\n" not in err


def test_circuit_with_exact_scores_and_pruning(tmp_path, model_dir):
    """``--score exact``: the drawn circuit's edges carry ``exact_edges``' scores; ``--prune`` keeps no more edges
    than asked for, and the 100% circuit stays the clean model."""
    from fastpatch.circuits import exact_edges

    out = tmp_path / "exact"
    argv = ["circuit", str(model_dir), str(_prompts(tmp_path, GOOD)), "--out", str(out), "--quiet",
            "--score", "exact", "--ablation", "mean", "--random", "0", "--prune", "--keep", "0.3"]
    assert main(argv) == 0
    record = json.loads((tmp_path / "exact.json").read_text())
    model, data, metric = _good_inputs(model_dir)
    scores = exact_edges(model, data.clean_tokens, data.corrupted_tokens, metric)
    index = {(w, r): (i, j) for i, w in enumerate(scores.writer_names) for j, r in enumerate(scores.reader_names)}
    shown = record["shown_circuit"]["edges"]
    assert shown and all(abs(v - float(scores.scores[index[(w, r)]])) <= 1e-5 for w, r, v in shown)
    assert all(n <= c for n, c in zip(record["n_edges"], record["counts"])) and record["n_edges"][-1] == record["counts"][-1]
    assert record["faithfulness"][0][-1] == pytest.approx(1.0, abs=1e-5)
