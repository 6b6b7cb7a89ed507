"""Patching metrics that declare which logits they read.

Every metric here is a plain callable ``metric(logits) -> value`` (a 0-d scalar, or ``[batch]``
with ``per_prompt=True`` for ``reduce="mean"`` / ``reduce="none"``), so it can be passed straight
to ``transformer_lens.patching`` or ``fastpatch.patching``. In addition, a :class:`LogitMetric`
declares in ``reads`` the position(s) and the token columns it looks at, and splits its
evaluation in two:

- ``select(logits)``: ``logits[:, position]`` gathered at ``reads.tokens`` -> ``[batch, k]``
  (the whole ``[batch, d_vocab]`` row when ``reads.tokens`` is ``None``); for a metric that reads
  several positions, ``logits[:, positions]`` -> ``[batch, n_positions, k or d_vocab]``;
- ``from_selected(selected)``: the metric from those values.

The metrics: :class:`LogitDiff`, :class:`BasketLogitDiff` (logsumexp over baskets of answer
tokens), :class:`LogProb`, :class:`Probability`, :class:`MultiTokenLogProb` (an answer of several
tokens), :class:`SpanLoss` (next-token loss over a span of positions, the induction metric),
:class:`KLDivergence` (from the clean run's distribution, the ACDC metric) and
:class:`NormalizedEffect` around any of them.

``metric(logits) == metric.from_selected(metric.select(logits))`` bit for bit (``__call__`` is
implemented literally that way), so a backend that computes only the selected logits (e.g. a
logit difference needs two columns of ``W_U`` at one position, not the full
``[rows, pos, d_vocab]`` unembedding) gives exactly the numbers of the full-logits path.

Backends should use :func:`logit_reads` (``fastpatch.engine.metric_set``, re-exported here):
whenever it returns a :class:`LogitReads` (not ``None``), ``metric.from_selected`` is available;
for ``None`` (any other callable) the backend must compute and pass the full logits.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor

# The engine's metric protocol: ``MetricFn`` (every patching metric's type, the one definition the
# patching engine and the attribution package annotate with) and ``logit_reads`` (what a metric
# declares it reads: a ``reads`` attribute and a ``from_selected`` method, as every metric here has).
from fastpatch.engine.metric_set import MetricFn, logit_reads  # noqa: F401 (MetricFn: re-exported)

Acts = Mapping[str, Tensor]  # hook name -> that activation of the patched run, batch first

__all__ = [
    "LogitReads",
    "LogitMetric",
    "LogitDiff",
    "BasketLogitDiff",
    "LogProb",
    "Probability",
    "MultiTokenLogProb",
    "SpanLoss",
    "KLDivergence",
    "NormalizedEffect",
    "ActivationMetric",
    "AttentionTo",
    "NeuronValue",
    "HeadDLA",
    "logit_reads",
]

MetricValue = Union[Float[Tensor, ""], Float[Tensor, "batch"]]


def _as_position(position: Any) -> int:
    if isinstance(position, bool):
        raise ValueError(f"position must be an int, got {position!r}")
    try:
        return operator.index(position)
    except TypeError:
        raise ValueError(f"position must be an int, got {type(position).__name__}") from None


@dataclass(frozen=True, eq=False)
class LogitReads:
    """What a metric reads of the ``[batch, pos, d_vocab]`` logits.

    Attributes:
        position: the one sequence position read (negative counts from the end, like ``-1``), or,
            for a metric that reads several, ``None`` (built from a sequence of positions).
        positions: every position read, in the order ``select`` stacks them (``(position,)`` for one).
        tokens: ``[batch, k]`` int64 token ids read at each position for each prompt, or ``None``
            for the full vocabulary row (e.g. a log-softmax needs every logit).

    ``LogitReads(3, tokens)`` reads one position (``select`` gives ``[batch, k]``);
    ``LogitReads((2, 3), None)`` reads two (``select`` gives ``[batch, 2, d_vocab]``). Two reads
    compare equal when positions and tokens (values, shape) are equal.
    """

    position: Optional[int]
    tokens: Optional[Int[Tensor, "batch k"]]
    positions: Tuple[int, ...] = ()

    def __init__(self, position: Union[int, Sequence[int]], tokens: Optional[Int[Tensor, "batch k"]]):
        if isinstance(position, (tuple, list)):
            positions = tuple(_as_position(p) for p in position)
            if not positions:
                raise ValueError("LogitReads needs at least one position")
            object.__setattr__(self, "position", None)
        else:
            positions = (_as_position(position),)
            object.__setattr__(self, "position", positions[0])
        object.__setattr__(self, "positions", positions)
        object.__setattr__(self, "tokens", tokens)
        if tokens is not None:
            if not isinstance(tokens, Tensor) or tokens.ndim != 2 or tokens.dtype != torch.int64:
                raise ValueError("LogitReads.tokens must be None or a [batch, k] int64 tensor")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LogitReads):
            return NotImplemented
        if (self.position, self.positions) != (other.position, other.positions):
            return False
        if (self.tokens is None) != (other.tokens is None):
            return False
        if self.tokens is None:
            return True
        return self.tokens.shape == other.tokens.shape and torch.equal(self.tokens.cpu(), other.tokens.cpu())

    def __hash__(self) -> int:
        return hash((self.position, self.positions, None if self.tokens is None else tuple(self.tokens.shape)))


def _check_logits(logits: Tensor, batch: int, positions: Sequence[int], what: str) -> None:
    if not isinstance(logits, Tensor) or logits.ndim != 3:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"{what} expects logits of shape [batch, pos, d_vocab], got {shape}")
    if logits.shape[0] != batch:
        raise ValueError(f"{what} was built for a batch of {batch} prompts, got logits for {logits.shape[0]}")
    n_pos = logits.shape[1]
    for position in positions:
        if not -n_pos <= position < n_pos:
            raise ValueError(f"{what} reads position {position}, out of range for {n_pos} positions")


def _token_ids(tokens: Any, name: str, batch: Optional[int] = None) -> Int[Tensor, "batch n"]:
    """Validate ``[batch]`` or ``[batch, n]`` integer token ids; return them as ``[batch, n]`` int64."""
    if not isinstance(tokens, Tensor):
        raise ValueError(
            f"{name} must be an integer torch.Tensor of shape [batch] or [batch, n], got {type(tokens).__name__}"
        )
    if tokens.dtype == torch.bool or tokens.dtype.is_floating_point or tokens.dtype.is_complex:
        raise ValueError(f"{name} must have an integer dtype (token ids), got {tokens.dtype}")
    if tokens.ndim not in (1, 2):
        raise ValueError(f"{name} must have shape [batch] or [batch, n], got {tuple(tokens.shape)}")
    if tokens.ndim == 1:
        tokens = tokens[:, None]
    if tokens.shape[0] == 0 or tokens.shape[1] == 0:
        raise ValueError(f"{name} must hold at least one token per prompt, got shape {tuple(tokens.shape)}")
    if batch is not None and tokens.shape[0] != batch:
        raise ValueError(f"{name} has {tokens.shape[0]} prompts, expected {batch} (the same batch as the other tokens)")
    if int(tokens.min()) < 0:
        raise ValueError(f"{name} holds negative token ids")
    return tokens.detach().to(torch.int64).clone()


class LogitMetric:
    """Base class: a metric of the logits that declares what it reads (see the module docstring).

    Subclasses set ``reads`` (a :class:`LogitReads`), ``per_prompt`` and ``batch`` and implement
    ``from_selected``; ``select`` and ``__call__`` are shared.
    """

    reads: LogitReads
    per_prompt: bool
    batch: int

    def __init__(self) -> None:
        self._tokens_on: Dict[Tuple[int, torch.device], Tensor] = {}
        self._max_token = -1

    def _set_reads(self, position: Union[int, Sequence[int]], tokens: Optional[Tensor], read_ids: Tensor) -> None:
        """``position``: an int, or a tuple for several positions; ``read_ids``: every token id the
        metric uses (for the vocabulary range check)."""
        self.reads = LogitReads(position, tokens)
        self.batch = int(read_ids.shape[0])
        self._max_token = int(read_ids.max())

    def _tokens_at(self, tokens: Tensor, device: torch.device) -> Tensor:
        """``tokens`` on ``device`` (copied once per device, then reused)."""
        if tokens.device == device:
            return tokens
        key = (id(tokens), device)
        if key not in self._tokens_on:
            self._tokens_on[key] = tokens.to(device)
        return self._tokens_on[key]

    def select(
        self, logits: Float[Tensor, "batch pos d_vocab"]
    ) -> Union[Float[Tensor, "batch k"], Float[Tensor, "batch d_vocab"], Float[Tensor, "batch n_positions k_or_d_vocab"]]:
        """``logits[:, position]`` gathered at ``reads.tokens`` (the full row when it is ``None``);
        ``[batch, n_positions, ...]`` for a metric that reads several positions."""
        _check_logits(logits, self.batch, self.reads.positions, type(self).__name__)
        if self._max_token >= logits.shape[-1]:
            raise ValueError(
                f"{type(self).__name__} reads token id {self._max_token}, out of range for d_vocab={logits.shape[-1]}"
            )
        several = self.reads.position is None
        rows = logits[:, list(self.reads.positions)] if several else logits[:, self.reads.position]
        if self.reads.tokens is None:
            return rows
        tokens = self._tokens_at(self.reads.tokens, rows.device)
        return rows.gather(-1, tokens[:, None].expand(-1, rows.shape[1], -1) if several else tokens)

    def from_selected(self, selected: Tensor) -> MetricValue:
        """The metric from ``select``'s output: ``[batch]`` if ``per_prompt`` else a 0-d mean over prompts."""
        raise NotImplementedError

    def _reduce(self, per_prompt_values: Float[Tensor, "batch"]) -> MetricValue:
        return per_prompt_values if self.per_prompt else per_prompt_values.mean()

    def __call__(self, logits: Float[Tensor, "batch pos d_vocab"]) -> MetricValue:
        return self.from_selected(self.select(logits))


class LogitDiff(LogitMetric):
    """Logit difference at one position.

    ``value[b] = mean_i logits[b, position, answer[b, i]] - mean_j logits[b, position, wrong[b, j]]``
    (in float32); the mean over prompts unless ``per_prompt``. Reads ``[answer, wrong]`` only.

    Args:
        answer_tokens: ``[batch]`` or ``[batch, n_answer]`` integer token ids.
        wrong_tokens: ``[batch]`` or ``[batch, n_wrong]`` integer token ids (same batch).
        position: the sequence position read (default ``-1``, the last).
        per_prompt: return ``[batch]`` (for ``reduce="mean"`` / ``"none"``) instead of a scalar.
    """

    def __init__(
        self,
        answer_tokens: Union[Int[Tensor, "batch"], Int[Tensor, "batch n_answer"]],
        wrong_tokens: Union[Int[Tensor, "batch"], Int[Tensor, "batch n_wrong"]],
        position: int = -1,
        per_prompt: bool = False,
    ):
        super().__init__()
        answer = _token_ids(answer_tokens, "answer_tokens")
        wrong = _token_ids(wrong_tokens, "wrong_tokens", batch=answer.shape[0])
        self.n_answer = int(answer.shape[1])
        self.per_prompt = bool(per_prompt)
        tokens = torch.cat([answer, wrong.to(answer.device)], dim=1)
        self._set_reads(_as_position(position), tokens, tokens)

    def from_selected(self, selected: Float[Tensor, "batch k"]) -> MetricValue:
        """``mean(selected[:, :n_answer]) - mean(selected[:, n_answer:])`` per prompt."""
        selected = selected.float()
        diff = selected[:, : self.n_answer].mean(-1) - selected[:, self.n_answer :].mean(-1)
        return self._reduce(diff)

    def __repr__(self) -> str:
        return (
            f"LogitDiff(batch={self.batch}, n_answer={self.n_answer}, n_wrong={self.reads.tokens.shape[1] - self.n_answer}, "
            f"position={self.reads.position}, per_prompt={self.per_prompt})"
        )


class LogProb(LogitMetric):
    """Log-probability of the given token(s) at one position.

    ``value[b] = sum_i log_softmax(logits[b, position].float())[tokens[b, i]]``; the mean over
    prompts unless ``per_prompt``. Needs the full vocabulary row (``reads.tokens is None``).

    Args:
        tokens: ``[batch]`` or ``[batch, n]`` integer token ids (log-probs summed over ``n``).
        position: the sequence position read (default ``-1``, the last).
        per_prompt: return ``[batch]`` (for ``reduce="mean"`` / ``"none"``) instead of a scalar.
    """

    def __init__(
        self,
        tokens: Union[Int[Tensor, "batch"], Int[Tensor, "batch n"]],
        position: int = -1,
        per_prompt: bool = False,
    ):
        super().__init__()
        self.tokens = _token_ids(tokens, "tokens")
        self.per_prompt = bool(per_prompt)
        self._set_reads(_as_position(position), None, self.tokens)

    def from_selected(self, selected: Float[Tensor, "batch d_vocab"]) -> MetricValue:
        """``log_softmax(selected.float()).gather(tokens).sum(-1)`` per prompt."""
        if selected.ndim != 2 or selected.shape[0] != self.batch:
            raise ValueError(
                f"{type(self).__name__}.from_selected expects the [batch={self.batch}, d_vocab] row, got {tuple(selected.shape)}"
            )
        return self._reduce(self._of_log_probs(_token_log_probs(selected, self._tokens_at(self.tokens, selected.device))))

    def _of_log_probs(self, log_probs: Float[Tensor, "batch n"]) -> Float[Tensor, "batch"]:
        return log_probs.sum(-1)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(batch={self.batch}, n={self.tokens.shape[1]}, position={self.reads.position}, "
            f"per_prompt={self.per_prompt})"
        )


class Probability(LogProb):
    """Probability of the given token(s) at one position.

    ``value[b] = sum_i softmax(logits[b, position].float())[tokens[b, i]]`` (the probability of the
    set of tokens); the mean over prompts unless ``per_prompt``. Needs the full vocabulary row.
    Same arguments as :class:`LogProb`.
    """

    def _of_log_probs(self, log_probs: Float[Tensor, "batch n"]) -> Float[Tensor, "batch"]:
        return log_probs.exp().sum(-1)


class BasketLogitDiff(LogitMetric):
    """Logsumexp over a basket of answer tokens minus logsumexp over a basket of wrong tokens, at one position.

    ``value[b] = logsumexp_i logits[b, position, answer[b, i]] - logsumexp_j logits[b, position, wrong[b, j]]``
    (in float32; without ``wrong_tokens`` the answer basket's logsumexp alone), e.g. " Paris" and
    "Paris" as one answer. The mean over prompts unless ``per_prompt``. Reads ``[answer, wrong]`` only.

    Args:
        answer_tokens: ``[batch]`` or ``[batch, n_answer]`` integer token ids.
        wrong_tokens: ``[batch]`` or ``[batch, n_wrong]`` integer token ids (same batch), or ``None``.
        position: the sequence position read (default ``-1``, the last).
        per_prompt: return ``[batch]`` (for ``reduce="mean"`` / ``"none"``) instead of a scalar.
    """

    def __init__(
        self,
        answer_tokens: Union[Int[Tensor, "batch"], Int[Tensor, "batch n_answer"]],
        wrong_tokens: Optional[Union[Int[Tensor, "batch"], Int[Tensor, "batch n_wrong"]]] = None,
        position: int = -1,
        per_prompt: bool = False,
    ):
        super().__init__()
        answer = _token_ids(answer_tokens, "answer_tokens")
        parts = [answer]
        if wrong_tokens is not None:
            parts.append(_token_ids(wrong_tokens, "wrong_tokens", batch=answer.shape[0]).to(answer.device))
        self.n_answer = int(answer.shape[1])
        self.per_prompt = bool(per_prompt)
        tokens = torch.cat(parts, dim=1)
        self._set_reads(_as_position(position), tokens, tokens)

    def from_selected(self, selected: Float[Tensor, "batch k"]) -> MetricValue:
        """``logsumexp(selected[:, :n_answer]) - logsumexp(selected[:, n_answer:])`` per prompt."""
        selected = selected.float()
        value = selected[:, : self.n_answer].logsumexp(-1)
        if selected.shape[1] > self.n_answer:
            value = value - selected[:, self.n_answer :].logsumexp(-1)
        return self._reduce(value)

    def __repr__(self) -> str:
        return (
            f"BasketLogitDiff(batch={self.batch}, n_answer={self.n_answer}, "
            f"n_wrong={self.reads.tokens.shape[1] - self.n_answer}, position={self.reads.position}, per_prompt={self.per_prompt})"
        )


def _token_log_probs(
    rows: Union[Float[Tensor, "batch d_vocab"], Float[Tensor, "batch n d_vocab"]], tokens: Int[Tensor, "batch n"]
) -> Float[Tensor, "batch n"]:
    """``log_softmax(rows.float())`` at ``tokens``: all of them on one row (``[batch, d_vocab]``), or
    ``tokens[:, i]`` on row ``i`` (``[batch, n, d_vocab]``)."""
    logprobs = torch.log_softmax(rows.float(), dim=-1)
    if logprobs.ndim == 2:
        return logprobs.gather(-1, tokens)
    return logprobs.gather(-1, tokens[..., None]).squeeze(-1)


def _several_positions(first: int, n: int, what: str) -> Tuple[int, ...]:
    """Positions ``first, first + 1, ..., first + n - 1``; negative ones must stay negative (from the end)."""
    if first < 0 and first + n > 0:
        raise ValueError(f"{what}: positions {first}..{first + n - 1} run past the last position")
    return tuple(range(first, first + n))


class MultiTokenLogProb(LogitMetric):
    """Log-probability of an answer of several tokens, read with teacher forcing.

    ``value[b] = sum_i log_softmax(logits[b, position + i].float())[answer[b, i]]``: the prompt must
    hold the answer's first ``n - 1`` tokens at positions ``position + 1 ..``, so that position
    ``position + i`` predicts ``answer[:, i]``. The mean over prompts unless ``per_prompt``. Reads
    the full vocabulary row at those ``n`` positions only.

    Args:
        answer_tokens: ``[batch, n]`` integer token ids (every prompt's answer has ``n`` tokens).
        position: the position that predicts the answer's first token (``-n`` when the answer ends the prompt
            and its last token is not in it, ``-n - 1`` when it is).
        per_prompt: return ``[batch]`` (for ``reduce="mean"`` / ``"none"``) instead of a scalar.
    """

    def __init__(self, answer_tokens: Int[Tensor, "batch n"], position: int, per_prompt: bool = False):
        super().__init__()
        self.tokens = _token_ids(answer_tokens, "answer_tokens")
        self.per_prompt = bool(per_prompt)
        positions = _several_positions(_as_position(position), self.tokens.shape[1], "MultiTokenLogProb")
        self._set_reads(positions, None, self.tokens)

    def from_selected(self, selected: Float[Tensor, "batch n d_vocab"]) -> MetricValue:
        """``sum_i log_softmax(selected[:, i])[answer[:, i]]`` per prompt."""
        _check_rows(selected, self.batch, len(self.reads.positions), "MultiTokenLogProb")
        return self._reduce(_token_log_probs(selected, self._tokens_at(self.tokens, selected.device)).sum(-1))

    def __repr__(self) -> str:
        return f"MultiTokenLogProb(batch={self.batch}, positions={self.reads.positions}, per_prompt={self.per_prompt})"


class SpanLoss(LogitMetric):
    """Next-token loss over a span of positions (the induction metric: loss on the repeated half).

    ``value[b] = -mean_{p in [start, stop)} log_softmax(logits[b, p].float())[tokens[b, p + 1]]``;
    the mean over prompts unless ``per_prompt``. Reads the full vocabulary row at ``start..stop-1``
    only.

    Args:
        tokens: ``[batch, n_tokens]`` the run's input tokens (position ``p`` predicts ``tokens[:, p + 1]``).
        start: first position of the span (``>= 0``).
        stop: one past the last position (default ``n_tokens - 1``, the last one with a next token).
        per_prompt: return ``[batch]`` (for ``reduce="mean"`` / ``"none"``) instead of a scalar.
    """

    def __init__(self, tokens: Int[Tensor, "batch n_tokens"], start: int, stop: Optional[int] = None, per_prompt: bool = False):
        super().__init__()
        tokens = _token_ids(tokens, "tokens")
        n_tokens = tokens.shape[1]
        start = _as_position(start)
        stop = n_tokens - 1 if stop is None else _as_position(stop)
        if not 0 <= start < stop <= n_tokens - 1:
            raise ValueError(
                f"SpanLoss needs 0 <= start < stop <= n_tokens - 1 = {n_tokens - 1} (each position predicts the next "
                f"token), got start={start}, stop={stop}"
            )
        self.targets = tokens[:, start + 1 : stop + 1].clone()
        self.per_prompt = bool(per_prompt)
        self._set_reads(tuple(range(start, stop)), None, self.targets)

    def from_selected(self, selected: Float[Tensor, "batch n d_vocab"]) -> MetricValue:
        """``-mean_i log_softmax(selected[:, i])[targets[:, i]]`` per prompt."""
        _check_rows(selected, self.batch, len(self.reads.positions), "SpanLoss")
        return self._reduce(-_token_log_probs(selected, self._tokens_at(self.targets, selected.device)).mean(-1))

    def __repr__(self) -> str:
        positions = self.reads.positions
        return f"SpanLoss(batch={self.batch}, start={positions[0]}, stop={positions[-1] + 1}, per_prompt={self.per_prompt})"


class KLDivergence(LogitMetric):
    """KL divergence of the patched run's next-token distribution from the clean run's (the ACDC metric).

    ``value[b] = mean_p sum_v P_clean[b, p, v] (log P_clean[b, p, v] - log P[b, p, v])`` over the chosen
    positions, with ``P = softmax(logits.float())``; the mean over prompts unless ``per_prompt``.
    Reads the full vocabulary row at those positions only.

    Args:
        clean_logits: ``[batch, pos, d_vocab]`` the clean run's logits (only the chosen positions are kept).
        positions: one position or a sequence of them (default ``-1``, the last).
        per_prompt: return ``[batch]`` (for ``reduce="mean"`` / ``"none"``) instead of a scalar.
    """

    def __init__(
        self,
        clean_logits: Float[Tensor, "batch pos d_vocab"],
        positions: Union[int, Sequence[int]] = -1,
        per_prompt: bool = False,
    ):
        super().__init__()
        several = isinstance(positions, (tuple, list))
        reads = LogitReads(tuple(positions) if several else positions, None)
        if not isinstance(clean_logits, Tensor) or not clean_logits.dtype.is_floating_point:
            raise ValueError("clean_logits must be a floating-point [batch, pos, d_vocab] tensor")
        _check_logits(clean_logits, clean_logits.shape[0] if clean_logits.ndim == 3 else -1, reads.positions, "KLDivergence")
        rows = clean_logits.detach()[:, list(reads.positions)].float()
        if not torch.isfinite(rows).all():
            raise ValueError("clean_logits hold non-finite values at the chosen positions")
        self.clean_log_probs = torch.log_softmax(rows, dim=-1)  # [batch, n, d_vocab]
        self.per_prompt = bool(per_prompt)
        self.reads, self.batch, self.d_vocab = reads, int(clean_logits.shape[0]), int(clean_logits.shape[-1])

    def from_selected(self, selected: Union[Float[Tensor, "batch d_vocab"], Float[Tensor, "batch n d_vocab"]]) -> MetricValue:
        """``mean_p KL(clean || softmax(selected[:, p]))`` per prompt."""
        rows = selected if self.reads.position is None else selected[:, None]
        _check_rows(rows, self.batch, len(self.reads.positions), "KLDivergence")
        if rows.shape[-1] != self.d_vocab:
            raise ValueError(f"KLDivergence was built for d_vocab={self.d_vocab}, got rows of {rows.shape[-1]}")
        clean = self._tokens_at(self.clean_log_probs, rows.device)
        log_probs = torch.log_softmax(rows.float(), dim=-1)
        kl = torch.nn.functional.kl_div(log_probs, clean, log_target=True, reduction="none").sum(-1)
        return self._reduce(kl.mean(-1))

    def __repr__(self) -> str:
        return f"KLDivergence(batch={self.batch}, positions={self.reads.positions}, per_prompt={self.per_prompt})"


def _check_rows(rows: Tensor, batch: int, n: int, what: str) -> None:
    if rows.ndim != 3 or rows.shape[:2] != (batch, n):
        raise ValueError(f"{what}.from_selected expects [batch={batch}, {n} positions, d_vocab] rows, got {tuple(rows.shape)}")


def _as_value(value: Any, name: str) -> Float[Tensor, "..."]:
    try:
        out = torch.as_tensor(value).detach()
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{name} must be a number or a tensor, got {type(value).__name__}") from None
    if out.dtype == torch.bool or out.dtype.is_complex:
        raise ValueError(f"{name} must be real-valued, got dtype {out.dtype}")
    if out.ndim > 1:
        raise ValueError(f"{name} must be a scalar or a [batch] tensor, got shape {tuple(out.shape)}")
    return out.to(torch.float32).clone()


class NormalizedEffect:
    """A metric rescaled so the corrupted run scores 0 and the clean run scores 1.

    ``value = (metric(logits) - corrupted_value) / (clean_value - corrupted_value)``.

    ``metric`` is a :class:`LogitMetric` (then ``reads``/``per_prompt`` are its own and
    ``select``/``from_selected`` work, so backends may compute only the logits it reads) or any
    callable of the logits (then ``reads`` is ``None``, ``select``/``from_selected`` raise
    ``NotImplementedError`` and backends pass the full logits), or an :class:`ActivationMetric`
    (then ``activation_reads`` are its own and ``from_activations`` normalises it).

    ``clean_value``/``corrupted_value`` are scalars for a scalar metric, and ``[batch]`` tensors
    (or scalars, broadcast) for a ``per_prompt`` one. For a plain callable ``per_prompt`` is
    ``True`` when either value is ``[batch]``. The normalisation is undefined where
    ``clean_value == corrupted_value``: that raises ``ValueError``.
    """

    def __init__(
        self,
        metric: Callable[[Float[Tensor, "batch pos d_vocab"]], MetricValue],
        clean_value: Union[float, Float[Tensor, ""], Float[Tensor, "batch"]],
        corrupted_value: Union[float, Float[Tensor, ""], Float[Tensor, "batch"]],
    ):
        if not callable(metric):
            raise ValueError(f"metric must be callable, got {type(metric).__name__}")
        if isinstance(metric, NormalizedEffect):
            raise ValueError("metric is already a NormalizedEffect")
        clean = _as_value(clean_value, "clean_value")
        corrupted = _as_value(corrupted_value, "corrupted_value")
        per_prompt_values = clean.ndim == 1 or corrupted.ndim == 1
        if isinstance(metric, LogitMetric):
            self.per_prompt = metric.per_prompt
            self.reads: Optional[LogitReads] = metric.reads
            if per_prompt_values and not self.per_prompt:
                raise ValueError(
                    "clean_value/corrupted_value are [batch] tensors but the metric returns a scalar; "
                    "build the metric with per_prompt=True or pass scalars"
                )
            for name, v in (("clean_value", clean), ("corrupted_value", corrupted)):
                if v.ndim == 1 and v.shape[0] != metric.batch:
                    raise ValueError(f"{name} has {v.shape[0]} values, the metric has a batch of {metric.batch}")
        else:
            self.per_prompt = per_prompt_values
            self.reads = None
        if clean.ndim == 1 and corrupted.ndim == 1 and clean.shape != corrupted.shape:
            raise ValueError(f"clean_value {tuple(clean.shape)} and corrupted_value {tuple(corrupted.shape)} differ in shape")
        if not (torch.isfinite(clean).all() and torch.isfinite(corrupted).all()):
            raise ValueError("clean_value and corrupted_value must be finite")
        denom = clean - corrupted
        if bool((denom == 0).any()):
            where = "" if denom.ndim == 0 else f" for prompts {torch.nonzero(denom == 0).flatten().tolist()}"
            raise ValueError(
                f"clean_value equals corrupted_value{where}: the normalised effect "
                "(metric - corrupted) / (clean - corrupted) is undefined"
            )
        self.metric = metric
        self.clean_value = clean
        self.corrupted_value = corrupted
        self._denominator = denom
        self.activation_reads = tuple(getattr(metric, "activation_reads", ()) or ())
        self.reads_logits = bool(getattr(metric, "reads_logits", True))
        self.activation_positions = getattr(metric, "activation_positions", None)
        if self.activation_reads:
            self.per_prompt = bool(getattr(metric, "per_prompt", per_prompt_values))

    @classmethod
    def from_logits(
        cls,
        metric: Callable[[Float[Tensor, "batch pos d_vocab"]], MetricValue],
        clean_logits: Float[Tensor, "batch pos d_vocab"],
        corrupted_logits: Float[Tensor, "batch pos d_vocab"],
    ) -> "NormalizedEffect":
        """``NormalizedEffect(metric, metric(clean_logits), metric(corrupted_logits))``."""
        with torch.no_grad():
            return cls(metric, metric(clean_logits), metric(corrupted_logits))

    def _normalize(self, value: Tensor) -> MetricValue:
        corrupted = self.corrupted_value.to(value.device)
        denom = self._denominator.to(value.device)
        return (value.float() - corrupted) / denom

    def select(self, logits: Float[Tensor, "batch pos d_vocab"]) -> Tensor:
        """The inner metric's ``select`` (``NotImplementedError`` for a plain callable)."""
        if self.reads is None:
            raise NotImplementedError("the inner metric is a plain callable: it declares no reads; pass full logits")
        return self.metric.select(logits)

    def from_selected(self, selected: Tensor) -> MetricValue:
        """``(inner.from_selected(selected) - corrupted) / (clean - corrupted)``."""
        if self.reads is None:
            raise NotImplementedError("the inner metric is a plain callable: it declares no reads; pass full logits")
        return self._normalize(self.metric.from_selected(selected))

    def from_activations(self, logits: Float[Tensor, "batch pos d_vocab"], acts: Acts) -> MetricValue:
        """``(inner.from_activations(logits, acts) - corrupted) / (clean - corrupted)`` (an ActivationMetric inside)."""
        if not self.activation_reads:
            raise NotImplementedError("the inner metric reads no activations; call the metric on the logits")
        return self._normalize(torch.as_tensor(self.metric.from_activations(logits, acts)))

    def __call__(self, logits: Float[Tensor, "batch pos d_vocab"]) -> MetricValue:
        if self.reads is None:
            return self._normalize(torch.as_tensor(self.metric(logits)))
        return self.from_selected(self.select(logits))

    def __repr__(self) -> str:
        return f"NormalizedEffect({self.metric!r}, per_prompt={self.per_prompt})"


# ---- metrics on internal activations ------------------------------------------------------------
class ActivationMetric:
    """A metric that reads activations of the patched run as well as its logits.

    ``fn(logits, acts)`` gets each cell's ``[batch, pos, d_vocab]`` logits and ``acts``, a mapping
    from each of ``hook_names`` to that cell's ``[batch, ...]`` activation at the hook point (after
    the cell's patch, as a caching hook added after the patching hook sees it), and returns a 0-d
    value (``[batch]`` with ``per_prompt``). With ``reads_logits=False`` the metric declares that
    ``fn`` ignores its first argument: it is given ``None``, and the native backend computes no logits
    for it. With ``positions`` it declares the sequence positions at which ``fn`` reads the activations
    (an attention pattern's destination positions): the native backend then computes the last block
    at those positions only (as for the logits a metric reads) and the last block's other recomputed
    positions hold NaN, so a read of them cannot pass for a value. The stock metrics below declare
    both. ``fastpatch.patching`` gives each cell its own rows: the hook backend captures the named
    activations of its batched forward; the native backend records
    the residual stream (``hook_resid_pre/mid/post``, ``ln_final.hook_in``), ``attn.hook_pattern``,
    ``attn.hook_z``, ``mlp.hook_post`` and the block outputs (``hook_attn_out``, ``hook_mlp_out``) of
    what it recomputes, inside a patched layer too (hooks upstream of the patch hold the corrupted
    run's values, the patched one and those downstream the cell's own), and takes the corrupted run's
    elsewhere. Other hooks (e.g. ``attn.hook_q``, ``mlp.hook_pre``), or ``mlp.hook_post`` of a mixture
    of experts, make the plan run on the hook backend, with that reason (``backend="native"`` raises it).
    Attribution (``fastpatch.attribution``) takes it too: its gradient pass hands ``fn`` the
    activations with their autograd graph.

    Since TransformerLens passes a metric the logits alone, ``metric(logits)`` raises; use
    ``metric.from_activations(logits, acts)`` with a cache of your own.
    """

    def __init__(
        self,
        hook_names: Sequence[str],
        fn: Callable[[Optional[Float[Tensor, "batch pos d_vocab"]], Acts], MetricValue],
        per_prompt: bool = False,
        reads_logits: bool = True,
        positions: Optional[Sequence[int]] = None,
    ):
        if isinstance(hook_names, str):
            hook_names = [hook_names]
        names = tuple(dict.fromkeys(hook_names))
        if not names or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"hook_names must be a non-empty sequence of hook point names, got {hook_names!r}")
        if not callable(fn):
            raise ValueError(f"fn must be callable as fn(logits, acts), got {type(fn).__name__}")
        self.activation_reads = names
        self.fn = fn
        self.per_prompt = bool(per_prompt)
        self.reads_logits = bool(reads_logits)
        if positions is not None:
            positions = tuple(_as_position(p) for p in ([positions] if isinstance(positions, int) else positions))
            if not positions:
                raise ValueError("positions must name at least one sequence position (or be None: any)")
        self.activation_positions: Optional[Tuple[int, ...]] = positions

    def from_activations(self, logits: Optional[Float[Tensor, "batch pos d_vocab"]], acts: Acts) -> MetricValue:
        """The metric of one run: ``fn(logits, acts)``, ``acts`` holding every name in ``activation_reads``
        (``logits`` may be ``None`` when the metric does not read them)."""
        missing = [n for n in self.activation_reads if n not in acts]
        if missing:
            raise ValueError(f"{type(self).__name__} reads {missing}, which acts does not hold")
        return self.fn(logits, {n: acts[n] for n in self.activation_reads})

    def __call__(self, logits: Float[Tensor, "batch pos d_vocab"]) -> MetricValue:
        raise ValueError(
            f"{type(self).__name__} reads activations {list(self.activation_reads)} as well as the logits: pass it to "
            "fastpatch.patching (which captures them per cell) or call from_activations(logits, acts)"
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({list(self.activation_reads)}, per_prompt={self.per_prompt})"


def _reduce(values: Float[Tensor, "batch"], per_prompt: bool) -> MetricValue:
    values = values.float()
    return values if per_prompt else values.mean()


class AttentionTo(ActivationMetric):
    """Head ``(layer, head)``'s attention from position ``dest`` to position ``src``:
    ``acts["blocks.{layer}.attn.hook_pattern"][:, head, dest, src]`` (the mean over prompts unless ``per_prompt``)."""

    def __init__(self, layer: int, head: int, dest: int, src: int, per_prompt: bool = False):
        layer, head, dest, src = (_as_position(v) for v in (layer, head, dest, src))
        name = f"blocks.{layer}.attn.hook_pattern"
        super().__init__([name], lambda logits, acts: _reduce(acts[name][:, head, dest, src], per_prompt), per_prompt,
                         reads_logits=False, positions=[dest])
        self.layer, self.head, self.dest, self.src = layer, head, dest, src

    def __repr__(self) -> str:
        return f"AttentionTo(layer={self.layer}, head={self.head}, dest={self.dest}, src={self.src}, per_prompt={self.per_prompt})"


class NeuronValue(ActivationMetric):
    """MLP neuron ``(layer, neuron)``'s activation at ``position``:
    ``acts["blocks.{layer}.mlp.hook_post"][:, position, neuron]`` (the mean over prompts unless ``per_prompt``)."""

    def __init__(self, layer: int, neuron: int, position: int = -1, per_prompt: bool = False):
        layer, neuron, position = (_as_position(v) for v in (layer, neuron, position))
        name = f"blocks.{layer}.mlp.hook_post"
        super().__init__([name], lambda logits, acts: _reduce(acts[name][:, position, neuron], per_prompt), per_prompt,
                         reads_logits=False, positions=[position])
        self.layer, self.neuron, self.position = layer, neuron, position

    def __repr__(self) -> str:
        return f"NeuronValue(layer={self.layer}, neuron={self.neuron}, position={self.position}, per_prompt={self.per_prompt})"


class HeadDLA(ActivationMetric):
    """Head ``(layer, head)``'s direct logit attribution to ``answer - wrong`` at ``position``.

    ``value[b] = (z[b, position, head] @ W_O[layer, head])' . (w * (W_U[:, answer[b]] - W_U[:, wrong[b]])) / scale[b]``:
    the head's write through the final norm linearised at the patched run's residual (``'``: centred
    for a LayerNorm, as is ``scale = sqrt(var + eps)``; ``scale = sqrt(mean square + eps)`` for an
    RMSNorm; ``w`` the norm's weight), so the heads' values and the other components' sum to the
    logit difference up to the norm's bias. Reads ``blocks.{layer}.attn.hook_z`` and ``ln_final.hook_in``.

    Args:
        model: the model (its ``W_O``, ``W_U``, final norm weight and ``cfg.eps`` are read once).
        layer, head: the head.
        answer_tokens, wrong_tokens: ``[batch]`` token ids (``wrong_tokens=None``: the answer's logit alone).
        position: the sequence position read (default ``-1``).
        per_prompt: return ``[batch]`` instead of the mean over prompts.
    """

    def __init__(
        self,
        model: Any,
        layer: int,
        head: int,
        answer_tokens: Int[Tensor, "batch"],
        wrong_tokens: Optional[Int[Tensor, "batch"]] = None,
        position: int = -1,
        per_prompt: bool = False,
    ):
        layer, head, position = (_as_position(v) for v in (layer, head, position))
        cfg = model.cfg
        if not (0 <= layer < cfg.n_layers and 0 <= head < cfg.n_heads):
            raise ValueError(f"head ({layer}, {head}) is out of range for {cfg.n_layers} layers of {cfg.n_heads} heads")
        norm = getattr(cfg, "normalization_type", None)
        if norm not in ("LN", "RMS"):
            raise ValueError(f"HeadDLA needs a LayerNorm or RMSNorm final norm, the model has {norm!r}")
        answer = _token_ids(answer_tokens, "answer_tokens")[:, 0]
        with torch.no_grad():
            W_U = model.W_U.detach().float()
            direction = W_U[:, answer].T  # [batch, d_model]
            if wrong_tokens is not None:
                wrong = _token_ids(wrong_tokens, "wrong_tokens", batch=answer.shape[0])[:, 0]
                direction = direction - W_U[:, wrong].T
            weight = getattr(model.ln_final, "w", None)
            if weight is None:
                weight = model.ln_final.original_component.weight
            direction = direction * weight.detach().float()
            W_O = model.W_O[layer, head].detach().float()  # [d_head, d_model]
        centred, eps = norm == "LN", float(cfg.eps)
        z_name, resid_name = f"blocks.{layer}.attn.hook_z", "ln_final.hook_in"

        def dla(logits: Tensor, acts: Acts) -> MetricValue:
            z = acts[z_name][:, position, head].float()
            write = z @ W_O.to(z.device)
            resid = acts[resid_name][:, position].float()
            if centred:
                write = write - write.mean(-1, keepdim=True)
                resid = resid - resid.mean(-1, keepdim=True)
            scale = (resid.pow(2).mean(-1) + eps).sqrt()
            return _reduce((write * direction.to(write.device)).sum(-1) / scale, per_prompt)

        super().__init__([z_name, resid_name], dla, per_prompt, reads_logits=False, positions=[position])
        self.layer, self.head, self.position = layer, head, position

    def __repr__(self) -> str:
        return f"HeadDLA(layer={self.layer}, head={self.head}, position={self.position}, per_prompt={self.per_prompt})"
