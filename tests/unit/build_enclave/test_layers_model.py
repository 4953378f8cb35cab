"""The merged tree against an independent, naive model of OCI layer application."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from enclavekit.eif.layers import ContentRef, EntryKind, MergedTree, Spool
from enclavekit.errors import MalformedInput
from tests.unit.build_enclave.factory import F, layer

Path_ = tuple[str, ...]


def _model(layers: list[list[tuple[Path_, str]]]) -> dict[Path_, tuple[str, int]] | None:
    """Paths → (kind, layer index). ``None`` when a layer writes below a non-directory."""
    state: dict[Path_, tuple[str, int]] = {}
    for index, entries in enumerate(layers):
        for path, kind in entries:  # in tar order
            # parents must be directories (created, as Docker's extraction creates them)
            for depth in range(1, len(path)):
                above = state.get(path[:depth])
                if above is not None and above[0] != "dir":
                    return None
                state[path[:depth]] = ("dir", index) if above is None else (above[0], index)
            parent, base = path[:-1], path[-1]
            if kind in ("opaque", "whiteout"):
                # hide what lower layers put there (never this layer's entries)
                target = parent if kind == "opaque" else (*parent, base[4:])
                strict = kind == "opaque"
                for p in [
                    p
                    for p, (_, li) in state.items()
                    if p[: len(target)] == target
                    and (len(p) > len(target) or not strict)
                    and li < index
                ]:
                    del state[p]
                continue
            old = state.get(path)
            if kind != "dir" or old is None or old[0] != "dir":
                for p in [p for p in state if p[: len(path)] == path and len(p) > len(path)]:
                    del state[p]
            state[path] = (kind, index)
    return state


_names = st.sampled_from(["a", "b", "c"])
_entry = st.tuples(
    st.lists(_names, min_size=1, max_size=3).map(tuple),
    st.sampled_from(["file", "dir", "symlink", "whiteout", "opaque"]),
)


def _to_layer_entries(entries: list[tuple[Path_, str]]) -> list[tuple[Path_, str]]:
    out, seen = [], set()
    for path, kind in entries:
        if kind == "whiteout":
            path = (*path[:-1], ".wh." + path[-1])
        elif kind == "opaque":
            path = (*path[:-1], ".wh..wh..opq")
        if path not in seen:
            seen.add(path)
            out.append((path, kind))
    return out


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(_entry, max_size=5), min_size=1, max_size=4))
def test_merged_tree_agrees_with_a_naive_model(
    tmp_path_factory: pytest.TempPathFactory, raw: list
) -> None:
    layers = [_to_layer_entries(entries) for entries in raw]
    expected = _model(layers)
    work = tmp_path_factory.mktemp("m")
    spool = Spool(str(work / "spool"))
    blob = work / "layers"
    tree = MergedTree()
    failed = False
    try:
        for i, entries in enumerate(layers):
            data = layer(
                *(
                    F("/".join(p), b"x", kind=k if k in ("dir", "symlink") else "file", link="x")
                    for p, k in entries
                )
            )
            with open(blob, "ab") as handle:
                offset = handle.tell()
                handle.write(data)
            try:
                tree.add_layer(ContentRef(str(blob), offset, len(data)), label=f"l{i}")
            except MalformedInput:
                failed = True
                break
        if failed:
            assert expected is None
            return
        assert expected is not None
        kinds = {EntryKind.DIRECTORY: "dir", EntryKind.SYMLINK: "symlink"}
        got = {
            tuple(e.name.rstrip(b"/").decode().split("/")): kinds.get(e.kind, "file")
            for e in tree.export()
        }
        assert got == {p: k for p, (k, _) in expected.items()}
    finally:
        with contextlib.suppress(OSError):
            spool.close()
        Path(blob).unlink(missing_ok=True)
