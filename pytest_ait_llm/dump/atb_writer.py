"""Write a genuine ATB-layout dump from Python, honouring the same ATB_* variables as the ATB dump probe.

Without an NPU there is no ATB to dump; this writer lets a CPU "port" (and the tests) produce exactly the files
the probe would: ``tensors/{device}_{pid}/{token}/{rel_dir}/before|after/intensorN.bin|outtensorN.bin`` plus the
topology under ``model/{pid}/`` and ``layer/{pid}/``, so everything downstream is exercised on real layouts.
"""
from __future__ import annotations

import json
import os
import re
import time as time_mod
from pathlib import Path, PurePosixPath
from typing import Any, Mapping, Sequence

from ..errors import AitLlmError, FormatError
from ..formats.atb_bin import write_bin
from ..formats.atb_topology import parse_topology
from ..formats.safe_io import atomic_write_text

#: -time values: 0 before, 1 after (ait default), 2 both, 3 inputs before/ + outputs after/ (msit default).
TIME_BEFORE, TIME_AFTER, TIME_BOTH, TIME_IN_BEFORE_OUT_AFTER = 0, 1, 2, 3
#: -stp values: 0 inputs, 1 outputs, 2 both.
PART_IN, PART_OUT, PART_BOTH = 0, 1, 2

_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
_TIMESTAMP = re.compile(r"[0-9]{8}_[0-9]{6}")


def parse_token_range(text: str, variable: str = "ATB_SAVE_TENSOR_RANGE") -> tuple[tuple[int, int], ...]:
    """``"3,5,7,7"`` -> ``((3, 5), (7, 7))``: inclusive pairs of execution rounds (``-er``)."""
    parts = [s.strip() for s in str(text).split(",")]
    problem = None
    if len(parts) % 2 or not all(_digits(s) for s in parts):
        problem = "expected comma-separated inclusive pairs of non-negative integers"
    else:
        pairs = tuple((int(parts[i]), int(parts[i + 1])) for i in range(0, len(parts), 2))
        if any(lo > hi for lo, hi in pairs):
            problem = "a pair has its start after its end"
    if problem:
        raise AitLlmError(f"{variable}={text!r}: {problem}, like '0,0' or '3,5,7,7'")
    return pairs


def _digits(text: str) -> bool:
    return bool(re.fullmatch(r"[0-9]+", text))


def _env_choice(env: Mapping[str, str], name: str, allowed: Sequence[int], default: int) -> int:
    raw = env.get(name)
    if raw is None or not raw.strip():
        return default
    if not _digits(raw.strip()) or int(raw) not in allowed:
        raise AitLlmError(f"{name}={raw!r}: expected one of {', '.join(map(str, allowed))}")
    return int(raw)


def _env_int(env: Mapping[str, str], name: str, *, minimum: int) -> int | None:
    raw = env.get(name)
    if raw is None or not raw.strip():
        return None
    if not _digits(raw.strip()) or int(raw) < minimum:
        raise AitLlmError(f"{name}={raw!r}: expected an integer >= {minimum}")
    return int(raw)


def _check_rel_dir(rel_dir: str) -> PurePosixPath:
    rel = PurePosixPath(str(rel_dir).replace("\\", "/"))
    if not rel.parts or rel.is_absolute() or any(part in ("..", ".") for part in rel.parts):
        raise AitLlmError(f"rel_dir {rel_dir!r}: expected a relative op folder path like '3_BloomLayer/0_LinearOperation'")
    return rel


class AtbDumpWriter:
    """Writes tensors and topologies where (and as) the ATB dump probe would.

    ``token_range`` holds inclusive (first, last) round pairs; ``time`` and ``part`` are the ``-time``/``-stp``
    options (see TIME_* / PART_*); ``layout`` "ait" writes under ``{output_dir}/ait_dump``, "msit" under
    ``{output_dir}/msit_dump_{%Y%m%d_%H%M%S}`` (fixed at construction, so one run lands in one root).
    ``save_tensor=False`` is the description-only mode: topologies are written, tensors are not.
    """

    def __init__(self, output_dir: str | os.PathLike, *, model_name: str, pid: int | None = None, device_id: int = 0,
                 save_tensor: bool = True, token_range: Sequence[tuple[int, int]] = ((0, 0),), time: int = TIME_AFTER,
                 part: int = PART_BOTH, layout: str = "ait", timestamp: str | None = None):
        if time not in (TIME_BEFORE, TIME_AFTER, TIME_BOTH, TIME_IN_BEFORE_OUT_AFTER):
            raise AitLlmError(f"time={time!r}: expected 0 (before), 1 (after), 2 (both) or 3 (inputs before, outputs after)")
        if part not in (PART_IN, PART_OUT, PART_BOTH):
            raise AitLlmError(f"part={part!r}: expected 0 (inputs), 1 (outputs) or 2 (both)")
        if layout not in ("ait", "msit"):
            raise AitLlmError(f"layout={layout!r}: expected 'ait' or 'msit'")
        pairs = tuple((int(lo), int(hi)) for lo, hi in token_range)
        if any(lo < 0 or lo > hi for lo, hi in pairs):
            raise AitLlmError(f"token_range={token_range!r}: expected inclusive (first, last) pairs with 0 <= first <= last")
        if timestamp is not None and not _TIMESTAMP.fullmatch(timestamp):
            raise AitLlmError(f"timestamp={timestamp!r}: expected %Y%m%d_%H%M%S, e.g. 20240131_235959")
        self.output_dir = Path(output_dir)
        self.model_name = str(model_name)
        self.pid = int(pid) if pid is not None else os.getpid()
        self.device_id = int(device_id)
        self.save_tensor = bool(save_tensor)
        self.token_range = pairs
        self.time = time
        self.part = part
        self.layout = layout
        if layout == "ait":
            self._root = self.output_dir / "ait_dump"
        else:
            stamp = timestamp or time_mod.strftime("%Y%m%d_%H%M%S")
            self._root = self.output_dir / f"msit_dump_{stamp}"

    @classmethod
    def from_env(cls, model_name: str, env: Mapping[str, str] | None = None) -> "AtbDumpWriter | None":
        """The writer the ATB_* variables ask for, or None when ATB_SAVE_TENSOR is unset or 0 (dumping is off).

        Malformed values raise AitLlmError naming the variable, rather than silently dumping the wrong rounds.
        """
        env = os.environ if env is None else env
        save = _env_choice(env, "ATB_SAVE_TENSOR", (0, 1, 2), 0)
        if save == 0:
            return None
        range_text = env.get("ATB_SAVE_TENSOR_RANGE", "")
        token_range = parse_token_range(range_text) if range_text.strip() else ((0, 0),)
        time = _env_choice(env, "ATB_SAVE_TENSOR_TIME", (0, 1, 2, 3), TIME_AFTER)
        in_before_out_after = _env_choice(env, "ATB_SAVE_TENSOR_IN_BEFORE_OUT_AFTER", (0, 1), 0)
        if in_before_out_after:
            time = TIME_IN_BEFORE_OUT_AFTER
        part = _env_choice(env, "ATB_SAVE_TENSOR_PART", (0, 1, 2), PART_BOTH)
        device_id = _env_int(env, "ATB_DEVICE_ID", minimum=0)
        pid = _env_int(env, "ATB_CUR_PID", minimum=1)
        stamp = env.get("ATB_TIMESTAMP", "").strip() or None
        layout = "msit" if (stamp is not None or in_before_out_after) else "ait"
        if stamp is not None and _digits(stamp):
            stamp = time_mod.strftime("%Y%m%d_%H%M%S", time_mod.localtime(int(stamp)))
        elif stamp is not None and not _TIMESTAMP.fullmatch(stamp):
            raise AitLlmError(f"ATB_TIMESTAMP={stamp!r}: expected epoch seconds or %Y%m%d_%H%M%S")
        return cls(env.get("ATB_OUTPUT_DIR") or ".", model_name=model_name, pid=pid, device_id=device_id or 0,
                   save_tensor=save == 1, token_range=token_range, time=time, part=part, layout=layout,
                   timestamp=stamp)

    @property
    def root(self) -> Path:
        return self._root

    @property
    def rank_dir(self) -> Path:
        return self._root / "tensors" / f"{self.device_id}_{self.pid}"

    def token_dir(self, token_id: int) -> Path:
        return self.rank_dir / str(int(token_id))

    def write_topology(self, topo: dict) -> Path:
        """Write ``model/{pid}/{modelName}.json`` and one ``layer/{pid}/{opName}.json`` per top-level graph op.

        The topology is validated first with the same parser readers use, so the writer never produces a
        topology the reader rejects. Returns the model file's path.
        """
        if not isinstance(topo, dict) or "nodes" not in topo:
            raise FormatError(f"topology for {self.model_name}: expected an object {{\"modelName\": ..., \"nodes\": [...]}}")
        topo = {"modelName": self.model_name, **topo}
        parsed = parse_topology(topo)
        name = parsed.model_name or self.model_name
        names = [name] + [op.op_name for op in parsed.ops if op.children]
        for n in names:
            if not _SAFE_NAME.fullmatch(n):
                raise FormatError(f"topology name {n!r} cannot be used as a file name")
        model_path = self._root / "model" / str(self.pid) / f"{name}.json"
        atomic_write_text(model_path, json.dumps(topo, indent=4))
        raw_nodes = topo.get("nodes") or []
        for raw, op in zip(raw_nodes, parsed.ops):
            if op.children:
                atomic_write_text(self._root / "layer" / str(self.pid) / f"{op.op_name}.json", json.dumps(raw, indent=4))
        return model_path

    def wants_token(self, token_id: int) -> bool:
        """Whether tensors of round ``token_id`` are to be written (ATB_SAVE_TENSOR=1 and inside the range)."""
        return self.save_tensor and any(lo <= token_id <= hi for lo, hi in self.token_range)

    def _placements(self) -> list[tuple[str, bool, bool]]:
        """(subfolder, write inputs, write outputs) for the configured time and part."""
        want_in, want_out = self.part in (PART_IN, PART_BOTH), self.part in (PART_OUT, PART_BOTH)
        if self.time == TIME_BEFORE:
            return [("before", want_in, want_out)]
        if self.time == TIME_AFTER:
            return [("after", want_in, want_out)]
        if self.time == TIME_BOTH:
            return [("before", want_in, want_out), ("after", want_in, want_out)]
        return [("before", want_in, False), ("after", False, want_out)]

    def save_tensors(self, token_id: int, rel_dir: str, inputs: Sequence[Any], outputs: Sequence[Any]) -> None:
        """Write one op's tensors for one round; a no-op for rounds outside the range.

        ``None`` entries are skipped but keep their index, so ``outtensor1`` stays ``outtensor1``.
        """
        if not self.wants_token(token_id):
            return
        op_dir = self.token_dir(token_id).joinpath(*_check_rel_dir(rel_dir).parts)
        for sub, write_in, write_out in self._placements():
            if write_in:
                for i, tensor in enumerate(inputs):
                    if tensor is not None:
                        write_bin(op_dir / sub / f"intensor{i}.bin", tensor)
            if write_out:
                for i, tensor in enumerate(outputs):
                    if tensor is not None:
                        write_bin(op_dir / sub / f"outtensor{i}.bin", tensor)

    def __repr__(self) -> str:
        return (f"AtbDumpWriter(root={str(self._root)!r}, pid={self.pid}, device_id={self.device_id}, "
                f"token_range={self.token_range}, time={self.time}, part={self.part})")
