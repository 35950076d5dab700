"""README.md's Python snippets run as they stand (the second one failed once: an argument that does not apply to
its adapters was refused)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_python_snippets_run_in_order(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    assert len(blocks) >= 2  # the library snippet, and the causal-LM one that continues from it
    monkeypatch.chdir(tmp_path)  # the snippets save "my-adapter" into the current folder
    scope: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), scope)
    # what the comments promise
    assert "trainable params: 74,498" in capsys.readouterr().out
    assert (tmp_path / "my-adapter" / "adapter_model.safetensors").is_file()
    assert set(scope["model"].peft_config) == {"a", "b", "ab"}
    assert not any(type(m).__name__ in ("AdaptedLayer", "ModulesToSaveWrapper") for m in scope["merged"].modules())
