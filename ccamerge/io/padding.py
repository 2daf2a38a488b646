"""Padded token data: how a padded position travels through ccamerge and reaches a model.

A data file's ``attention_mask`` (1: a real token, 0: padding) is folded into its
``input_ids`` when the file is read: a padded position holds :data:`PAD`, which no
token id can be (ids are >= 0). A batch is then still one tensor, cut, shuffled and
streamed like any other, and every step that turns a model's per-position values into
rows (the statistics, the refit, evaluation, the check, distillation) keeps only the
rows of real positions (:func:`real_rows`, :func:`next_token_pairs`).

A model that takes an attention mask (a Hugging Face ``transformers`` model) gets a
forward pre-hook (:func:`accept_padding`) that turns such a batch back into what it
was trained with: ``input_ids`` with the padded positions set to the config's
``pad_token_id`` (0 without one) and ``attention_mask``. Other models never see a
padded batch: the data is refused before they run (:func:`accepts_padding`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

PAD = -1  # the token id of a padded position inside ccamerge


def padded(x: torch.Tensor) -> bool:
    """Whether ``x`` is a batch of token ids with padded positions."""
    return x.dtype == torch.int64 and bool((x == PAD).any())


def real_positions(x: torch.Tensor) -> torch.Tensor | None:
    """``(batch, length)`` booleans, True at real tokens, of a padded batch of token ids;
    None when ``x`` has no padding (every row counts)."""
    return (x != PAD) if x.ndim == 2 and padded(x) else None


def real_rows(values: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    """``values`` of one position each, ``(batch, length, ...)`` or flattened to
    ``(batch * length, d)`` (OPT's MLP), at the real ``positions`` only, as ``(rows,
    ...)``; unchanged without padding or when ``values`` is not per position (a pooled
    ``(batch, d)`` output, a classifier's logits)."""
    if positions is None:
        return values
    if values.ndim == 2 and positions.shape[1] > 1 and values.shape[0] == positions.numel():
        return values[positions.reshape(-1)]
    if values.ndim < 3 or values.shape[:2] != positions.shape:
        return values
    return values[positions]


def drop_padded(values: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    """:func:`real_rows` kept as the positions of one sample, ``(1, rows, ...)``, for
    statistics that count every position of ``(batch, length, ..., d)`` values as a
    sample (in the values' own precision, as for unpadded batches); ``values`` itself
    when nothing is dropped."""
    rows = real_rows(values, positions)
    return values if rows is values else rows[None]


def next_token_pairs(x: torch.Tensor) -> torch.Tensor:
    """``(batch, length - 1)`` booleans: the positions whose token and next token are
    both real, i.e. the next-token predictions that are scored."""
    real = x != PAD
    return real[:, :-1] & real[:, 1:]


def _with_attention_mask(module: nn.Module, args: tuple, kwargs: dict) -> Any:
    if not args or not isinstance(args[0], torch.Tensor) or "attention_mask" in kwargs:
        return None
    positions = real_positions(args[0])
    if positions is None:
        return None
    pad_id = getattr(getattr(module, "config", None), "pad_token_id", None) or 0
    ids = args[0].masked_fill(~positions, int(pad_id))
    return (ids, *args[1:]), {**kwargs, "attention_mask": positions.to(torch.int64)}


def accept_padding(model: nn.Module) -> nn.Module:
    """``model`` (its forward takes ``attention_mask``) made to take padded batches."""
    if not accepts_padding(model):
        model.register_forward_pre_hook(_with_attention_mask, with_kwargs=True)
    return model


def accepts_padding(model: nn.Module) -> bool:
    return any(h is _with_attention_mask for h in model._forward_pre_hooks.values())
