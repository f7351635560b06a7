"""Local N:M layer masks: the depth is cut into consecutive groups of M layers, each keeping N.

A "groups" list [[N1, M1], [N2, M2], ...] allows mixed groups (e.g. 28 -> 19 as five 3:4 and two 2:4).
"""
import itertools
import json

import torch

from ..errors import UserError


def candidate_masks(n, m):
    """All C(m, n) local masks as a (C, m) 0/1 float tensor, in lexicographic order of kept positions."""
    rows = []
    for kept in itertools.combinations(range(m), n):
        row = [0.0] * m
        for k in kept:
            row[k] = 1.0
        rows.append(row)
    return torch.tensor(rows)


def parse_scheme(text, depth):
    """'1:2' over a depth-12 model -> [[1, 2]] * 6."""
    try:
        n, m = (int(v) for v in text.split(":"))
    except ValueError:
        raise UserError(f"--scheme must look like N:M (e.g. 1:2), got {text!r}") from None
    if n <= 0 or m <= 0:
        raise UserError(f"--scheme {text}: N and M must be positive")
    if n > m:
        raise UserError(f"--scheme {text}: N must not exceed M")
    if depth % m:
        raise UserError(f"--scheme {text}: M={m} does not divide the depth {depth}")
    return [[n, m]] * (depth // m)


def parse_groups(text, depth):
    """'[[2,4],[3,4],...]' -> list of [N, M]; their M must sum to the depth."""
    try:
        groups = json.loads(text)
        groups = [[int(n), int(m)] for n, m in groups]
    except (ValueError, TypeError):
        raise UserError(f"--groups must be a JSON list of [N, M] pairs, got {text!r}") from None
    if not groups:
        raise UserError("--groups is empty")
    for n, m in groups:
        if n <= 0 or m <= 0:
            raise UserError(f"--groups: [{n}, {m}] must have positive N and M")
        if n > m:
            raise UserError(f"--groups: [{n}, {m}] keeps more layers than the group has")
    if sum(m for _, m in groups) != depth:
        raise UserError(f"--groups: group sizes sum to {sum(m for _, m in groups)}, the depth is {depth}")
    return groups


def group_starts(groups):
    starts, s = [], 0
    for _, m in groups:
        starts.append(s)
        s += m
    return starts


def kept_from_choices(groups, choices):
    """Source layer indices kept when group k picks candidate choices[k]."""
    kept = []
    for (n, m), start, c in zip(groups, group_starts(groups), choices):
        row = candidate_masks(n, m)[c]
        kept += [start + i for i in range(m) if row[i] > 0]
    return kept
