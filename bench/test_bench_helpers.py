"""The shared helpers of the benchmark scripts (``bench/compare_transformer_lens.py``): option
resolution, thread setting, interleaved timing and the recorded command. No model is built."""

from __future__ import annotations

import argparse
import shlex

import pytest
import torch

from bench import compare_transformer_lens as cli


def _shape_args(argv):
    p = argparse.ArgumentParser()
    cli.add_shape_arguments(p, cli.SHAPES["gpt2-small"], batch_help="prompts")
    return p.parse_args(argv)


def test_resolve_shape_small_and_default_corrupted_position() -> None:
    args = _shape_args([])
    cli.resolve_shape(args)
    assert (args.positions, args.corrupt_from) == (15, 10)  # IOI's second subject
    args = _shape_args(["--small"])
    cli.resolve_shape(args)
    assert {k: getattr(args, k) for k in cli.SHAPES["small"]} == cli.SHAPES["small"]
    assert args.corrupt_from == cli.SHAPES["small"]["positions"] // 2  # short prompts: the middle
    args = _shape_args(["--positions", "16"])
    cli.resolve_shape(args, middle=True)
    assert args.corrupt_from == 8
    args = _shape_args(["--corrupt-from", "5"])
    cli.resolve_shape(args, middle=True)
    assert args.corrupt_from == 5  # an explicit value wins


def test_torch_threads_restores_even_when_the_block_raises() -> None:
    before = torch.get_num_threads()
    target = 2 if before == 1 else 1
    with pytest.raises(RuntimeError, match="inside"):
        with cli.torch_threads(target):
            assert torch.get_num_threads() == target
            raise RuntimeError("inside")
    assert torch.get_num_threads() == before
    with cli.torch_threads(None):
        assert torch.get_num_threads() == before
    with pytest.raises(SystemExit, match="--threads must be at least 1, got 0"):
        with cli.torch_threads(0):
            pass
    assert torch.get_num_threads() == before


def test_interleaved_best_runs_every_configuration_once_per_round() -> None:
    calls, after = [], []
    runs = {key: (lambda key=key: calls.append(key)) for key in ("a", "b", "c")}
    seconds, cpu_seconds = cli.interleaved_best(runs, 3, torch.device("cpu"), after=after.append)
    assert calls == ["a", "b", "c"] * 3 and after == calls
    assert set(seconds) == set(cpu_seconds) == set(runs)
    assert all(0 <= s < float("inf") for s in seconds.values())
    assert all(c == c for c in cpu_seconds.values())  # not NaN: each key's best run set its CPU seconds


def test_command_line_can_be_pasted_back() -> None:
    argv = ["--small", "--fastpatch-kwargs", '{"chunk_size": 16}']
    command = cli.command_line("compare_transformer_lens.py", argv)
    assert shlex.split(command) == ["python", "bench/compare_transformer_lens.py", *argv]
