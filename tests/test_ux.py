"""What a new user meets around the loop: recipe files that are not text, logs without a terminal, errors found
before any weight loads, presets from an installed wheel, and a run summary that says what it compares."""
from __future__ import annotations

import pytest

from tests.conftest import ROOT, run_train

TINY = ROOT / "recipes" / "tiny-cpu.yaml"
RECIPE_TEXT = TINY.read_text()


@pytest.mark.parametrize("kind", ["utf-16", "utf-16-le", "latin-1", "binary", "binary include"])
def test_a_recipe_that_is_not_utf8_text_is_a_user_error_naming_the_file(tmp_path, kind):
    bad = tmp_path / "recipe.yaml"
    if kind == "utf-16":  # with a byte-order mark, as Windows editors write it
        bad.write_bytes(RECIPE_TEXT.encode("utf-16"))
    elif kind == "utf-16-le":  # without one
        bad.write_bytes(RECIPE_TEXT.encode("utf-16-le"))
    elif kind == "latin-1":
        bad.write_bytes(("# café au lait\n" + RECIPE_TEXT).encode("latin-1"))
    elif kind == "binary":
        bad.write_bytes(bytes(range(256)) * 4)
    else:  # the recipe is fine, the preset it includes is not
        bad = tmp_path / "ok.yaml"
        bad.write_text("include: [preset.bin]\n" + RECIPE_TEXT.replace("data/", f"{TINY.parent}/data/"))
        (tmp_path / "preset.bin").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200, 256)))
    out = run_train([str(bad), "--plan"], cwd=tmp_path)
    text = out.stdout + out.stderr
    assert out.returncode == 2 and "Traceback" not in text, text[-3000:]
    named = tmp_path / "preset.bin" if kind == "binary include" else bad
    assert str(named) in text and "UTF-8" in text and "fix:" in text, text
