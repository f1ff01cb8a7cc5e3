"""Result types of a comparison: plain dataclasses, no I/O (the CSV lives in report/)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

COMPARED, UNPAIRED, SKIPPED, SUSPECT = "compared", "unpaired", "skipped", "mapping_suspect"


@dataclass
class Row:
    """One compared tensor pair (or one unpaired/skipped op) of one token."""

    token_id: int | None
    data_id: int
    order: int  # completion order of the ATB op (a graph op completes after its parts); -1 for torch-only rows
    rank: str = ""  # "{device}_{pid}" of the ATB dump
    atb_op: str = ""  # rel_dir under the token dir, e.g. "3_LlamaLayer/8_RmsNormOperation"
    atb_op_name: str = ""
    my_op_type: str = ""
    torch_module: str = ""
    golden_op_type: str = ""
    golden_path: str = ""
    my_path: str = ""
    rule: str = ""
    metrics: Any = None  # compare.metrics.PairMetrics
    input_metrics: dict[str, float] | None = None
    effective: dict[str, float] = field(default_factory=dict)
    bounds: dict[str, float] = field(default_factory=dict)
    breaches: list = field(default_factory=list)  # compare.tolerance.Breach
    status: str = COMPARED
    passed: bool | None = None
    first_divergence: bool = False
    propagated: bool = False
    reason: str = ""  # cmp_fail_reason: why metrics are missing, or why the op is unpaired/skipped
    note: str = ""
    extra: dict = field(default_factory=dict)  # exact integer comparison (compare/exact.py), output-check values

    @property
    def breached(self) -> bool:
        return self.status == COMPARED and self.passed is False

    def metric(self, name: str) -> float:
        if self.metrics is None:
            return math.nan
        return self.metrics.values.get(name, math.nan)

    @property
    def where(self) -> str:
        """How a person names this row: ATB op path <-> torch module, token."""
        return f"{self.atb_op or '-'} <-> {self.torch_module or '-'} (token {self.token_id})"

    def breach_text(self) -> str:
        parts = [str(b) for b in self.breaches]
        if self.reason and self.status == COMPARED:
            parts.insert(0, self.reason)
        return "; ".join(parts)


@dataclass
class CompareResult:
    rows: list[Row]
    unpaired: list  # mapping.pairing.Unpaired
    tolerance: Any = None
    csv_path: Path | None = None
    golden_root: str = ""
    my_root: str = ""
    tokens: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # run-level remarks, e.g. a mapping file that was not needed
    output: Any = None  # compare.output_check.OutputCheck: logits and greedy tokens, judged beside the ops
    golden_label: str = "torch"  # how messages name the sides: "A" and "B" unless torch vs ATB
    my_label: str = "ATB"

    @property
    def compared(self) -> list[Row]:
        return [r for r in self.rows if r.status == COMPARED]

    @property
    def breaches(self) -> list[Row]:
        return [r for r in self.rows if r.breached]

    @property
    def passed(self) -> bool:
        """No breach, and something was compared: a comparison of nothing never passes silently."""
        return bool(self.compared) and not self.breaches and self.output_passed is not False

    @property
    def output_passed(self) -> bool | None:
        return None if self.output is None else self.output.passed

    @property
    def first_divergence(self) -> Row | None:
        return next((r for r in self.rows if r.first_divergence), None)

    def worst(self, n: int = 10) -> list[Row]:
        """The n compared rows with the largest relative euclidean distance (failures first)."""
        def key(r: Row):
            red = r.metric("relative_euclidean_distance")
            return (not r.breached, -(red if not math.isnan(red) else math.inf))
        return sorted(self.compared, key=key)[:n]

    def summary(self) -> str:
        compared = self.compared
        lines = self.output.lines() if self.output is not None else []
        lines += [
            f"pairs compared: {len(compared)} over {len(self.tokens)} token(s); "
            f"breaches: {len(self.breaches)}; unpaired ops: {sum(1 for u in self.unpaired if u.side == 'atb')} "
            f"{self.my_label}, {sum(1 for u in self.unpaired if u.side == 'torch')} {self.golden_label}",
        ]
        first = self.first_divergence
        rank = (lambda r: f" [{r.rank}]") if len({r.rank for r in compared}) > 1 else (lambda r: "")  # TP: which
        if first is not None:
            lines.append(f"first divergence: {first.where}{rank(first)}: {first.breach_text()}")
        worst = [r for r in self.worst(5) if r.metrics is not None]
        if worst:
            lines.append("worst ops (relative euclidean distance, cosine):")
            for r in worst:
                lines.append(f"  {r.metric('relative_euclidean_distance'):.3g}  {r.metric('cosine_similarity'):.6f}  {r.where}"
                             + rank(r) + ("  BREACH" if r.breached else ""))
        lines.extend(f"note: {n}" for n in self.notes)
        if self.csv_path:
            lines.append(f"report: {self.csv_path}")
        return "\n".join(lines)

    def failure_message(self) -> str:
        first = self.first_divergence
        output = self.output.lines() if self.output_passed is False else []
        if output and first is None:  # every op passed: what the user sees differs
            return "\n".join(output + ([f"report: {self.csv_path}"] if self.csv_path else []))
        if output:  # the root cause first, then what it did to the output
            return self._op_failure_message() + "\n" + "\n".join(output)
        return self._op_failure_message()

    def _op_failure_message(self) -> str:
        first = self.first_divergence
        if first is None and not self.compared:
            reasons = sorted({r.reason for r in self.rows if r.status == UNPAIRED and r.token_id is not None
                              or r.reason.startswith("rank not compared")})
            return ("nothing was compared: no tensor pair of the two dumps could be compared"
                    + (f" ({'; '.join(reasons[:3])})" if reasons else f" (tokens compared: {self.tokens or 'none'})"))
        if first is None:
            return "no breach"
        lines = [f"first divergent op: {first.atb_op} ({first.atb_op_name}, {first.my_op_type}) "
                 f"<-> {self.golden_label} {first.torch_module} ({first.golden_op_type}), token {first.token_id}"
                 + (f" [{first.rank}]" if len({r.rank for r in self.compared}) > 1 else "")]  # ranks: which one
        if first.reason:
            lines.append(f"  {first.reason}")
        for b in first.breaches:
            lines.append(f"  {b}")
        propagated = [r for r in self.breaches if r.propagated]
        if propagated:
            lines.append(f"then {len(propagated)} later breach(es), marked propagated, e.g. {propagated[0].where}")
        n_atb = sum(1 for u in self.unpaired if u.side == "atb")
        if n_atb:
            lines.append(f"{n_atb} {self.my_label} op(s) unpaired (see the CSV, status=unpaired)")
        if self.csv_path:
            lines.append(f"report: {self.csv_path}")
        return "\n".join(lines)
