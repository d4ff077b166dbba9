"""Target distributions (fair_core.targets): parsing, construction, files, round trips and error messages."""

import json

import numpy as np
import pytest

from fair_core.targets import DEFAULT_SCHEMA, Attribute, TargetDistribution, TargetError, schema_from_json


def test_parse_builds_the_product_of_marginals():
    target = TargetDistribution.parse("gender=female:0.5,male:0.5; age=young:0.75,old:0.25")
    assert target.names == ("gender", "age") and target.class_sizes == (2, 2)
    np.testing.assert_allclose(target.joint, [[0.375, 0.125], [0.375, 0.125]])
    np.testing.assert_allclose(target.flat(), [0.375, 0.125, 0.375, 0.125])
    np.testing.assert_allclose(target.marginal("age"), [0.75, 0.25])
    assert target.joint_labels()[1] == ("female", "old")
    np.testing.assert_array_equal(target.joint_index_table(), [[0, 0], [0, 1], [1, 0], [1, 1]])


def test_parse_uniform_and_left_out_classes():
    target = TargetDistribution.parse("gender=uniform;race=uniform")
    assert target.num_joint_classes == 8
    np.testing.assert_allclose(target.flat(), np.full(8, 1 / 8))
    np.testing.assert_allclose(TargetDistribution.parse("race=White:0.5,Asian:0.5").flat(), [0.5, 0, 0, 0.5])


def test_uniform_constructor():
    target = TargetDistribution.uniform([DEFAULT_SCHEMA["race"], DEFAULT_SCHEMA["age"]])
    assert target.joint.shape == (4, 2)
    np.testing.assert_allclose(target.marginal("race"), [0.25] * 4)


def test_from_mapping_marginals_and_joint():
    marginals = TargetDistribution.from_mapping({"gender": {"female": 0.4, "male": 0.6}, "age": "uniform"})
    np.testing.assert_allclose(marginals.joint, [[0.2, 0.2], [0.3, 0.3]])

    joint = TargetDistribution.from_mapping(
        {"attributes": ["gender", "age"], "joint": {"female,young": 0.4, "male, young": 0.4, "female,old": 0.2}}
    )
    np.testing.assert_allclose(joint.joint, [[0.4, 0.2], [0.4, 0.0]])  # left-out combination: 0
    np.testing.assert_allclose(joint.marginal("gender"), [0.6, 0.4])


def test_load_yaml_json_and_text(tmp_path):
    (tmp_path / "t.yaml").write_text("attributes: [gender, race]\njoint:\n  female,White: 0.5\n  male,Black: 0.5\n")
    from_yaml = TargetDistribution.load(tmp_path / "t.yaml")
    assert from_yaml.joint[0, 0] == 0.5 and from_yaml.joint[1, 1] == 0.5 and from_yaml.joint.sum() == 1.0

    (tmp_path / "t.json").write_text(json.dumps({"age": {"young": 0.75, "old": 0.25}}))
    np.testing.assert_allclose(TargetDistribution.load(str(tmp_path / "t.json")).flat(), [0.75, 0.25])
    np.testing.assert_allclose(TargetDistribution.load("age=young:0.75,old:0.25").flat(), [0.75, 0.25])
    with pytest.raises(TargetError, match="not found"):
        TargetDistribution.load(tmp_path / "missing.yml")
    (tmp_path / "list.yaml").write_text("- gender\n")
    with pytest.raises(TargetError, match="mapping at the top level"):
        TargetDistribution.load(tmp_path / "list.yaml")


def test_to_json_round_trip_keeps_schema_and_table():
    schema = {"skin": Attribute("skin", ("I", "II", "III")), "gender": DEFAULT_SCHEMA["gender"]}
    target = TargetDistribution.parse("skin=I:0.2,II:0.3,III:0.5;gender=female:0.6,male:0.4", schema)
    data = json.loads(json.dumps(target.to_json()))
    back = TargetDistribution.from_json(data)
    assert back.attributes == target.attributes
    np.testing.assert_array_equal(back.joint, target.joint)
    assert schema_from_json(data["attributes"]) == schema
    assert "skin: I 20%, II 30%, III 50%" in target.describe()


@pytest.mark.parametrize(
    "text, names",
    [
        ("gender=female:-0.5,male:1.5", ["gender=female:-0.5", "between 0 and 1"]),
        ("gender=female:0.6,male:0.5", ["'gender'", "sum to 1.1"]),
        ("gender=female:0.5,nonbinary:0.5", ["'nonbinary'", "'gender'"]),
        ("height=tall:1", ["unknown attribute 'height'"]),
        ("gender=female:abc,male:1", ["gender=female:abc", "not a number"]),
        ("gender=female:0.5,female:0.5", ["'female' given twice"]),
        ("gender female", ["'gender female'"]),
        ("", ["empty"]),
    ],
)
def test_parse_errors_name_the_offending_entry(text, names):
    with pytest.raises(TargetError) as error:
        TargetDistribution.parse(text)
    for name in names:
        assert name in str(error.value)


def test_sum_tolerance_is_one_in_a_million():
    TargetDistribution.parse("gender=female:0.5000004,male:0.5")
    with pytest.raises(TargetError, match="sum to 1.000002"):
        TargetDistribution.parse("gender=female:0.500002,male:0.5")


@pytest.mark.parametrize(
    "data, names",
    [
        ({"attributes": ["gender", "race"], "joint": {"female,White": 1.2, "male,Black": -0.2}}, ["'female,White'"]),
        ({"attributes": ["gender", "race"], "joint": {"female,Purple": 1.0}}, ["'Purple'", "'race'"]),
        ({"attributes": ["gender", "race"], "joint": {"female": 1.0}}, ["'female'", "one class of each"]),
        ({"attributes": ["gender", "race"], "joint": {"female,White": 0.5}}, ["gender x race", "sum to 0.5"]),
        ({"attributes": ["gender", "eyes"], "joint": {}}, ["unknown attribute 'eyes'"]),
        ({"gender": {"female": 0.5, "male": -0.5}}, ["gender=male", "between 0 and 1"]),
        ({"gender": {"female": 0.5, "other": 0.5}}, ["'other'"]),
        ({"gender": 0.5}, ["'gender'", "'uniform'"]),
    ],
)
def test_mapping_errors_name_the_offending_entry(data, names):
    with pytest.raises(TargetError) as error:
        TargetDistribution.from_mapping(data)
    for name in names:
        assert name in str(error.value)


def test_attribute_and_target_validation():
    with pytest.raises(TargetError, match="at least two classes"):
        Attribute("x", ("a",))
    with pytest.raises(TargetError, match="repeated"):
        Attribute("x", ("a", "a"))
    with pytest.raises(TargetError, match="listed twice"):
        TargetDistribution.parse("gender=uniform;gender=uniform")
    with pytest.raises(TargetError, match="not part of this target"):
        TargetDistribution.parse("gender=uniform").marginal("race")
    with pytest.raises(TargetError, match="expected"):
        TargetDistribution(tuple([DEFAULT_SCHEMA["gender"]]), np.array([0.2, 0.3, 0.5]))
