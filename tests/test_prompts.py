"""Prompt sets (built-in occupation lists, files, templates) and stable per-image seeds."""

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from fair_core.prompts import (
    BUILTIN_PROMPT_SETS,
    DEFAULT_TEMPLATE,
    PromptSet,
    builtin_prompt_set,
    load_prompt_file,
    resolve_prompt_set,
    stable_seed,
)

REPO = Path(__file__).resolve().parents[1]

# Shen et al. 2024 §6.1, first and last of the 50 test occupations, and a few in between (by position).
PAPER_TEST_SAMPLES = {
    0: "senator",
    3: "electrical and electronics repairer",
    10: "sewer",
    21: "gas compressor and gas pumping station operator",
    42: "accountants and auditor",
    49: "cardiologist",
}


def occupations(name: str) -> tuple[str, ...]:
    return builtin_prompt_set(name, template=None).prompts


# ---- built-in sets ----------------------------------------------------------------------------------------


def test_builtin_counts():
    assert len(occupations("occupations-test")) == 50
    assert len(occupations("occupations-val")) == 10
    assert len(occupations("occupations-train")) >= 300


def test_test_set_is_the_papers_in_order():
    test = occupations("occupations-test")
    for index, occupation in PAPER_TEST_SAMPLES.items():
        assert test[index] == occupation


@pytest.mark.parametrize("name", sorted(BUILTIN_PROMPT_SETS))
def test_builtin_sets_have_no_duplicates(name):
    lowered = [o.lower() for o in occupations(name)]
    assert len(set(lowered)) == len(lowered)
    assert all(o == o.strip() and o and not o.startswith("#") for o in lowered)


def test_builtin_sets_are_disjoint():
    sets = {name: {o.lower() for o in occupations(name)} for name in BUILTIN_PROMPT_SETS}
    assert not sets["occupations-train"] & sets["occupations-val"]
    assert not sets["occupations-train"] & sets["occupations-test"]
    assert not sets["occupations-val"] & sets["occupations-test"]


def test_builtin_prompts_use_the_papers_template_with_article_a():
    prompts = builtin_prompt_set("occupations-test")
    assert prompts.name == "occupations-test"
    assert prompts.prompts[0] == "A photo of the face of a senator, a person"
    # "a" even before a vowel, as in the paper.
    assert "A photo of the face of a inventor, a person" in prompts.prompts
    assert "A photo of the face of a administrator, a person" in prompts.prompts
    assert all(p.startswith("A photo of the face of a ") and p.endswith(", a person") for p in prompts)


def test_builtin_with_custom_template():
    prompts = builtin_prompt_set("occupations-val", template="portrait of a {occupation} {style}")
    assert len(prompts) == 10
    assert prompts.prompts[0] == "portrait of a nurse {style}"  # only {occupation} is replaced


def test_unknown_builtin_lists_known_names():
    with pytest.raises(ValueError, match="occupations-train, occupations-val, occupations-test"):
        builtin_prompt_set("occupations-dev")


# ---- files ------------------------------------------------------------------------------------------------


def test_file_of_prompts(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("# my prompts\n\n  a café owner, smiling  \n#skip\nportrait #1 of a dog\n", encoding="utf-8")
    assert load_prompt_file(path) == PromptSet("mine", ("a café owner, smiling", "portrait #1 of a dog"))


def test_file_of_occupations_with_template(tmp_path):
    path = tmp_path / "jobs.txt"
    path.write_text("engineer\nbaker\n", encoding="utf-8")
    prompts = load_prompt_file(path, DEFAULT_TEMPLATE)
    assert prompts.prompts == (
        "A photo of the face of a engineer, a person",
        "A photo of the face of a baker, a person",
    )


def test_missing_file():
    with pytest.raises(ValueError, match="prompt file not found"):
        load_prompt_file("/nonexistent/prompts.txt")


def test_file_without_entries(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("# only a comment\n\n   \n", encoding="utf-8")
    with pytest.raises(ValueError, match="has no prompts"):
        load_prompt_file(path)


def test_file_not_utf8(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        load_prompt_file(path)


def test_template_without_placeholder(tmp_path):
    path = tmp_path / "jobs.txt"
    path.write_text("engineer\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"no \{occupation\} placeholder"):
        load_prompt_file(path, "A photo of a {job}")
    with pytest.raises(ValueError, match="placeholder"):
        builtin_prompt_set("occupations-test", "A photo of a person")


# ---- resolve ----------------------------------------------------------------------------------------------


def test_resolve_builtin_uses_default_template():
    assert resolve_prompt_set("occupations-test") == builtin_prompt_set("occupations-test", DEFAULT_TEMPLATE)


def test_resolve_file(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a red car\n", encoding="utf-8")
    assert resolve_prompt_set(str(path)).prompts == ("a red car",)
    assert resolve_prompt_set(str(path), "{occupation} at night").prompts == ("a red car at night",)


def test_resolve_unknown():
    with pytest.raises(ValueError, match="neither a built-in set"):
        resolve_prompt_set("no-such-set")


# ---- stable_seed ------------------------------------------------------------------------------------------


def expected_seed(encoded: bytes) -> int:
    """The documented derivation, written out: first 8 bytes of SHA-256, big-endian, top bit dropped."""
    return int(hashlib.sha256(encoded).hexdigest()[:16], 16) // 2


SEED_CASES = [
    (("A photo of the face of a senator, a person", 0, 42), b'["A photo of the face of a senator, a person",0,42]'),
    (("café", 7), b'["caf\xc3\xa9",7]'),
    ((-1,), b"[-1]"),
]


@pytest.mark.parametrize("parts, encoded", SEED_CASES)
def test_stable_seed_known_values(parts, encoded):
    seed = stable_seed(*parts)
    assert seed == expected_seed(encoded)
    assert 0 <= seed < 2**63


def test_stable_seed_distinguishes_parts():
    assert stable_seed("1") != stable_seed(1)
    assert stable_seed("ab", "c") != stable_seed("a", "bc")
    assert stable_seed("p", 0, 42) != stable_seed("p", 1, 42)


def test_stable_seed_rejects_other_types():
    with pytest.raises(TypeError, match="str or int"):
        stable_seed("p", 1.5)
    with pytest.raises(TypeError, match="str or int"):
        stable_seed(True)
    with pytest.raises(ValueError, match="at least one part"):
        stable_seed()


def test_stable_seed_same_in_another_process_with_other_hash_seed():
    parts = ("A photo of the face of a senator, a person", 3, 1234)
    code = f"from fair_core.prompts import stable_seed; print(stable_seed(*{parts!r}), hash({parts[0]!r}))"
    outputs = []
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(REPO)}
        result = subprocess.run(
            [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, check=True
        )
        outputs.append(result.stdout.split())
    (seed_1, hash_1), (seed_2, hash_2) = outputs
    assert hash_1 != hash_2  # the salt really differs between the two processes
    assert int(seed_1) == int(seed_2) == stable_seed(*parts)


# ---- packaging --------------------------------------------------------------------------------------------


def test_wheel_ships_prompt_files(tmp_path):
    """The data files are package data: a wheel built from the project's pyproject contains them."""
    pytest.importorskip("setuptools")
    for name in ("pyproject.toml", "README.md", "fair_core", "train_cli"):
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif source.exists():
            shutil.copy(source, tmp_path / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", ".", "-w", "dist", "--no-deps", "--no-build-isolation", "-q"],
        cwd=tmp_path, capture_output=True, check=True,
    )
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for filename in BUILTIN_PROMPT_SETS.values():
        assert f"fair_core/data/prompts/{filename}" in names
