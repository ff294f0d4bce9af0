"""Issue 11, class 7: Keras files with custom layers, and a .keras file that is not one."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from conveyor.app import cli
from conveyor.plan import Plan
from tests.converter.conftest import assert_reproduces

LAYER = textwrap.dedent('''
    import keras


    class Scale(keras.layers.Layer):
        """y = x * a learned per-feature scale (not registered with Keras)."""

        def build(self, shape):
            self.w = self.add_weight(shape=(shape[-1],), initializer="random_normal")

        def call(self, x):
            return x * self.w
''')


def _custom_model(tmp_path: Path) -> Path:
    import importlib.util

    import keras

    module_file = tmp_path / "my_layers.py"
    module_file.write_text(LAYER)
    spec = importlib.util.spec_from_file_location("my_layers", module_file)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    keras.utils.set_random_seed(6)
    model = keras.Sequential([keras.Input(shape=(12,), name="features"),
                              keras.layers.Dense(16, activation="relu", name="fc"),
                              mod.Scale(name="scale"),
                              keras.layers.Dense(4, name="out")])
    model.save(tmp_path / "custom.keras")
    return tmp_path / "custom.keras"


def test_custom_objects_from_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    src = _custom_model(tmp_path)
    monkeypatch.setattr(cli, "COMMAND_MODULES", ("conveyor.app.cmd_convert",))
    assert cli.main(["convert", str(src), "--out", str(tmp_path / "no")]) == 2
    assert "--custom-objects" in capsys.readouterr().err
    assert cli.main(["convert", str(src), "--out", str(tmp_path / "p"), "--stages", "2",
                     "--custom-objects", str(tmp_path / "my_layers.py")]) == 0
    plan = Plan.load(tmp_path / "p")
    assert len(plan.stages) == 2
    import onnx

    from converter.export import load_custom_objects, load_model

    whole = load_model(src, custom_objects=load_custom_objects(str(tmp_path / "my_layers.py")))
    onnx.save(whole, str(tmp_path / "whole.onnx"))
    for batch in (1, 3):
        assert_reproduces(tmp_path / "p", tmp_path / "whole.onnx", batch=batch)


@pytest.mark.parametrize(("head", "says"), [(b"\x89HDF\r\n\x1a\n" + b"\0" * 64, "HDF5"),
                                            (b"not a model at all", "not a Keras v3")])
def test_a_keras_file_that_is_not_a_zip_says_so(head: bytes, says: str, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "m.keras").write_bytes(head)
    monkeypatch.setattr(cli, "COMMAND_MODULES", ("conveyor.app.cmd_convert",))
    assert cli.main(["convert", str(tmp_path / "m.keras"), "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert "is not a Keras v3 .keras file" in err and says in err
