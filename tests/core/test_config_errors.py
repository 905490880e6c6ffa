import pytest

from milkit.config import ConfigError, apply_overrides, build_experiment, load_experiment


def _raw():
    return {"seed": 1, "data": {"kind": "digit_bags", "n_train": 10}, "method": {"name": "distill_to_label"}}


def test_valid_config_fills_paper_defaults():
    exp = build_experiment(_raw())
    assert exp.method.student.gamma_c == 0.3 and exp.method.teacher.lambda_n == 0.5
    assert exp.method.model.name == "abmil" and exp.method.model.gated is True
    assert exp.data.n_train == 10 and exp.seed == 1


def test_unknown_key_is_named():
    raw = _raw()
    raw["method"]["teacher"] = {"lambda_x": 1.0}
    with pytest.raises(ConfigError, match=r"config key 'method.teacher.lambda_x' does not exist"):
        build_experiment(raw, source="exp.yaml")
    raw = _raw()
    raw["bogus"] = 1
    with pytest.raises(ConfigError, match="'bogus' does not exist"):
        build_experiment(raw)


def test_bad_value_and_unknown_method_are_named():
    raw = _raw()
    raw["data"]["n_train"] = -3
    with pytest.raises(ConfigError, match="data.n_train"):
        build_experiment(raw)
    raw = _raw()
    raw["method"]["name"] = "nope"
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        build_experiment(raw)


def test_overrides_parse_yaml_values():
    raw = apply_overrides(_raw(), ["method.student.temperature=4", "trainer.max_epochs=3", "data.mnist_path=null"])
    exp = build_experiment(raw)
    assert exp.method.student.temperature == 4.0 and exp.trainer.max_epochs == 3
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides(_raw(), ["novalue"])


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_experiment(tmp_path / "nope.yaml")


def _hard_bags(method: dict) -> dict:
    return {"seed": 0, "data": {"kind": "hard_bags", "level": "easy", "n_train": 8, "n_val": 4, "n_test": 4},
            "method": method, "trainer": {"max_epochs": 1, "progress_bar": False, "accelerator": "cpu"}}


def test_an_encoder_left_out_on_feature_bags_is_identity_and_a_wrong_one_is_named(caplog):
    """`method: {name: mil}` on feature vectors: LeNet-5 (the digit-bags default) cannot read them,
    so the encoder left out becomes identity (noticed); an image encoder named by the user is a
    one-line error naming the key; on images a feature encoder is refused the same way."""
    import logging

    from milkit.workflow import prepare

    exp = build_experiment(_hard_bags({"name": "mil"}))
    with caplog.at_level(logging.INFO, logger="milkit"):
        prepare(exp)
    assert exp.method.encoder.name == "identity" and exp.method.encoder.in_dim == 512
    assert "method.encoder.name = identity" in caplog.text
    exp = build_experiment(_hard_bags({"name": "mil", "encoder": {"name": "lenet5"}}))
    with pytest.raises(ConfigError, match=r"'method.encoder.name' is 'lenet5', an encoder of images.*D = 512.*identity"):
        prepare(exp)
    digits = {"seed": 0, "data": {"kind": "digit_bags", "n_train": 4, "n_val": 2, "n_test": 2},
              "method": {"name": "mil", "encoder": {"name": "linear", "in_dim": 784}}, "trainer": {"max_epochs": 1}}
    with pytest.raises(ConfigError, match=r"'method.encoder.name' is 'linear', an encoder of feature vectors.*images"):
        prepare(build_experiment(digits))
