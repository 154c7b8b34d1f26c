"""Dependencies point one way: ir <- cost_model <- passes <- autoshard (api); runtime uses ir
and jax only. Checked from the import statements of every module."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "autoshard"
ALLOWED = {
    "ir": {"ir"},
    "cost_model": {"ir", "cost_model"},
    "passes": {"ir", "cost_model", "passes"},
    "runtime": {"ir", "runtime"},
}


def imported_layers(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "autoshard":
                yield (parts[1] if len(parts) > 1 else "<package>"), node.lineno


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layer_imports_only_lower_layers(layer):
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        for target, line in imported_layers(path):
            assert target in ALLOWED[layer], (
                f"{path.relative_to(PACKAGE.parent)}:{line} imports autoshard.{target}; "
                f"{layer} may import only {sorted(ALLOWED[layer])}")


def test_cli_runs(tmp_path, capsys):
    from autoshard.cli import main

    assert main(["version"]) == 0
    assert "autoshard 0.1.0" in capsys.readouterr().out
    hlo = tmp_path / "m.txt"
    hlo.write_text("HloModule m\n\nENTRY %main (p: f32[8]) -> f32[8] {\n"
                   "  %p = f32[8]{0} parameter(0)\n"
                   "  ROOT %ar = f32[8]{0} all-reduce(%p), replica_groups={{0,1},{2,3}}, "
                   "to_apply=%add\n}\n")
    assert main(["collectives", str(hlo)]) == 0
    assert '"all-reduce": 32' in capsys.readouterr().out
