"""What a compiled XLA program does per device, read from its optimized HLO text: matmul FLOPs, HBM
bytes and collective bytes by kind, with every while loop's body counted as often as it runs.

    costs = program_costs(compiled.as_text())
    costs.flops, costs.hbm_bytes, costs.comm_bytes, costs.comm_by_kind, costs.loops

XLA's own `cost_analysis()` counts a while loop's body once, so a decode loop of 512 steps (or a
scan over 32 layers) is undercounted 512-fold (32-fold); and it does not report collectives at all.
This walks the program instead: a while loop's trip count comes from the loop's
`known_trip_count` when XLA records one, else from the constant its condition compares the counter
against over the constant step its body adds (`i < N`, `i += k`: N / k; for a loop that may stop
early, such as decoding until every row has an EOS, that is the most it runs).

The counts are what a roofline needs, not a simulation:
- FLOPs: 2 x output elements x contraction size of every dot and convolution (TPU programs express
  matmuls as convolutions), inside fusions too; elementwise work is left out.
- HBM bytes: every top-level instruction (a fusion counts as one) reads its operands and writes its
  result once; slices and a fusion's sliced operands (sliced inside it, or by a nested fusion that
  only slices) count what is taken, an in-place
  dynamic-update-slice writes only the update, and buffers a fusion only passes through or that a
  TPU program keeps on chip (layout memory space `S(n)`, n > 0) are not HBM traffic. Parameters,
  tuples, bitcasts and the loops themselves move nothing.
- custom calls: a Pallas kernel is opaque here: its FLOPs are not counted, its operands and result
  count as one read and one write; TPU's own buffer custom calls (allocations, bitcasts) move nothing.
- collective bytes: the data each device contributes per collective: the gathered result of an
  all-gather, the operand of an all-reduce, reduce-scatter, all-to-all or collective-permute.
"""

from __future__ import annotations

import dataclasses
import math
import re

DTYPE_BYTES = {
    "pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4, "u32": 4, "s64": 8, "u64": 8,
    "f16": 2, "bf16": 2, "f32": 4, "f64": 8, "c64": 8, "c128": 16,
    "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3b11fnuz": 1, "f8e4m3fnuz": 1, "f8e5m2fnuz": 1, "token": 0,
}
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")

_ARRAY = re.compile(r"\b(" + "|".join(sorted(DTYPE_BYTES, key=len, reverse=True)) + r")\[([\d,]*)\](\{[^}]*\})?")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([a-z][a-z0-9\-]*)\((.*)$")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_FREE = {"parameter", "get-tuple-element", "tuple", "constant", "bitcast", "while", "call", "conditional",
         "after-all", "partition-id", "replica-id", "iota", "opt-barrier", "add-dependency", "domain"}
# TPU custom calls that move no data: views of existing buffers and allocations.
_FREE_TARGETS = ("ConcatBitcast", "AllocateBuffer", "AssumeGatherIndicesInBound")


def array_shapes(type_text: str, hbm_only: bool = False) -> list[tuple[str, tuple[int, ...]]]:
    """(dtype, dims) of every array in an HLO type (an array or a tuple of them). `hbm_only`: leave
    out arrays that a TPU program keeps in on-chip memory (layout memory space `S(n)`, n > 0:
    VMEM, SMEM, semaphores); their reads and writes are not HBM traffic."""
    return [(d, tuple(int(x) for x in dims.split(",") if x)) for d, dims, layout in _ARRAY.findall(type_text)
            if not (hbm_only and re.search(r"S\([1-9]\d*\)", layout))]


def type_bytes(type_text: str, hbm_only: bool = False) -> float:
    return sum(DTYPE_BYTES[d] * math.prod(dims) for d, dims in array_shapes(type_text, hbm_only))


def largest_array_bytes(type_text: str, hbm_only: bool = False) -> float:
    """Bytes of the largest array in a type: the result of an async `-start` op, whose tuple also
    repeats its operands."""
    return max((DTYPE_BYTES[d] * math.prod(dims) for d, dims in array_shapes(type_text, hbm_only)), default=0.0)


@dataclasses.dataclass
class Instruction:
    name: str
    type: str
    opcode: str
    operands: list[str]
    attrs: str
    operand_text: str = ""

    @property
    def bytes(self) -> float:
        return type_bytes(self.type)

    @property
    def hbm(self) -> float:
        """Bytes of its result that live in HBM."""
        return type_bytes(self.type, hbm_only=True)


@dataclasses.dataclass
class Computation:
    name: str
    instructions: list[Instruction]
    root: Instruction | None

    def __post_init__(self):
        self.by_name = {i.name: i for i in self.instructions}


def _split_operands(rest: str) -> tuple[str, str]:
    """The text inside an instruction's outer parentheses and the attributes after them."""
    depth = 1
    for i, ch in enumerate(rest):
        if ch in "({[":
            depth += 1
        elif ch in ")}]":
            depth -= 1
            if depth == 0:
                return rest[:i], rest[i + 1:]
    return rest, ""


def parse_module(text: str) -> tuple[dict[str, Computation], str]:
    """The computations of an HLO module by name, and the entry computation's name."""
    computations, entry = {}, None
    current, instructions, root = None, [], None
    for line in text.splitlines():
        if current is None:
            header = _HEADER.match(line)
            if header and not line.startswith((" ", "\t")) and not line.startswith("HloModule"):
                current, instructions, root = header.group(2), [], None
                if header.group(1):
                    entry = current
            continue
        # A computation ends at a line that is a lone brace: TPU kernels' attributes (a Pallas
        # kernel's metadata) run over several lines, some of which start with "}}".
        if line.rstrip() == "}":
            computations[current] = Computation(current, instructions, root)
            current = None
            continue
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        name, type_text, opcode, rest = match.groups()
        operand_text, attrs = _split_operands(rest)
        operands = re.findall(r"%([\w.\-]+)", operand_text)
        inst = Instruction(name, type_text, opcode, operands, attrs, operand_text)
        instructions.append(inst)
        if line.lstrip().startswith("ROOT"):
            root = inst
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return computations, entry


def _called(attrs: str, key: str) -> list[str]:
    match = re.search(key + r"=\{([^}]*)\}", attrs)
    if match:
        return re.findall(r"%?([\w.\-]+)", match.group(1))
    match = re.search(key + r"=%?([\w.\-]+)", attrs)
    return [match.group(1)] if match else []


def trip_count(computations: dict[str, Computation], while_inst: Instruction,
               enclosing: Computation | None = None) -> int | None:
    """How often a while loop's body runs: XLA's known_trip_count, else from the condition's
    `counter < N` and the body's `counter + step`: (N - start) / step, the most it runs, where
    start is the counter's initial value when the loop's input tuple (in `enclosing`) has it as a
    constant, else 0; else None."""
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"', while_inst.attrs)
    if known:
        return int(known.group(1))
    found = []  # (bound, tuple index of the counter or None)
    pending = _called(while_inst.attrs, "condition")
    callers: dict[str, tuple[Computation, Instruction]] = {}  # fused computation -> (caller, fusion)
    seen = set()
    while pending:
        comp = computations.get(pending.pop())
        if comp is None or comp.name in seen:
            continue
        seen.add(comp.name)
        for inst in comp.instructions:
            if inst.opcode == "compare" and re.search(r"direction=(LT|GT)", inst.attrs) and len(inst.operands) == 2:
                less = "direction=LT" in inst.attrs
                bound, counter = (inst.operands[1], inst.operands[0]) if less else inst.operands
                const = comp.by_name.get(bound)
                if const is not None and const.opcode == "constant" and _int_operand(const) is not None:
                    index, offset = _counter(comp, counter, callers)
                    found.append((_int_operand(const) - offset, index))
            for called in _called(inst.attrs, "calls"):
                callers.setdefault(called, (comp, inst))
                pending.append(called)
    if not found:
        return None
    bound, index = max(found, key=lambda f: f[0])
    step = _counter_step(computations, (_called(while_inst.attrs, "body") or [""])[0], index)
    return max(0, -(-(bound - _counter_start(enclosing, while_inst, index)) // step))


def _counter_start(enclosing: Computation | None, while_inst: Instruction, index: int | None) -> int:
    """The loop counter's initial value when it enters the loop as a constant, else 0."""
    if enclosing is None or index is None or not while_inst.operands:
        return 0
    init = enclosing.by_name.get(while_inst.operands[0])
    if init is None or init.opcode != "tuple" or index >= len(init.operands):
        return 0
    const = enclosing.by_name.get(init.operands[index])
    if const is not None and const.opcode == "copy" and const.operands:
        const = enclosing.by_name.get(const.operands[0])
    if const is None or const.opcode != "constant":
        return 0
    return _int_operand(const) or 0


def _counter(comp: Computation, name: str, callers: dict) -> tuple[int | None, int]:
    """The loop counter a condition compares: (its tuple index, a constant the condition adds to it
    first; XLA rewrites `i < N` for i from a to `j + a < N` for j from 0). Inside a fusion, a
    parameter is followed out to the fusion's operand in the condition."""
    comp, inst = _outside(comp, comp.by_name.get(name), callers)
    if inst is not None and inst.opcode == "add" and len(inst.operands) == 2:
        for counter, other in (inst.operands, inst.operands[::-1]):
            const = comp.by_name.get(other)
            index = _tuple_index(_outside(comp, comp.by_name.get(counter), callers)[1])
            if index is not None and const is not None and const.opcode == "constant" and _int_operand(const) is not None:
                return index, _int_operand(const)
    return _tuple_index(inst), 0


def _outside(comp: Computation, inst: Instruction | None, callers: dict) -> tuple[Computation, Instruction | None]:
    """A fused computation's parameter as the operand its fusion passes in (repeatedly)."""
    while inst is not None and inst.opcode == "parameter" and comp.name in callers:
        caller, fusion = callers[comp.name]
        number = _int_operand(inst)
        if number is None or number >= len(fusion.operands):
            break
        comp, inst = caller, caller.by_name.get(fusion.operands[number])
    return comp, inst


def _tuple_index(inst: Instruction | None) -> int | None:
    if inst is not None and inst.opcode == "get-tuple-element":
        match = re.search(r"index=(\d+)", inst.attrs)
        return int(match.group(1)) if match else None
    return None


def _counter_step(computations: dict[str, Computation], body_name: str, index: int | None) -> int:
    """The constant a loop body adds to its counter (tuple element `index`), 1 if it cannot tell.
    XLA's windowed (collective) matmul loops, for one, take two steps per trip."""
    body = computations.get(body_name)
    if body is None or index is None or body.root is None or body.root.opcode != "tuple":
        return 1
    if index >= len(body.root.operands):
        return 1
    inst = body.by_name.get(body.root.operands[index])
    comp = body
    if inst is not None and inst.opcode == "fusion":
        comp = computations.get((_called(inst.attrs, "calls") or [""])[0])
        inst = comp.root if comp is not None else None
    if inst is None or inst.opcode != "add":
        return 1
    for operand in inst.operands:
        const = comp.by_name.get(operand)
        if const is not None and const.opcode == "constant" and (_int_operand(const) or 0) > 0:
            return _int_operand(const)
    return 1


def _int_operand(inst: Instruction) -> int | None:
    """The integer inside a constant's or a parameter's parentheses: `constant(8)`, `parameter(0)`."""
    match = re.fullmatch(r"\s*(-?\d+)\s*", inst.operand_text)
    return int(match.group(1)) if match else None


def contraction_size(inst: Instruction, comp: Computation) -> int:
    """The number of multiply-adds per output element of a dot or convolution."""
    operand_types = [comp.by_name[o].type if o in comp.by_name else "" for o in inst.operands[:2]]
    shapes = [array_shapes(t) for t in operand_types]
    if inst.opcode == "dot":
        lhs = shapes[0][0][1] if shapes[0] else ()
        dims = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", inst.attrs)
        return math.prod(lhs[int(d)] for d in dims.group(1).split(",") if d) if dims and lhs else 1
    # convolution: the kernel's input-feature size times the window taps that meet real (undilated) input
    labels = re.search(r"dim_labels=\w+_(\w+)->", inst.attrs)
    rhs = shapes[1][0][1] if len(shapes) > 1 and shapes[1] else ()
    if not labels or not rhs:
        return 1
    size = rhs[labels.group(1).index("i")]
    window = re.search(r"window=\{([^}]*)\}", inst.attrs)
    if window:
        taps = re.search(r"size=([\dx]+)", window.group(1))
        dilation = re.search(r"lhs_dilate=([\dx]+)", window.group(1))
        taps = [int(t) for t in taps.group(1).split("x")] if taps else []
        dilation = [int(d) for d in dilation.group(1).split("x")] if dilation else [1] * len(taps)
        size *= math.prod(math.ceil(t / d) for t, d in zip(taps, dilation))
    group = re.search(r"feature_group_count=(\d+)", inst.attrs)
    return size // int(group.group(1)) if group else size


def _fusion_bytes(inst: Instruction, comp: Computation, computations: dict[str, Computation]) -> float:
    """HBM bytes of one fusion: what it writes plus the parts of its operands it reads. Buffers it
    only passes through (a tuple element that is one of its parameters, as TPU's async collective
    fusions return their destination buffers) and buffers it updates in place are not traffic."""
    fused = computations.get((_called(inst.attrs, "calls") or [""])[0])
    operand_hbm = [comp.by_name[o].hbm if o in comp.by_name else 0.0 for o in inst.operands]
    if fused is None or fused.root is None:
        return inst.hbm + sum(operand_hbm)
    params = {i.name: _int_operand(i) for i in fused.instructions if i.opcode == "parameter"}
    root_tuple = fused.root if fused.root.opcode == "tuple" else None
    outputs = [fused.by_name[o] for o in root_tuple.operands if o in fused.by_name] if root_tuple else [fused.root]
    out_types = _tuple_elements(inst.type) if root_tuple else [inst.type]
    users: dict[str, list[Instruction]] = {}
    for i in fused.instructions:
        if i is not root_tuple:
            for o in i.operands:
                users.setdefault(o, []).append(i)
    written, in_place = 0.0, set()
    for out, out_type in zip(outputs, out_types + [""] * (len(outputs) - len(out_types))):
        if out.opcode == "parameter" or (out_type and not type_bytes(out_type, hbm_only=True)):
            continue  # passed through, or written to on-chip memory
        if out.opcode == "dynamic-update-slice" and out.operands and out.operands[0] in params:
            in_place.add(out.operands[0])
            update = fused.by_name.get(out.operands[1]) if len(out.operands) > 1 else None
            written += update.bytes if update is not None else 0.0
        else:
            written += out.bytes
    read = 0.0
    for name, number in params.items():
        uses = [u for u in users.get(name, []) if not (u.opcode == "dynamic-update-slice" and name in in_place)]
        if number is None or number >= len(operand_hbm) or not uses or not operand_hbm[number]:
            continue
        read += min(operand_hbm[number], _bytes_read(name, uses, computations))
    return read + written


def _bytes_read(param: str, uses: list[Instruction], computations: dict[str, Computation]) -> float:
    """Bytes of fused parameter `param` that its `uses` read: what a slice takes; inside a nested
    fusion (XLA:TPU fuses a scan's slice of a stacked KV cache into the attention's matmul), what
    that fusion's own parameter's uses read; all of it for any other use."""
    total = 0.0
    for use in uses:
        if use.opcode in ("dynamic-slice", "slice", "gather") and use.operands[0] == param:
            total += use.bytes
            continue
        inner = computations.get((_called(use.attrs, "calls") or [""])[0]) if use.opcode == "fusion" else None
        if inner is None:
            return math.inf
        for position in (i for i, o in enumerate(use.operands) if o == param):
            inner_param = next((i for i in inner.instructions
                                if i.opcode == "parameter" and _int_operand(i) == position), None)
            inner_uses = [i for i in inner.instructions if inner_param is not None and inner_param.name in i.operands]
            if inner_param is None or not inner_uses:
                return math.inf
            total += _bytes_read(inner_param.name, inner_uses, computations)
    return total


def _tuple_elements(type_text: str) -> list[str]:
    """The element types of a tuple type `(a, b, ...)`, split at its top level."""
    inner = type_text.strip()[1:-1]
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(inner):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(inner[start:i])
            start = i + 1
    parts.append(inner[start:])
    return [re.sub(r"/\*.*?\*/", "", p).strip() for p in parts if p.strip()]


@dataclasses.dataclass
class Costs:
    flops: float = 0.0
    hbm_bytes: float = 0.0
    comm_by_kind: dict = dataclasses.field(default_factory=lambda: {k: 0.0 for k in COLLECTIVES})
    # One entry per outermost while loop: its op name, trip count, and the costs of one trip.
    loops: list = dataclasses.field(default_factory=list)
    unknown_trip_counts: int = 0

    @property
    def comm_bytes(self) -> float:
        return sum(self.comm_by_kind.values())

    def add(self, other: "Costs", times: float) -> None:
        """Add `other` run `times` times (its loops of unknown trip count once: they are loops, not runs)."""
        self.unknown_trip_counts += other.unknown_trip_counts
        self.flops += other.flops * times
        self.hbm_bytes += other.hbm_bytes * times
        for k, v in other.comm_by_kind.items():
            self.comm_by_kind[k] += v * times


def _collective_kind(opcode: str) -> str | None:
    base = opcode[:-len("-start")] if opcode.endswith("-start") else opcode
    return base if base in COLLECTIVES else None


def _collective_bytes(inst: Instruction, kind: str, comp: Computation) -> float:
    if kind == "all-gather":
        return largest_array_bytes(inst.type) if inst.opcode.endswith("-start") else inst.bytes
    return sum(comp.by_name[o].bytes for o in inst.operands if o in comp.by_name)


def computation_costs(computations: dict[str, Computation], name: str, fused: bool = False,
                      _memo: dict | None = None, trips: dict | None = None) -> Costs:
    """Costs of one run of computation `name` (its loops counted by their trip counts; `trips`: for a
    loop whose count is known only at run time, the count to take where its op name contains one of
    the keys)."""
    memo = {} if _memo is None else _memo
    key = (name, fused)
    if key in memo:
        return memo[key]
    comp = computations[name]
    costs = Costs()
    for inst in comp.instructions:
        op = inst.opcode
        if op in ("dot", "convolution"):
            costs.flops += 2.0 * math.prod(array_shapes(inst.type)[0][1]) * contraction_size(inst, comp)
        kind = _collective_kind(op)
        if kind is not None:
            costs.comm_by_kind[kind] += _collective_bytes(inst, kind, comp)
        if op == "while":
            count = trip_count(computations, inst, comp)
            op_name = re.search(r'op_name="([^"]*)"', inst.attrs)
            if count is None:
                count = next((n for key, n in (trips or {}).items() if op_name and key in op_name.group(1)), None)
            if count is None:
                costs.unknown_trip_counts += 1
            body = Costs()
            for called in _called(inst.attrs, "body") + _called(inst.attrs, "condition"):
                body.add(computation_costs(computations, called, False, memo, trips), 1.0)
            costs.add(body, 1 if count is None else count)
            # Loops inside a loop's body are in its costs and not listed: XLA makes many small ones
            # (a collective matmul's steps, say) that say nothing about the program's structure.
            costs.loops.append({"op_name": op_name.group(1) if op_name else inst.name, "trips": count,
                                "flops": body.flops, "hbm_bytes": body.hbm_bytes, "comm_bytes": body.comm_bytes,
                                "comm_by_kind": dict(body.comm_by_kind)})
            continue
        for key_name in ("calls", "branch_computations", "true_computation", "false_computation"):
            for called in _called(inst.attrs, key_name):
                if called in computations:
                    inner = computation_costs(computations, called, fused or op == "fusion", memo, trips)
                    costs.add(inner, 1.0)
                    costs.loops.extend(inner.loops)
        if not fused:
            costs.hbm_bytes += hbm_bytes(inst, comp, computations)
    memo[key] = costs
    return costs


def hbm_bytes(inst: Instruction, comp: Computation, computations: dict[str, Computation]) -> float:
    """HBM bytes one top-level instruction moves (see the module docstring)."""
    op = inst.opcode
    if op in _FREE or op.endswith("-done"):
        return 0.0
    if op == "custom-call" and any(f'"{t}"' in inst.attrs for t in _FREE_TARGETS):
        return 0.0
    if op == "fusion":
        return _fusion_bytes(inst, comp, computations)
    operand_hbm = [comp.by_name[o].hbm if o in comp.by_name else 0.0 for o in inst.operands]
    if op == "dynamic-update-slice":
        update = comp.by_name.get(inst.operands[1]) if len(inst.operands) > 1 else None
        return 2 * (update.bytes if update is not None else 0.0)
    if op in ("slice", "dynamic-slice", "slice-start", "gather"):  # reads only what it takes
        # slice-start's result is ((operand), slice, index): the slice is its second element
        taken_type = _tuple_elements(inst.type)[1] if op == "slice-start" else inst.type
        taken = type_bytes(taken_type)
        return (taken if operand_hbm and operand_hbm[0] else 0.0) + type_bytes(taken_type, hbm_only=True)
    result = inst.hbm
    if op == "copy-start":
        # (destination, source, context): a prefetch into on-chip memory reads its operand from HBM
        # and writes nothing there; the source element is the operand itself, not a second buffer.
        result = type_bytes(_tuple_elements(inst.type)[0], hbm_only=True)
    elif op.endswith("-start"):
        result = largest_array_bytes(inst.type, hbm_only=True)
    return sum(operand_hbm) + result


def program_costs(hlo_text: str, trips: dict | None = None) -> Costs:
    """The per-device costs of a compiled program (`compiled.as_text()`); `trips` as in
    `computation_costs` (a count may be fractional: a mean over the loop's runs)."""
    computations, entry = parse_module(hlo_text)
    return computation_costs(computations, entry, trips=trips)
