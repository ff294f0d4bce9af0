"""Split by function: stages follow the model's own structure, as a DAG.

1. Every node gets a function key: the first ``--group NAME=REGEX`` whose regex matches its
   name, else its Keras layer (the first name-scope component under the scopes that all
   nodes share), else a key of its own.
2. Nodes are placed, in topological order, into the current segment of their key unless
   that would make the segments depend on each other in a cycle (then the key starts a
   new segment): the segment graph is always a DAG.
3. Straight chains of layer segments are merged (a segment with one successor whose only
   predecessor it is), so what remains are the parallel branches between a fork and a
   join, each a stage, and the forks and joins themselves. User groups are kept as given.
4. A segment edge that carries a tensor without a batch dimension is merged away when that
   keeps the DAG acyclic; ``max_stages`` then merges the cheapest neighbours until at
   most that many stages remain.
"""

from __future__ import annotations

import heapq
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from converter.costs import CostModel
from converter.export import sanitize
from converter.extract import StageDraft
from converter.graph import Analysis
from conveyor.errors import SplitError

log = logging.getLogger(__name__)


@dataclass
class _Segment:
    key: str
    nodes: list[int]
    pinned: bool
    keys: list[str] = field(default_factory=list)


def parse_groups(specs: Sequence[str]) -> list[tuple[str, re.Pattern[str]]]:
    """``NAME=REGEX`` strings -> compiled groups (SplitError on a malformed one)."""
    groups: list[tuple[str, re.Pattern[str]]] = []
    for spec in specs:
        name, sep, pattern = spec.partition("=")
        if not sep or not name or not pattern:
            raise SplitError(f"group {spec!r} is not NAME=REGEX")
        try:
            groups.append((name, re.compile(pattern)))
        except re.error as exc:
            raise SplitError(f"group {name!r}: invalid regex {pattern!r}: {exc}") from exc
    return groups


def function_keys(analysis: Analysis,
                  groups: Sequence[tuple[str, re.Pattern[str]]] = ()) -> list[tuple[str, bool]]:
    """(key, pinned) per node; pinned keys come from user groups."""
    names = [node.name for node in analysis.nodes]
    matched = {g: 0 for g, _ in groups}
    scoped = [n.split("/") for n in names]
    multi = [p for p in scoped if len(p) > 1]
    common = 0
    if multi:
        first = multi[0]
        while common < len(first) - 1 and all(
            len(p) > common + 1 and p[common] == first[common] for p in multi
        ):
            common += 1
    keys: list[tuple[str, bool]] = []
    for k, (name, parts) in enumerate(zip(names, scoped, strict=True)):
        group = next((g for g, rx in groups if rx.search(name)), None)
        if group is not None:
            matched[group] += 1
            keys.append((group, True))
        elif len(parts) > common + 1:
            keys.append((parts[common], False))
        else:
            keys.append((f"#{k}", False))
    _shared_preprocessing(analysis, keys)
    unmatched = [g for g, count in matched.items() if count == 0]
    if unmatched:
        raise SplitError(
            f"group(s) {', '.join(unmatched)} match no node name "
            f"(names look like {names[0]!r}, {names[len(names) // 2]!r})"
        )
    return keys


def _shared_preprocessing(analysis: Analysis, keys: list[tuple[str, bool]]) -> None:
    """Nodes that read model inputs only and feed several keys get a key of their own.

    tf2onnx names the layout Transpose that two towers share after one of them
    (``towerB_.../convolution__6``); left in that tower, the other one would wait for it.
    """
    readers: dict[str, set[str]] = {}
    for v, reads in enumerate(analysis.reads):
        for x in reads:
            readers.setdefault(x, set()).add(keys[v][0])
    for v, node in enumerate(analysis.nodes):
        if any(x in analysis.producer for x in analysis.reads[v]):
            continue
        fed = set().union(*(readers.get(o, set()) for o in node.output))
        if len(fed) > 1:
            keys[v] = ("input", False)


class _SegmentGraph:
    def __init__(self) -> None:
        self.segs: dict[int, _Segment] = {}
        self.succ: dict[int, set[int]] = {}
        self.pred: dict[int, set[int]] = {}
        self._next = 0

    def add(self, seg: _Segment) -> int:
        sid = self._next
        self._next += 1
        self.segs[sid] = seg
        self.succ[sid], self.pred[sid] = set(), set()
        return sid

    def link(self, a: int, b: int) -> None:
        if a != b:
            self.succ[a].add(b)
            self.pred[b].add(a)

    def reaches(self, a: int, b: int, *, skip_direct: bool = False) -> bool:
        """Is there a path a -> ... -> b (with skip_direct: other than the edge a -> b)?"""
        stack = [s for s in self.succ[a] if not (skip_direct and s == b)]
        seen = set(stack)
        while stack:
            s = stack.pop()
            if s == b:
                return True
            for t in self.succ[s]:
                if t not in seen:
                    seen.add(t)
                    stack.append(t)
        return False

    def can_merge(self, a: int, b: int) -> bool:
        if b in self.succ[a]:
            return not self.reaches(a, b, skip_direct=True)
        if a in self.succ[b]:
            return not self.reaches(b, a, skip_direct=True)
        return not self.reaches(a, b) and not self.reaches(b, a)

    def merge(self, a: int, b: int) -> None:
        """Fold b into a."""
        sa, sb = self.segs[a], self.segs.pop(b)
        sa.nodes.extend(sb.nodes)
        sa.keys.extend(sb.keys)
        for s in self.succ.pop(b):
            self.pred[s].discard(b)
            self.link(a, s)
        for p in self.pred.pop(b):
            self.succ[p].discard(b)
            self.link(p, a)
        self.succ[a].discard(a)
        self.pred[a].discard(a)

    def order(self) -> list[int]:
        indeg = {s: len(p) for s, p in self.pred.items()}
        heap = [(min(self.segs[s].nodes), s) for s, d in indeg.items() if d == 0]
        heapq.heapify(heap)
        out: list[int] = []
        while heap:
            _, s = heapq.heappop(heap)
            out.append(s)
            for t in self.succ[s]:
                indeg[t] -= 1
                if indeg[t] == 0:
                    heapq.heappush(heap, (min(self.segs[t].nodes), t))
        return out


def split_by_function(
    analysis: Analysis,
    costs: CostModel,
    *,
    groups: Sequence[tuple[str, re.Pattern[str]]] = (),
    max_stages: int | None = None,
) -> list[StageDraft]:
    if max_stages is not None and max_stages < 1:
        raise SplitError(f"the number of stages must be at least 1, got {max_stages}")
    keys = function_keys(analysis, groups)
    graph = _segments(analysis, keys)
    _merge_chains(graph)
    _merge_unbatched_edges(analysis, graph)
    if max_stages is not None:
        _coarsen(analysis, costs, graph, max_stages)
    drafts = []
    for i, sid in enumerate(graph.order()):
        seg = graph.segs[sid]
        distinct = list(dict.fromkeys(seg.keys))
        group = distinct[0] if len(distinct) == 1 else f"{distinct[0]}..{distinct[-1]}"
        label = sanitize(distinct[0].lstrip("#"))[:40]
        drafts.append(StageDraft(f"stage{i}_{label}", tuple(sorted(seg.nodes)), group))
    return drafts


def _segments(analysis: Analysis, keys: Sequence[tuple[str, bool]]) -> _SegmentGraph:
    graph = _SegmentGraph()
    seg_of: dict[int, int] = {}
    current: dict[str, int] = {}
    for v, (key, pinned) in enumerate(keys):
        if v in analysis.floating:  # recomputed where read: in no segment of its own
            continue
        preds = {seg_of[analysis.producer[x]] for x in analysis.reads[v]
                 if x in analysis.producer}
        sid = current.get(key)
        if sid is None or any(t != sid and graph.reaches(sid, t) for t in preds):
            sid = graph.add(_Segment(key, [], pinned, [key]))
            current[key] = sid
        graph.segs[sid].nodes.append(v)
        seg_of[v] = sid
        for t in preds:
            graph.link(t, sid)
    return graph


def _merge_chains(graph: _SegmentGraph) -> None:
    changed = True
    while changed:
        changed = False
        for a in list(graph.segs):
            if a not in graph.segs or graph.segs[a].pinned or len(graph.succ[a]) != 1:
                continue
            (b,) = graph.succ[a]
            if graph.segs[b].pinned or len(graph.pred[b]) != 1:
                continue
            graph.merge(a, b)
            changed = True


def _merge_unbatched_edges(analysis: Analysis, graph: _SegmentGraph) -> None:
    seg_of = {v: sid for sid, seg in graph.segs.items() for v in seg.nodes}
    for _ in range(len(graph.segs)):
        bad = None
        for v, reads in enumerate(analysis.reads):
            if v in analysis.floating:
                continue
            for x in reads:
                p = analysis.producer.get(x)
                if p is not None and seg_of[p] != seg_of[v] and not analysis.info(x).cuttable:
                    bad = (seg_of[p], seg_of[v], x)
                    break
            if bad:
                break
        if bad is None:
            return
        a, b, tensor = bad
        if not graph.can_merge(a, b):
            log.warning("tensor %r without a batch dimension crosses from stage %s to %s",
                        tensor, graph.segs[a].key, graph.segs[b].key)
            return
        graph.merge(a, b)
        for v in graph.segs[a].nodes:
            seg_of[v] = a


def _coarsen(analysis: Analysis, costs: CostModel, graph: _SegmentGraph, k: int) -> None:
    def cost(s: int) -> float:
        return sum(costs.node_seconds[v] for v in graph.segs[s].nodes)

    while len(graph.segs) > k:
        pairs = sorted(
            ((cost(a) + cost(b), a, b) for a in graph.segs for b in graph.succ[a]),
        )
        merged = False
        for _, a, b in pairs:
            if graph.can_merge(a, b):
                graph.merge(a, b)
                merged = True
                break
        if not merged:
            # no neighbours left to merge: fold the two cheapest independent segments
            cheap = sorted(graph.segs, key=cost)
            pair = next(((a, b) for i, a in enumerate(cheap) for b in cheap[i + 1 :]
                         if graph.can_merge(a, b)), None)
            if pair is None:
                raise SplitError(f"cannot merge the function split down to {k} stages")
            graph.merge(*pair)
