"""Pooling a plan's compressed tensors into decode groups (`ticketc.export.storage` picks each
tensor's codec first).

Each decode group costs bytes beyond its streams (its decoder's nodes, a row of each table
per tensor) and session time (onnxruntime folds its ~30 nodes), so a codec or a Rice
parameter that saves fewer bytes than that is merged into a neighbour, or its tensors go back
to the graph as they were; dense tensors ride in the dense tail of a group with positions.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ticketc.export.decoder import decoder_nbytes, decodes_by_gather
from ticketc.formats import rice
from ticketc.formats.compact_values import value_kind_of

__all__ = [
    "TENSOR_COST",
    "Option",
    "float_kind",
    "merge_codecs_",
    "merge_rice_k_",
    "pool",
]

# Bytes a stored form costs beyond its arrays, as measured in written files:
TENSOR_COST = 40  # per tensor in a group: its Reshape node and its rows of the group's tables
# per group beyond its decoder's bytes: ~30 nodes that onnxruntime folds at session creation
# (~15 us each), weighed as bytes so that a group must save at least this much to exist
GROUP_COST = 400
TAIL_COST = 120  # a dense tail in a group: its Range and Concat nodes and their constants
TAIL_HOSTS = ("rice", "bitmask")  # positions kinds whose groups take a dense tail
# Most elements in one group: a group decodes to one flat tensor at session creation, and int64
# index temporaries of ~8 B per entry; this bounds that transient memory to ~2 GB.
MAX_GROUP_NUMEL = 2**27
# A tensor this large decodes in a group of its own where its stored bytes dwarf a decoder's
# (ALONE_PAYLOAD x its cost): a group with one tensor needs no Split, which would copy every
# element once more when onnxruntime folds the decode. A gather decode (decodes_by_gather)
# folds its whole group in one piece, each pass over all its elements, where a scatter
# decodes in blocks (decoder.BLOCK_NUMEL): there, tensors from ALONE_NUMEL_GATHER elements
# on go alone (regnet_x_400mf at 50 %, 72 tensors in one group -> 38 groups: session
# creation 123 -> 85 ms in one process, 171 -> 147 ms fresh, for 0.1 % more bytes).
ALONE_NUMEL = 2**18
ALONE_NUMEL_GATHER = 2**15
ALONE_PAYLOAD = 20


@dataclass(frozen=True)
class Option:
    """One way to store one tensor: its codec and the bytes it costs there."""

    positions: str
    values: str
    rice_k: int  # 0 unless positions == "rice"
    nbytes: int


def float_kind(array: np.ndarray) -> str | None:
    """The float value kind of `array` (\"fp32\", ...), None when the codec cannot store it."""
    try:
        return value_kind_of(array.dtype)
    except ValueError:
        return None


@functools.lru_cache(maxsize=64)
def _group_cost(positions_kind: str, values_kind: str) -> int:
    """Bytes-equivalent of one more decode group: its decoder's nodes, plus GROUP_COST for
    the session time its ~30 nodes take to fold."""
    return decoder_nbytes(positions_kind, values_kind) + GROUP_COST


def merge_codecs_(
    chosen: dict[str, Option], options: dict[str, list[Option]], raw: Mapping[str, int]
) -> None:
    """Drop a codec (decoder function) when moving its tensors elsewhere costs less than it:
    to another codec in use, or back to the graph as they are (`raw`: their bytes there), so
    a codec that saves fewer bytes than its decoder costs is not written beside another (a
    last codec left stays: whether a lone group pays for its decoder is not weighed here)."""
    while True:
        used = {(o.positions, o.values) for o in chosen.values()}
        if len(used) <= 1:
            return
        # the codecs with their Rice k as chosen: a dense tensor moved into a rice group pays
        # that group's k, not its own best (k = 1 for a dense run), once the ks are merged
        coded = {(o.positions, o.values, o.rice_k) for o in chosen.values()}
        best_move: tuple[int, dict[str, Option | None]] | None = None
        for codec in used:
            others = used - {codec}
            hosted = _host(codec, used)
            moved: dict[str, Option | None] = {}  # None: kept as the graph holds it
            extra = 0
            for name, option in chosen.items():
                if (option.positions, option.values) != codec:
                    continue
                alternatives = [
                    o
                    for o in options[name]
                    if (o.positions, o.values) in others
                    and (not hosted or (o.positions, o.values, o.rice_k) in coded)
                ]
                alt = min(alternatives, key=lambda o: o.nbytes, default=None)
                kept = raw[name] - TENSOR_COST  # a kept tensor has no Reshape or table rows
                if alt is None or kept <= alt.nbytes:
                    moved[name], extra = None, extra + kept - option.nbytes
                else:
                    moved[name], extra = alt, extra + alt.nbytes - option.nbytes
            # kind cost in the default out type is close enough for a decision; dense
            # tensors beside a host codec ride in its dense tail and cost no group
            saving = TAIL_COST if hosted else _group_cost(*codec)
            if extra < saving and (best_move is None or extra - saving < best_move[0]):
                best_move = (extra - saving, moved)
        if best_move is None:
            return
        for name, alt in best_move[1].items():
            if alt is None:
                del chosen[name]
            else:
                chosen[name] = alt


def _host(codec: tuple[str, str], used: set[tuple[str, str]]) -> bool:
    """Whether a dense codec's tensors have a group in `used` to join as a dense tail."""
    positions_kind, values_kind = codec
    return positions_kind == "dense" and any((p, values_kind) in used for p in TAIL_HOSTS)


def merge_rice_k_(
    chosen: dict[str, Option], options: dict[str, list[Option]], arrays: Mapping[str, np.ndarray]
) -> None:
    """Give tensors of one rice codec a common k where a separate group would cost more."""
    by_codec: dict[tuple[str, str, str], list[str]] = {}
    for name, option in chosen.items():
        if option.positions == "rice":
            kind = float_kind(arrays[name]) or "fp32"
            by_codec.setdefault((option.values, kind, ""), []).append(name)
    for names in by_codec.values():
        values_kind = chosen[names[0]].values

        def cost(k: int, members: list[str], v: str = values_kind) -> int:
            return sum(
                next(
                    o.nbytes
                    for o in options[n]
                    if o.positions == "rice" and o.values == v and o.rice_k == k
                )
                for n in members
            )

        clusters = sorted(
            (
                {
                    chosen[n].rice_k: [m for m in names if chosen[m].rice_k == chosen[n].rice_k]
                    for n in names
                }
            ).items()
        )
        merged = True
        while merged and len(clusters) > 1:
            merged = False
            best = None
            for i in range(len(clusters) - 1):
                (ka, a), (kb, b) = clusters[i], clusters[i + 1]
                both = a + b
                k = min(range(1, rice.MAX_K + 1), key=lambda k: cost(k, both))
                extra = cost(k, both) - cost(ka, a) - cost(kb, b)
                if extra < _group_cost("rice", values_kind) and (best is None or extra < best[0]):
                    best = (extra, i, k, both)
            if best is not None:
                _, i, k, both = best
                clusters[i : i + 2] = [(k, both)]
                merged = True
        for k, members in clusters:
            for n in members:
                chosen[n] = next(
                    o
                    for o in options[n]
                    if o.positions == "rice" and o.values == values_kind and o.rice_k == k
                )


def pool(
    chosen: Mapping[str, Option], arrays: Mapping[str, np.ndarray]
) -> list[tuple[tuple[str, str, str, int], list[str], int]]:
    """Tensors pooled by codec, output type and Rice k, split where a group grows too large;
    then each dense tensor appended, as part of its dense tail, to the smallest group of its
    values and output type with positions (TAIL_HOSTS) that has room, or pooled in
    dense groups where none has. Each item: (key, names, how many of the last are the tail)."""
    pooled: dict[tuple[str, str, str, int], list[str]] = {}
    for name, option in chosen.items():
        kind = float_kind(arrays[name]) or "fp32"
        pooled.setdefault((option.positions, option.values, kind, option.rice_k), []).append(name)
    out: list[tuple[tuple[str, str, str, int], list[str], int]] = []
    for key, names in pooled.items():
        if key[0] != "dense":
            out += [(key, part, 0) for part in _split(key, names, chosen, arrays)]
    for key, names in pooled.items():
        if key[0] != "dense":
            continue
        hosts = [i for i, (k, _, _) in enumerate(out) if k[0] in TAIL_HOSTS and k[1:3] == key[1:3]]
        size = {i: sum(arrays[n].size for n in out[i][1]) for i in hosts}
        rest: list[str] = []
        for name in names:
            fits = [i for i in hosts if size[i] + arrays[name].size <= MAX_GROUP_NUMEL]
            if not fits:
                rest.append(name)
                continue
            i = min(fits, key=size.__getitem__)
            host_key, members, tail = out[i]
            out[i] = (host_key, [*members, name], tail + 1)
            size[i] += arrays[name].size
        out += [(key, part, 0) for part in _split(key, rest, chosen, arrays)]
    return out


def _split(
    key: tuple[str, str, str, int],
    names: list[str],
    chosen: Mapping[str, Option],
    arrays: Mapping[str, np.ndarray],
) -> list[list[str]]:
    """One codec's tensors in groups: a large tensor whose bytes dwarf a decoder's alone, the
    rest in order, up to MAX_GROUP_NUMEL elements each."""
    cost = _group_cost(key[0], key[1])
    least = ALONE_NUMEL_GATHER if decodes_by_gather(key[0], key[1]) else ALONE_NUMEL
    alone = [
        n for n in names if arrays[n].size >= least and chosen[n].nbytes >= ALONE_PAYLOAD * cost
    ]
    parts = [[n] for n in alone]
    part: list[str] = []
    size = 0
    for name in (n for n in names if n not in alone):
        if part and size + arrays[name].size > MAX_GROUP_NUMEL:
            parts.append(part)
            part, size = [], 0
        part.append(name)
        size += arrays[name].size
    return parts + ([part] if part else [])
