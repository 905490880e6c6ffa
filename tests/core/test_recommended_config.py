"""issue 11 §2: the recommended feature-bags config is listed first and validates without in_dim."""

from milkit.config import load_experiment
from milkit.shipped_configs import list_configs


def test_recommended_config_is_listed_first_and_reads_the_feature_size_from_the_data():
    shipped = list_configs()
    assert next(iter(shipped)) == "recommended/feature_bags.yaml"
    exp = load_experiment(shipped["recommended/feature_bags.yaml"])
    assert exp.method.name == "pseudo_label" and exp.data.kind == "feature_bags"
    assert exp.method.in_dim is None  # filled in from the feature files at fit time
