"""``milkit configs``: shipped experiment YAMLs are listed, resolved by name, copied."""

import pytest

from milkit.cli import main
from milkit.shipped_configs import list_configs, resolve_config


def test_shipped_configs_are_listed_and_resolved(capsys):
    shipped = list_configs()
    assert {"sm/camelyon16_smap.yaml", "weno/weno_abmil_cifar10.yaml", "maxmin/glas_eem.yaml"} <= set(shipped)
    name = next(k for k in shipped if k.startswith("weno/"))
    assert resolve_config(name) == shipped[name]
    assert resolve_config("configs/" + name).resolve() == shipped[name].resolve()
    assert main(["configs"]) == 0
    assert name in capsys.readouterr().out


def test_unknown_config_name_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="does not exist, and no shipped config"):
        resolve_config("nope/missing.yaml")
    assert main(["train", "sm/missing.yaml", "--out", str(tmp_path / "r")]) == 2
    assert "sm/missing.yaml" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_copy_writes_once_and_never_overwrites(tmp_path, capsys):
    name = next(iter(list_configs()))
    assert main(["configs", "--copy", name, "--to", str(tmp_path)]) == 0
    copied = tmp_path / name.split("/")[-1]
    assert copied.read_text() == resolve_config(name).read_text()
    copied.write_text("# edited\n")
    assert main(["configs", "--copy", name, "--to", str(tmp_path)]) == 2
    assert copied.read_text() == "# edited\n"  # nothing lost


def test_copy_into_a_new_folder(tmp_path):
    name = next(iter(list_configs()))
    assert main(["configs", "--copy", name, "--to", str(tmp_path / "mine")]) == 0
    assert (tmp_path / "mine" / name.split("/")[-1]).is_file()
    assert main(["configs", "--copy", name, "--to", str(tmp_path / "exp.yaml")]) == 0
    assert (tmp_path / "exp.yaml").read_text() == resolve_config(name).read_text()
