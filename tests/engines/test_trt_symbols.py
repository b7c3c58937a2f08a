"""Every TensorRT name the builder and the session use exists in every TensorRT version our targets
run (10.3, 10.13, 10.16, 11.4), per design/tensorrt-python-api-symbols.json (introspected from the
real bindings wheels), or is guarded by a version check; enum values are never integer literals.

Read from our own source with ast, so a new `trt.` call is checked the moment it is written.
Attributes on TensorRT objects are checked through the modules' naming convention: the names in
VARIABLE_CLASSES always hold those TensorRT objects.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from qinyu_edge.engines import builder as builder_mod
from qinyu_edge.engines.plan import (
    BUILDER_FLAGS, HARDWARE_LEVELS, NETWORK_FLAGS, SUPPORTED_TRT, TRT_SINCE, BuildOptions, make_build_plans, trt_has,
)
from qinyu_edge.runtime import trt_session as session_mod

# A copy of ../shared/design/tensorrt-python-api-symbols.json, so CI on a bare clone checks it too.
SYMBOLS_JSON = Path(__file__).with_name("data") / "tensorrt-python-api-symbols.json"
SHARED_JSON = Path(__file__).resolve().parents[3] / "shared" / "design" / SYMBOLS_JSON.name
SOURCES = (Path(builder_mod.__file__), Path(session_mod.__file__))

# Enum members looked up by name (getattr) come from these tables only.
ENUM_TABLES = {
    "NetworkDefinitionCreationFlag": NETWORK_FLAGS,
    "BuilderFlag": BUILDER_FLAGS,
    "HardwareCompatibilityLevel": tuple(HARDWARE_LEVELS.values()),
}
VARIABLE_CLASSES = {
    "builder": "Builder", "config": "IBuilderConfig", "network": "INetworkDefinition", "parser": "OnnxParser",
    "profile": "IOptimizationProfile", "error": "ParserError", "timing_cache": "ITimingCache",
    "engine": "ICudaEngine", "_engine": "ICudaEngine", "_ctx": "IExecutionContext", "ctx": "IExecutionContext",
    "_runtime": "Runtime",
}
PRECISION_FLAGS = ("FP16", "BF16", "INT8", "FP8", "INT4", "FP4", "OBEY_PRECISION_CONSTRAINTS",
                   "PREFER_PRECISION_CONSTRAINTS")


def _load_symbols() -> tuple[tuple[tuple[int, int], ...], dict[str, str]]:
    d = json.loads(SYMBOLS_JSON.read_text())
    versions = tuple(tuple(int(x) for x in v.split(".")[:2]) for v in d["_versions"])
    return versions, {k: v for k, v in d.items() if not k.startswith("_")}


def _is_trt(node: ast.AST) -> bool:
    """The tensorrt module: `trt`, or `self._trt` where a session keeps it."""
    if isinstance(node, ast.Name):
        return node.id == "trt"
    return (isinstance(node, ast.Attribute) and node.attr == "_trt" and isinstance(node.value, ast.Name)
            and node.value.id == "self")


def _chain(node: ast.AST) -> list[str] | None:
    """trt.A.B -> ["A", "B"]; None for anything not rooted at the tensorrt module."""
    parts = []
    while not _is_trt(node):
        if not isinstance(node, ast.Attribute):
            return None
        parts.append(node.attr)
        node = node.value
    return parts[::-1]


def _holder(node: ast.AST) -> str | None:
    """`engine.x` -> "engine", `self._ctx.x` -> "_ctx"."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
        return node.attr
    return None


def used_symbols() -> dict[str, set[str]]:
    """symbol -> files that use it, in the JSON's naming (Class, Class.member)."""
    found: dict[str, set[str]] = {}

    def add(sym: str, path: Path) -> None:
        found.setdefault(sym, set()).add(path.name)

    for path in SOURCES:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                chain = _chain(node)
                if chain is not None:
                    names = [p for p in chain if not p.startswith("__")]
                    if names:
                        add(".".join(names[:2]), path)
                holder = _holder(node.value)
                if holder in VARIABLE_CLASSES:
                    add(f"{VARIABLE_CLASSES[holder]}.{node.attr}", path)
            if isinstance(node, ast.Call):
                # getattr(trt.Enum, name), or the enum handed to a helper that looks members up by name.
                is_getattr = isinstance(node.func, ast.Name) and node.func.id == "getattr"
                for arg in node.args[:1] if is_getattr else node.args:
                    chain = _chain(arg)
                    if not chain or (not is_getattr and (len(chain) != 1 or chain[0] not in ENUM_TABLES)):
                        continue
                    assert len(chain) == 1 and chain[0] in ENUM_TABLES, (
                        f"{path.name}:{node.lineno}: getattr on trt.{'.'.join(chain)} has no table of allowed names")
                    for member in ENUM_TABLES[chain[0]]:
                        add(f"{chain[0]}.{member}", path)
            if isinstance(node, ast.ClassDef):
                for base in node.bases:
                    chain = _chain(base)
                    if chain is not None:
                        for item in node.body:
                            if isinstance(item, ast.FunctionDef) and not item.name.startswith("_"):
                                add(f"{chain[0]}.{item.name}", path)
    return found


def test_symbol_table_is_the_shared_one():
    if not SHARED_JSON.is_file():
        pytest.skip(f"no shared design folder beside this checkout ({SHARED_JSON})")
    assert json.loads(SHARED_JSON.read_text()) == json.loads(SYMBOLS_JSON.read_text())


def test_the_scan_sees_the_calls_we_know_are_there():
    used = used_symbols()
    for sym in ("Builder.build_serialized_network", "OnnxParser.parse_from_file", "IProgressMonitor.step_complete",
                "NetworkDefinitionCreationFlag.STRONGLY_TYPED", "ICudaEngine.get_tensor_profile_shape",
                "IExecutionContext.execute_async_v3", "Runtime.deserialize_cuda_engine", "ParserError.desc",
                "ITimingCache.serialize", "HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY", "nptype",
                "ExecutionContextAllocationStrategy.USER_MANAGED", "ICudaEngine.device_memory_size_v2",
                "IExecutionContext.set_device_memory"):
        assert sym in used, sym


def test_every_trt_symbol_exists_in_every_target_version_or_is_guarded():
    versions, table = _load_symbols()
    assert set(SUPPORTED_TRT) == set(versions), "the JSON and the builder disagree on the TensorRT versions"
    problems = []
    for sym, files in sorted(used_symbols().items()):
        mask = table.get(sym)
        if mask is None:
            problems.append(f"{sym} ({', '.join(sorted(files))}): in no TensorRT version's bindings")
            continue
        present = [v for v, bit in zip(versions, mask) if bit == "1"]
        if len(present) == len(versions):
            continue
        since = TRT_SINCE.get(sym)
        if since is None:
            problems.append(f"{sym} ({', '.join(sorted(files))}): present only in {present} and not version-guarded")
        elif present != [v for v in versions if v >= since]:
            problems.append(f"{sym}: TRT_SINCE says {since}, the bindings have it in {present}")
    assert not problems, "\n".join(problems)


def test_version_guard_table_matches_the_bindings():
    versions, table = _load_symbols()
    for sym in TRT_SINCE:
        for v, bit in zip(versions, table[sym]):
            assert trt_has(sym, v) == (bit == "1"), (sym, v)


def test_no_precision_builder_flags_anywhere():
    # Strongly typed networks reject them on 10.x (API Usage Error) and 11.x removed them.
    assert not set(PRECISION_FLAGS) & set(BUILDER_FLAGS)
    for path in SOURCES:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            chain = _chain(node) if isinstance(node, ast.Attribute) else None
            if chain and chain[0] == "BuilderFlag" and len(chain) > 1:
                assert chain[1] not in PRECISION_FLAGS, f"{path.name}:{node.lineno}"
            if isinstance(node, ast.Constant) and node.value in PRECISION_FLAGS:
                raise AssertionError(f"{path.name}:{node.lineno}: precision flag name {node.value!r}")


def _is_int_literal(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and type(node.value) is int


def test_enum_values_are_never_integer_literals():
    flag_calls = {"create_network", "set_flag", "clear_flag", "get_flag", "set_memory_pool_limit",
                  "create_execution_context", "set_preview_feature"}
    enum_properties = {"hardware_compatibility_level", "profiling_verbosity", "engine_capability",
                       "default_device_type", "runtime_platform"}
    for path in SOURCES:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            where = f"{path.name}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.LShift) and _is_int_literal(node.left) \
                    and node.left.value == 1:
                # A flag bit, 1 << int(getattr(enum, name)): the shift amount must come from an enum member.
                right = node.right
                assert isinstance(right, ast.Call) and isinstance(right.func, ast.Name) and right.func.id == "int", where
                assert not _is_int_literal(right.args[0]), where
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in flag_calls:
                for arg in node.args[:1]:
                    assert not _is_int_literal(arg) or node.func.attr == "set_memory_pool_limit", where
            if isinstance(node, ast.Assign):
                for t in node.targets:
                    if isinstance(t, ast.Attribute) and t.attr in enum_properties:
                        assert not _is_int_literal(node.value), where


@pytest.mark.parametrize("target_id, trt, level", [("orin-nano-8", "10.3", "none"), ("agx-thor", "10.13.3.9", "none"),
                                                   ("rtx-4090", "10.16.1.11", "same_compute_capability"),
                                                   ("rtx-5090", "11.4.0.106", "ampere_plus")])
def test_plans_hold_enum_names_only(preset_bundle, target_id, trt, level):
    from qinyu_edge.bundle import load_bundle
    from qinyu_edge.device.targets import get_target

    versions, table = _load_symbols()
    v = tuple(int(x) for x in trt.split(".")[:2])
    plans = make_build_plans(load_bundle(preset_bundle[1]), get_target(target_id),
                             BuildOptions(trt_version=trt, hardware_compatibility=level))
    for p in plans:
        s = json.loads(json.dumps(p.to_dict()))["settings"]
        names = [*s["network_flags"], *s["builder_flags"], s["hardware_compatibility_level"]]
        assert all(isinstance(n, str) for n in names)
        for enum, members in (("NetworkDefinitionCreationFlag", s["network_flags"]), ("BuilderFlag", s["builder_flags"]),
                              ("HardwareCompatibilityLevel", [s["hardware_compatibility_level"]])):
            for m in members:
                assert table[f"{enum}.{m}"][versions.index(v)] == "1", (enum, m, trt)


def test_cuda_runtime_names_exist_in_the_installed_cuda_python():
    cudart = pytest.importorskip("cuda.bindings.runtime", reason="cuda-python is not installed here")
    names, kinds = set(), set()
    for node in ast.walk(ast.parse(Path(session_mod.__file__).read_text())):
        if isinstance(node, ast.Attribute) and _holder(node.value) in ("cudart", "rt", "_cudart"):
            names.add(node.attr)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("cudaMemcpy") \
                and node.value.isidentifier():
            kinds.add(node.value)
    assert {"cudaMalloc", "cudaMemcpyAsync", "cudaStreamSynchronize"} <= names
    assert [n for n in names if not hasattr(cudart, n)] == []
    assert [k for k in kinds if not hasattr(cudart.cudaMemcpyKind, k)] == []
