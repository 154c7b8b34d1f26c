"""Dependencies point one way: ir <- cost_model, solver <- passes <- autoshard (the top level);
measure <- cost_model; runtime uses ir and jax only. Inside passes, the strategy catalogue and the
prediction depend on nothing of the flow around them: the prediction reads the problem, and the
one start-up latency each combined collective pays from latency.py, which prices it for the
search's refinement too (latency.py reads only the problem). Checked from the import statements
of every module; a package without a rule here fails the test."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "autoshard"
ALLOWED = {
    "ir": {"ir"},
    "cost_model": {"ir", "cost_model"},
    "solver": {"ir", "solver"},
    "measure": {"ir", "cost_model", "measure"},
    "passes": {"ir", "cost_model", "solver", "passes"},
    "runtime": {"ir", "runtime"},
    "viewer": set(),
}
#: Subpackages of passes and what of passes each may import (besides the layers passes may).
PASSES_ALLOWED = {
    "strategies": {"strategies"},
    "prediction": {"prediction", "problem", "latency"},
    "pipeline": {"pipeline", "trace", "lift", "pins", "search", "problem", "rules", "state"},
}


def imported_modules(path):
    """(dotted autoshard module, line) of every import in ``path``; ``from autoshard.passes import
    x`` names ``autoshard.passes.x``."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] if node.module != "autoshard.passes" else [
                f"autoshard.passes.{a.name}" for a in node.names]
        for name in names:
            if name.split(".")[0] == "autoshard":
                yield name.split("."), node.lineno


def imported_layers(path):
    for parts, line in imported_modules(path):
        yield (parts[1] if len(parts) > 1 else "<package>"), line


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layer_imports_only_lower_layers(layer):
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        for target, line in imported_layers(path):
            assert target in ALLOWED[layer], (
                f"{path.relative_to(PACKAGE.parent)}:{line} imports autoshard.{target}; "
                f"{layer} may import only {sorted(ALLOWED[layer])}")


def test_every_package_has_a_rule():
    packages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert packages == set(ALLOWED), f"give {sorted(packages ^ set(ALLOWED))} a rule in ALLOWED"
    subpackages = {p.parent.name for p in (PACKAGE / "passes").glob("*/__init__.py")}
    assert subpackages == set(PASSES_ALLOWED)


def imported_passes_modules(path):
    for parts, line in imported_modules(path):
        if parts[1:2] == ["passes"] and len(parts) > 2:
            yield parts[2], line


@pytest.mark.parametrize("subpackage", sorted(PASSES_ALLOWED))
def test_passes_subpackages_import_only_their_rules(subpackage):
    for path in sorted((PACKAGE / "passes" / subpackage).rglob("*.py")):
        for target, line in imported_passes_modules(path):
            assert target in PASSES_ALLOWED[subpackage], (
                f"{path.relative_to(PACKAGE.parent)}:{line} imports autoshard.passes.{target}; "
                f"passes/{subpackage} may import only {sorted(PASSES_ALLOWED[subpackage])}")


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
